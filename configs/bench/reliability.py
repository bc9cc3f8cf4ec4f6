"""scripts/bench_reliability.py: kill-and-resume runs and bad-input cases of scripts/main.py.

  python scripts/bench_reliability.py                                  # the full harness
  python scripts/bench_reliability.py --config.kills=3 --config.cases=quick   # the CI subset
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.kills = 20  # kill-and-resume runs: the targeted fault points first, then random moments
  config.cases = "all"  # bad inputs: 'all', 'quick' (10 cheap ones) or a comma list of names
  # Targeted kills as comma-separated config:point[@k] ('': the harness's TARGETED list).
  config.targeted = ""
  config.jobs = 2  # kill runs at a time
  config.seed = 0  # seed of the random kill moments
  config.rescore = False  # only recompute bit-identity of the runs kept under `keep` (no run)
  config.keep = ""  # keep every workdir under this folder ('': a temporary folder, removed)
  config.out = "bench_results/bench_reliability.json"  # the JSON report
  config.markdown = ""  # also write the markdown tables here ('': print only)
  return config
