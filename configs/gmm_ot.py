"""Random Gaussian mixtures with exact scores: the paper's cost test and Brenier's criterion.

python scripts/main.py --config=configs/gmm_ot.py --config.num_mixtures=4
"""
import ml_collections

from ddpm_ot_jax import config_base


def get_config() -> ml_collections.ConfigDict:
  config = config_base.default_config()
  config.experiment = "gmm_ot"
  config.x64 = True
  config.num_mixtures = 12
  config.dims = (2, 4, 8, 16, 32, 64)  # mixture i lives in dims[i % len(dims)]
  config.max_components = 5  # K ~ Uniform{2..max_components}
  config.mean_scale = 2.0  # component means ~ N(0, mean_scale² I)
  config.eig_min = 0.05  # component covariance eigenvalues, log-uniform
  config.eig_max = 1.0
  config.sample_sizes = (500, 2500, 5000)  # n of the paper's cost test; 2500 is the paper's
  config.num_jacobian_points = 32
  config.schedule = "constant"  # the paper's OU (β = 2); or 'linear', 'cosine'
  # End of the encoder as OU time s (Eq. 8), mapped onto the schedule's clock; 'linear' ends at
  # s = 5.025 and 'cosine' at s = 4.778 (a larger t_end with those is a ValueError).
  config.t_end = 16.0
  config.solver = ml_collections.ConfigDict(
      dict(solver="tsit5", rtol=1e-8, atol=1e-8, max_steps=16384))
  return config
