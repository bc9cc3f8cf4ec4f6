"""A DDPM on scikit-learn's 8×8 digits, trained, sampled and evaluated on CPU in minutes.

python scripts/main.py --config=configs/digits_ddpm.py
python scripts/main.py --config=configs/digits_ddpm.py --config.training.num_steps=50

Results: recognized_fraction (share of samples a digits classifier gives top probability
≥ 0.5), classifier_accuracy, params, train_seconds, images_per_second, ...; the sample grid
in <workdir>/samples.png. Running again with the same workdir resumes from the checkpoint.
"""
import ml_collections

from ddpm_ot_jax import config_base


def network_config() -> ml_collections.ConfigDict:
  """The DDPM itself (data, model, diffusion, training): the part every experiment that
  trains this network shares; `get_config` adds train_ddpm's sampling and evaluation."""
  config = config_base.default_config()

  config.data = ml_collections.ConfigDict(dict(
      name="digits",  # 'digits', 'cifar10' or 'image_folder' (ddpm_ot_jax.data.load_dataset)
      root="",  # data folder (unused for digits)
      resolution=0,  # 0: the dataset's own size
      flip=False,  # random horizontal flips (digits are not mirror-symmetric)
  ))
  # UNet fields (ddpm_ot_jax.models.unet.UNet); 8×8 → 4×4, attention at 4×4.
  config.model = ml_collections.ConfigDict(dict(
      ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.1,
      num_classes=0, resamp_with_conv=True,
  ))
  # DDPM's discretization: N steps, β linear from beta_start to beta_end.
  config.diffusion = ml_collections.ConfigDict(dict(
      num_steps=1000, beta_start=1e-4, beta_end=0.02,
  ))
  config.training = ml_collections.ConfigDict(dict(
      num_steps=1200,
      batch_size=128,  # global batch, split across all devices
      num_devices=0,  # 0: all devices
      # Several hosts that jax detects itself (TPU pods, SLURM, Open MPI); elsewhere name the run
      # with the DDPM_OT_* environment variables instead (README, 'Several hosts').
      distributed=False,
      lr=1e-3,  # Adam peak learning rate, reached linearly over warmup_steps
      warmup_steps=200,
      grad_clip=1.0,  # global-norm clipping (≤ 0: off)
      ema_decay=0.999,
      ema_warmup=True,  # decay min(ema_decay, (1+k)/(10+k)) at step k
      loss_type="discrete",  # 'discrete' (DDPM's N steps) or 'continuous' (VP-SDE time); the
      # samplers follow it (samplers.noise_schedule(schedule, loss_type))
      log_every=100,  # progress line and metrics.jsonl record
      checkpoint_every=500,
      keep_checkpoints=2,
      sample_every=600,  # EMA sample grid to <workdir>/grids/ (0: never)
      grid_samples=64,
      grid_sampler_steps=25,  # DDIM steps for the grids
      init_from_diffusers="",  # diffusers UNet2DModel folder/file to start from
  ))
  return config


def get_config() -> ml_collections.ConfigDict:
  config = network_config()
  config.experiment = "train_ddpm"
  config.sampling = ml_collections.ConfigDict(dict(
      sampler="ddim",  # 'ddim', 'ddpm', 'dpm_solver' or 'pf_ode' (ddpm_ot_jax.samplers)
      num_steps=50,  # network evaluations for ddim / dpm_solver ('ddpm' always takes all N)
      eta=0.0,  # DDIM's η (0: deterministic)
      order=3,  # dpm_solver: multistep order 1, 2 or 3 (Lu et al.: 2 for guided sampling)
      variant="dpmsolver++",  # dpm_solver: 'dpmsolver++' (x_0-prediction) or 'dpmsolver' (ε)
      num_samples=500,
      batch_size=250,
      grid_size=100,  # samples shown in samples.png
  ))
  config.evaluate = ml_collections.ConfigDict(dict(
      classifier=True,  # digits classifier: recognized_fraction, classifier_accuracy
      threshold=0.5,  # a sample is recognized when its top class probability ≥ threshold
      heldout_split="heldout",
      classifier_steps=1500,  # training steps of the digits classifier
  ))
  return config
