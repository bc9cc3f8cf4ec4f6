"""scripts/bench_fokker_planck.py: speed and accuracy of the grid Fokker–Planck score.

  python scripts/bench_fokker_planck.py --config=configs/bench/fokker_planck.py \
      --config.grids=256,512
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.grids = "256,512,1024"  # comma-separated base grid sizes (fokker_planck.GridSpec.grid_size)
  config.num_samples = 2500  # samples of the timed family density (speed part)
  config.seed = 3  # seed of the family density used for timing (densities.random_quartic_mixture)
  config.out = "bench_results/fokker_planck.json"  # the JSON report (relative: to the working folder)
  return config
