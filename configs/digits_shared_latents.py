"""Figures 5–6 on scikit-learn's digits, measured: one latent decoded by several DDPMs.

python scripts/main.py --config=configs/digits_shared_latents.py
python scripts/main.py --config=configs/digits_shared_latents.py --config.training.num_steps=100

Trains four small DDPMs on CPU (each in <workdir>/models/<data>-<fingerprint>/, resumed on a
rerun): on digits 0–4, on digits 5–9 (different data: the AFHQ cat/dog analogue), on digits
0–4 again with another seed (same data: the reference), and a class-conditional one on all
digits (the ImageNet analogue, decoded with every label). Decodes the same 100 latents with
each (DDIM, η = 0, 100 steps) and reports the RMS pixel distance between images from the
same latent against images from different latents, beside the non-diffusion control (two
independently initialised MLP VAEs trained on 0–4 and 5–9).

Runtime, measured on the project's 2-core CPU machine while it was shared with other jobs
(load ≈ 9): 34 min wall, 16 CPU-minutes (≈ 3 CPU-minutes per DDPM, seconds for the decoding
and for each VAE). A rerun in the same workdir reuses the trained models.
"""
import ml_collections

from configs import digits_latent_ot
from ddpm_ot_jax import model_sources

LOW, HIGH = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)


def get_config() -> ml_collections.ConfigDict:
  config = digits_latent_ot.get_config()
  del config.latent_ot
  config.experiment = "shared_latents"
  config.models = ml_collections.ConfigDict(dict(
      digits_0to4=model_sources.model_spec(classes=LOW),
      digits_5to9=model_sources.model_spec(classes=HIGH),
      digits_0to4_seed1=model_sources.model_spec(classes=LOW, seed_offset=1),
      conditional=model_sources.model_spec(num_classes=10, labels=tuple(range(10))),
  ))
  config.shared_latents = ml_collections.ConfigDict(dict(
      num_latents=100,  # N latents z ~ N(0, I) decoded by every model
      grid_latents=16,  # columns shown in the figures
      sampler="ddim",  # 'ddim' (η = 0: the PF-ODE's first-order solver) or 'pf_ode' (adaptive)
      num_steps=100,  # DDIM steps (NFE)
      ode_rtol=1e-5,  # for sampler='pf_ode'
      ode_atol=1e-5,
      batch_size=100,
  ))
  config.control = ml_collections.ConfigDict(dict(
      vae=True,  # the non-diffusion control: independently initialised VAEs
      vae_classes=(LOW, HIGH),  # one VAE per class subset (same data as the DDPM pair)
      vae_steps=3000,
      vae_batch_size=128,
      vae_lr=1e-3,
      vae_sigma=0.25,  # decoder std of the Gaussian likelihood on [−1, 1] pixels
      vae_hidden=256,
  ))
  return config
