"""Figure 5 (top) at the paper's scale (GPU/TPU): AFHQ cat / dog / wild DDPMs, 256×256.

python scripts/main.py --config=configs/afhq_shared_latents.py --config.data.root=AFHQ

AFHQ (Choi et al. 2020) laid out as AFHQ/train/{cat,dog,wild}/*.png (the official
release). Three DDPMs, one per class folder, are trained here (each in
<workdir>/models/<data>-<fingerprint>/, resumed on a rerun) with the paper's setup: the
guided-diffusion LSUN configuration (approximated by our UNet: 256 channels, multipliers
1,1,2,2,4,4, attention at 32, 16 and 8 with 64-dim heads, dropout 0.1; no scale-shift norm
or learned σ), 3·10⁵ steps. Trained models from elsewhere: --config.models.cat.source=checkpoint
--config.models.cat.path=RUN_DIR (and the same for dog, wild). Then the same 64 latents are
decoded by each with DDIM in 1000 steps and the same-latent / different-latent pixel
distances are reported (the VAE control is off at this scale). Without the images or the
checkpoints the run stops at once with one message naming the missing path (on CPU it goes no
further than that). FFHQ/MetFaces: point data.root at a folder with ffhq/ and metfaces/
subfolders and rename the models accordingly in a copy of this file.
"""
import ml_collections

from configs import digits_shared_latents
from ddpm_ot_jax import model_sources


def get_config() -> ml_collections.ConfigDict:
  config = digits_shared_latents.get_config()
  config.data.name = "image_folder"
  config.data.root = "data/afhq"  # holds train/{cat,dog,wild}/
  config.data.resolution = 256
  config.data.channels = 3
  config.data.flip = True
  config.model = ml_collections.ConfigDict(dict(
      ch=256, ch_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2, attn_resolutions=(32, 16, 8),
      head_dim=64, dropout=0.1, num_classes=0, resamp_with_conv=True,
  ))
  config.training.update(dict(
      num_steps=300_000, batch_size=64, lr=1e-4, warmup_steps=1000, grad_clip=1.0,
      ema_decay=0.9999, ema_warmup=False, log_every=1000, checkpoint_every=10_000,
      keep_checkpoints=2, sample_every=20_000, grid_samples=16, grid_sampler_steps=100,
  ))
  config.models = ml_collections.ConfigDict(dict(
      cat=model_sources.model_spec(subfolder="cat"),
      dog=model_sources.model_spec(subfolder="dog"),
      wild=model_sources.model_spec(subfolder="wild"),
  ))
  config.shared_latents.update(dict(
      num_latents=64, grid_latents=8, sampler="ddim", num_steps=1000, batch_size=16,
  ))
  config.control.vae = False
  return config
