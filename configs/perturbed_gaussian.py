"""Perturbed Gaussians μ0 = (∇u)⁻¹#N(0, I), u = |x|²/2 + ε φ: the encoder against the known
OT map ∇u, over a sweep of ε that includes ε = 0 (the pipeline's numerical floor).

  python scripts/main.py --config=configs/perturbed_gaussian.py --workdir=runs/perturbed_gaussian
"""
import ml_collections

from ddpm_ot_jax import config_base


def get_config() -> ml_collections.ConfigDict:
  config = config_base.default_config()
  config.experiment = "perturbed_gaussian"
  config.x64 = True
  # ε values; u stays convex for |ε| < 1/‖BᵀB‖ ≈ 0.694 (densities.default_perturbation).
  config.epsilons = (0.0, 0.003, 0.01, 0.03, 0.1, 0.2, 0.4, 0.6)
  config.num_samples = 2500
  config.grid_size = 1024
  config.num_time_steps = 256
  config.table_size = 128
  config.t_max = 16.0  # OU time; e^{-16} ≈ 1e-7 keeps the finite-T bias below the floor
  config.solver = "dopri8"
  config.rtol = 1e-9
  config.atol = 1e-9
  config.ot_method = "pot"
  config.num_jacobian_samples = 256
  config.sweep_num_samples = (500, 5000)
  # Also solve at a finer resolution to estimate the numerical error at every ε.
  config.convergence_check = True
  return config
