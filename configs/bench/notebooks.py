"""scripts/bench_notebooks.py: wall time of each Colab notebook at its own default parameters.

  python scripts/bench_notebooks.py --config=configs/bench/notebooks.py --config.notebooks=00,02
"""
import os

import ml_collections

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  # Comma-separated number prefixes of the notebooks in colab/ to run (colab/run_notebook.py).
  config.notebooks = "00,01,02,03"
  config.timeout_s = 1800  # per-notebook limit of nbclient's run (seconds)
  config.out = os.path.join(_REPO, "bench_results", "notebooks.json")  # the JSON report
  return config
