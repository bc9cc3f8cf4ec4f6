"""scripts/bench_encode.py: probability-flow encoding with exact scores (float64, Tsit5,
rtol = atol = 1e-8, OU time 16).

  python scripts/bench_encode.py --config=configs/bench/encode.py --config.repeats=5

Defaults are the README's cases: 1000 points of a Gaussian in d = 1000 and 2500 points of a
5-component Gaussian mixture in d = 2.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.repeats = 3  # timed runs per case after one compiling warm-up (the median is reported)
  # A random Gaussian (gaussian.random_gaussian); error against Theorem 3.1's closed form.
  config.gaussian = ml_collections.ConfigDict(dict(
      dim=1000,  # dimension d
      num_points=1000,  # points encoded per call
  ))
  # A random Gaussian mixture (gmm.random_mixture); error against a Dopri8 solve at 1e-12.
  config.gmm = ml_collections.ConfigDict(dict(
      dim=2,  # dimension d
      num_components=5,  # K
      num_points=2500,  # points encoded per call
  ))
  config.out = "bench_results/encode.json"  # the JSON report (relative: to the working folder)
  return config
