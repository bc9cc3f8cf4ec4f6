"""configs/digits_dpmot.py at the size of tests/dpmot_test.py's tiny runs (helpers.tiny_dpmot),
trained 2 steps, DDPM-1000 and DPM-OT-10 as the methods (neither takes a time spacing): the run
tests/multiprocess_test.py starts as 1 and as 2 processes.
46 targets (not a multiple of 4 devices: the last device's shard is padded) in blocks of 5
(a running argmax over 2 full blocks and a remainder per device).

python3 scripts/main.py --config=tests/multiprocess_dpmot_config.py --workdir=/tmp/tiny
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tests/helpers.py

from configs import digits_dpmot  # pylint: disable=g-import-not-at-top,wrong-import-position
import helpers  # pylint: disable=g-import-not-at-top,wrong-import-position

NUM_TARGETS = 46


def get_config():
  config = helpers.tiny_dpmot(digits_dpmot.get_config())
  config.training.num_steps = 2
  config.evaluation.methods = ("ddpm", "dpm_ot_10")
  config.dpmot.target_split = f"train[:{NUM_TARGETS}]"
  config.dpmot.ot.block_size = 5
  return config
