"""Bits/dim of the digits DDPM on the held-out digits, and the PF-ODE log-likelihood of exact
scores against closed-form densities (Gaussian, Gaussian mixture, perturbed Gaussian, one
density of the paper's 2-D family).

python scripts/main.py --config=configs/digits_likelihood.py
python scripts/main.py --config=configs/digits_likelihood.py --config.likelihood.num_probes=4

The DDPM is configs/digits_ddpm.py's (same data, model, diffusion and training blocks, so the
same model stage folder model-<fingerprint> as configs/digits_dpmot.py: copy it over to reuse a
trained model). Digits pixels take 17 values (0..16): they are dequantized as y = 2(k + u)/17 − 1 and
bits/dim = (−log p(y) + 64 log 8.5)/(64 log 2) (experiments/likelihood.py, flow.bits_per_dim).
"""
import ml_collections

from configs import digits_ddpm


def get_config() -> ml_collections.ConfigDict:
  config = digits_ddpm.network_config()
  config.experiment = "likelihood"
  config.likelihood = ml_collections.ConfigDict(dict(
      split="heldout",  # the 300 digits outside the training split
      max_images=0,  # 0: the whole split
      batch_size=100,  # images per solve (one progress line each), split across the devices
      divergence="hutchinson",  # 'hutchinson' (num_probes JVPs per step) or 'exact' (D = 64)
      probe="rademacher",  # Hutchinson probes: 'rademacher' (±1) or 'gaussian'
      num_probes=1,
      # score_sde's tolerances (RK45 at 1e-5); Tsit5 is diffrax's equivalent.
      solver=ml_collections.ConfigDict(dict(solver="tsit5", rtol=1e-5, atol=1e-5,
                                            max_steps=4096)),
  ))
  config.exact = ml_collections.ConfigDict(dict(
      cases=("gaussian", "gmm", "perturbed_gaussian", "quartic_2d"),
      num_points=64,  # points of each density (its own samples)
      # OU times (the paper's β = 2 clock): the data are the state at t_start (log p moves by
      # O(t_start)); the prior N(0, I) at t_end is off by O(e^{−t_end}) ≈ 1e-7.
      t_start=1e-10,
      t_end=16.0,
      solver=ml_collections.ConfigDict(dict(solver="tsit5", rtol=1e-8, atol=1e-8,
                                            max_steps=16384)),
      gaussian_dims=64,
      gmm_dims=8,
      gmm_components=4,
      perturbation_epsilon=0.4,  # u = |x|²/2 + ε φ (convex for |ε| < 0.694)
      # Fokker–Planck grid of the two 2-D cases (configs/synthetic_2d.py's resolution).
      grid_size=1024,
      num_time_steps=256,
      table_size=128,
  ))
  return config
