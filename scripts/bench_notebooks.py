r"""Wall time of each Colab notebook at its own default parameters, on this machine.

  python scripts/bench_notebooks.py [--notebooks=00,02] [--out=bench_results/notebooks.json]

Runs colab/<name>.ipynb top to bottom with nbclient (colab/run_notebook.py), overriding only
where the default would not measure the notebook itself: 02 gets REUSE_DEFAULT_RUN = False
(so it trains its own small model instead of reading runs/digits_dpmot), and 02, 03 write
into a fresh temporary WORKDIR (so no cache from an earlier run is reused). Wall time
includes the kernel start and JAX compilation, as a user sees it. Writes JSON (seconds and
each notebook's NOTEBOOK_SUMMARY) and prints a table.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from typing import Sequence

from absl import app
from absl import flags

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO)

_NOTEBOOKS = flags.DEFINE_list("notebooks", ["00", "01", "02", "03"],
                               "Notebook number prefixes to run.")
_OUT = flags.DEFINE_string("out", os.path.join(_REPO, "bench_results", "notebooks.json"),
                           "JSON output path.")


def _overrides(name: str, workdir: str) -> str:
  lines = []
  if name.startswith("02"):
    lines.append("REUSE_DEFAULT_RUN = False")
  if name.startswith(("02", "03")):
    lines.append(f"WORKDIR = {workdir!r}")
  return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
  del argv
  from colab import run_notebook  # pylint: disable=g-import-not-at-top
  from ddpm_ot_jax.experiments import common  # pylint: disable=g-import-not-at-top

  names = [n for n in run_notebook.NOTEBOOKS if n[:2] in _NOTEBOOKS.value]
  if not names:
    raise app.UsageError(f"--notebooks={_NOTEBOOKS.value} matches none of "
                         f"{run_notebook.NOTEBOOKS}")
  report = {"load_average_1min": os.getloadavg()[0], "cpu_count": os.cpu_count()}
  for name in names:
    with tempfile.TemporaryDirectory() as workdir:
      start = time.perf_counter()
      _, summary = run_notebook.execute(name, _overrides(name, workdir), timeout_s=1800)
      seconds = time.perf_counter() - start
    report[name[:-len(".ipynb")]] = {"seconds": seconds, "summary": summary}
    print(f"{name:34s} {seconds:8.0f} s", flush=True)
  common.write_json(_OUT.value, report)
  print(f"Wrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
