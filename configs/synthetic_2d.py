"""Sec. 3.4 (Figs. 2–4): 150 random 2-D densities, Fokker–Planck on the 1024² grid of [−10, 10]²,
t ∈ [0, 8] in 256 steps, 2500 samples, exact OT (POT) against the encoder pairing.

  python scripts/main.py --config=configs/synthetic_2d.py --workdir=runs/synthetic_2d
  python scripts/main.py --config=configs/synthetic_2d.py --config.num_densities=3
"""
import ml_collections

from ddpm_ot_jax import config_base


def get_config() -> ml_collections.ConfigDict:
  config = config_base.default_config()
  config.experiment = "synthetic_2d"
  config.x64 = True
  # The paper's setup.
  config.num_densities = 150
  config.grid_size = 1024  # points per dimension on [-10, 10]^2
  config.num_time_steps = 256  # time levels on [0, t_max] (uniform in a warped clock)
  config.num_samples = 2500
  config.t_max = 8.0  # OU time of Eq. 8
  config.max_components = 5  # K ~ Uniform{1..max_components}
  config.target_std = 1.5  # each density is centred and scaled to this largest std
  config.ot_method = "pot"  # exact discrete OT: 'pot' (network simplex) or 'scipy'
  # Our grid tables and ODE solver (see ddpm_ot_jax/fokker_planck.py).
  config.table_size = 128  # comoving spline table per mixture component
  config.solver = "dopri8"
  config.rtol = 1e-8
  config.atol = 1e-8
  # Brenier check: Jacobian asymmetry on the first samples of each density.
  config.num_jacobian_samples = 256
  # ε_rel against the number of samples n, on the first densities.
  config.sweep_num_samples = (500, 1000, 2500, 5000)
  config.sweep_num_densities = 3
  # Re-solve the densities of largest ε_rel at 2× table size and time levels, 100× tighter
  # tolerances (same samples): the numerical error of what the run reports.
  config.convergence_check_worst = 3
  # Figures.
  config.num_figure_densities = 8
  config.num_trajectory_points = 150
  return config
