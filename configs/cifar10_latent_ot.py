"""Figure 7 at CIFAR-10 scale (GPU/TPU): the OT test on 100 and 500 CIFAR-10 test images.

python scripts/main.py --config=configs/cifar10_latent_ot.py \
    --config.data.root=DATA --config.models.own.path=WEIGHTS_DIR

'own' is the published DDPM CIFAR-10 model (Ho et al. 2020; google/ddpm-cifar10-32 in the
diffusers safetensors layout: config.json + diffusion_pytorch_model.safetensors in
WEIGHTS_DIR). 'other' is a DDPM of the same architecture trained here on the transposed CIFAR-10
training images (other data), in <workdir>/models/other-<fingerprint>/ and resumed on a
rerun; point it at a finished run with --config.models.other.source=checkpoint
--config.models.other.path=RUN_DIR, or drop it with --config.latent_ot.other_model=False.
DATA is the folder holding cifar-10-batches-py (ddpm_ot_jax.data.download_cifar10 fetches it).
Without the data or the weights the run stops at once with one message naming the missing
path (on CPU it goes no further than that).
"""
import ml_collections

from configs import digits_latent_ot
from ddpm_ot_jax import model_sources


def get_config() -> ml_collections.ConfigDict:
  config = digits_latent_ot.get_config()
  config.data.name = "cifar10"
  config.data.root = "data"  # holds cifar-10-batches-py/
  config.data.resolution = 0
  config.data.flip = True
  # The DDPM paper's CIFAR-10 UNet (35.7M parameters), for the 'other' model trained here.
  config.model = ml_collections.ConfigDict(dict(
      ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), dropout=0.1,
      num_classes=0, resamp_with_conv=True,
  ))
  config.training.update(dict(
      num_steps=800_000, batch_size=128, lr=2e-4, warmup_steps=5000, grad_clip=1.0,
      ema_decay=0.9999, ema_warmup=False, log_every=1000, checkpoint_every=10_000,
      keep_checkpoints=2, sample_every=50_000,
  ))
  config.models = ml_collections.ConfigDict(dict(
      own=model_sources.model_spec(source="diffusers", path="checkpoints/ddpm-cifar10-32"),
      other=model_sources.model_spec(transform="transpose"),
  ))
  config.latent_ot.update(dict(
      split="test",  # the 10,000 CIFAR-10 test images
      num_images=(100, 500),
      ddim_steps=100,
      batch_size=100,
  ))
  return config
