r"""Wall time of each Colab notebook at its own default parameters, on this machine.

  python scripts/bench_notebooks.py [--config=configs/bench/notebooks.py] [--config.notebooks=00,02]

Reads configs/bench/notebooks.py (ml_collections, `--config.KEY=VALUE` overrides, as
scripts/main.py): config.notebooks, config.timeout_s, config.out.

Runs colab/<name>.ipynb top to bottom with nbclient (colab/run_notebook.py), overriding only
where the default would not measure the notebook itself: 02 gets REUSE_DEFAULT_RUN = False
(so it trains its own small model instead of reading runs/digits_dpmot), and 02, 03 write
into a fresh temporary WORKDIR (so no cache from an earlier run is reused). Wall time
includes the kernel start and JAX compilation, as a user sees it. Writes JSON (seconds and
each notebook's NOTEBOOK_SUMMARY) to config.out and prints a table.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from typing import Sequence

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO)

DEFAULT_CONFIG = os.path.join(_REPO, "configs", "bench", "notebooks.py")


def _overrides(name: str, workdir: str) -> str:
  lines = []
  if name.startswith("02"):
    lines.append("REUSE_DEFAULT_RUN = False")
  if name.startswith(("02", "03")):
    lines.append(f"WORKDIR = {workdir!r}")
  return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
  del argv  # only the program name: `cli.flags_parser` refuses any other argument
  import cli  # pylint: disable=g-import-not-at-top
  from colab import run_notebook  # pylint: disable=g-import-not-at-top
  from ddpm_ot_jax.experiments import common  # pylint: disable=g-import-not-at-top

  config = _CONFIG.value
  prefixes = [p.strip() for p in str(config.notebooks).split(",") if p.strip()]
  names = [n for n in run_notebook.NOTEBOOKS if n[:2] in prefixes]
  if not names:
    cli.fail(f"config.notebooks={config.notebooks!r} matches none of {run_notebook.NOTEBOOKS}")
  report = {"load_average_1min": os.getloadavg()[0], "cpu_count": os.cpu_count()}
  for name in names:
    with tempfile.TemporaryDirectory() as workdir:
      start = time.perf_counter()
      _, summary = run_notebook.execute(name, _overrides(name, workdir), timeout_s=config.timeout_s)
      seconds = time.perf_counter() - start
    report[name[:-len(".ipynb")]] = {"seconds": seconds, "summary": summary}
    print(f"{name:34s} {seconds:8.0f} s", flush=True)
  common.write_json(config.out, report)
  print(f"Wrote {config.out}")


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  import cli  # pylint: disable=g-import-not-at-top  # scripts/ is first on sys.path
  _CONFIG = cli.define_config_flag(DEFAULT_CONFIG, "Path to a config file in configs/bench/.")
  app.run(main, flags_parser=cli.flags_parser(DEFAULT_CONFIG))
