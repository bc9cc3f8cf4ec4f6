"""Theorem 3.1 at machine precision: a random N(a0, Σ0) in `dims` dimensions.

python scripts/main.py --config=configs/gaussian_ot.py --config.dims=1000
"""
import ml_collections

from ddpm_ot_jax import config_base


def get_config() -> ml_collections.ConfigDict:
  config = config_base.default_config()
  config.experiment = "gaussian_ot"
  config.x64 = True
  config.dims = 64
  config.num_samples = 1000  # points encoded and used in the discrete OT test
  config.num_jacobian_points = 4  # Jacobians (d × d each) through the ODE solve
  config.eig_min = 0.1  # eigenvalues of Σ0, log-uniform in [eig_min, eig_max]
  config.eig_max = 10.0
  config.schedule = "constant"  # 'constant' (the paper's OU, β = 2), 'linear' or 'cosine'
  # End of the encoder as OU time s (Eq. 8), mapped onto the schedule's own clock; e^{-16} ≈ 1e-7
  # from the limit map. 'linear' ends at s = 5.025 and 'cosine' at s = 4.778: a larger t_end
  # with those is a ValueError (use 'constant', which reaches any s).
  config.t_end = 16.0
  config.solver = ml_collections.ConfigDict(
      dict(solver="tsit5", rtol=1e-8, atol=1e-8, max_steps=16384))
  config.figure = True  # the paper's Fig. 1 for a 2-D Gaussian
  return config
