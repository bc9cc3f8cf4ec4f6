"""Figure 7 on scikit-learn's digits: is the image ↔ DDPM-code pairing the optimal assignment?

python scripts/main.py --config=configs/digits_latent_ot.py
python scripts/main.py --config=configs/digits_latent_ot.py --config.training.num_steps=100

Trains two small DDPMs on CPU (each in <workdir>/models/<data>-<fingerprint>/, resumed on a
rerun): 'own' on the digits training split and 'other' on the same images transposed (other
data of the same size). Encodes K held-out digits with the PF-ODE and with DDIM inversion,
solves the exact OT between the images and their codes (POT) and reports the identity
fraction and ε_rel, beside the shuffled-codes and other-model controls, for K = 100 and 300
(the whole held-out split; K = 500 is more than it holds and is skipped).

Runtime, measured on the project's 2-core CPU machine while it was shared with other jobs
(load ≈ 9): 30 min wall and 13 CPU-minutes with ode_rtol = 1e-5; ≈ 11 CPU-minutes at the
default 1e-4. Each DDPM is ≈ 3 CPU-minutes (1500 steps of batch 64). The PF-ODE round trip of
300 images takes ≈ 300 network evaluations each way at 1e-4 (≈ 600 at 1e-5; round-trip RMSE
0.004 instead of 0.0007; the OT numbers are the same). A rerun in the same workdir reuses the
trained models and only encodes: 3.4 CPU-minutes (3 min wall at load ≈ 4).
"""
import ml_collections

from configs import digits_ddpm
from ddpm_ot_jax import model_sources


def small_digits_training(config: ml_collections.ConfigDict) -> None:
  """The digits DDPM at CPU-minutes scale: UNet ch 32 (8×8 → 4×4, attention at 4×4, 0.7M
  parameters), batch 64, 1500 steps: ≈ 3 CPU-minutes per model on the 2-core machine."""
  config.training.num_steps = 1500
  config.training.batch_size = 64
  config.training.warmup_steps = 100
  config.training.log_every = 100
  config.training.checkpoint_every = 500
  config.training.sample_every = 0  # no grids during training


def get_config() -> ml_collections.ConfigDict:
  config = digits_ddpm.network_config()
  config.experiment = "latent_ot"
  small_digits_training(config)
  # Imported weights come from a model spec (source='diffusers'), not from the training block.
  del config.training.init_from_diffusers
  # Where the DDPMs are trained ('' = <workdir>/models). Experiments that share it share the
  # models of equal specs (folder names carry the fingerprint of the training inputs).
  config.models_dir = ""
  config.models = ml_collections.ConfigDict(dict(
      own=model_sources.model_spec(),  # all digits of the training split
      other=model_sources.model_spec(transform="transpose"),  # the transposed digits
  ))
  config.latent_ot = ml_collections.ConfigDict(dict(
      split="heldout",  # the encoded images: 300 held-out digits (never seen in training)
      classes=(),  # restrict them to these labels (() = all)
      num_images=(100, 300, 500),  # K; sizes above the split's are skipped
      encoders=("ode", "ddim"),
      ddim_steps=100,  # DDIM inversion steps (NFE)
      ode_solver="tsit5",
      ode_rtol=1e-4,  # PF-ODE tolerances (round-trip RMSE ~1e-3; 1e-5 doubles the NFE)
      ode_atol=1e-4,
      ode_max_steps=4096,
      batch_size=300,  # images per encoder call
      round_trip=True,  # also decode the codes and report the reconstruction error
      ot_method="pot",  # 'pot' (network simplex) or 'scipy' (Jonker–Volgenant)
      shuffle_control=True,  # the codes under a random permutation (wrong pairing)
      other_model=True,  # the codes of models.other (trained on other data)
  ))
  return config
