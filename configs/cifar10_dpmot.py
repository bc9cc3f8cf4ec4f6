"""DPM-OT at the paper's CIFAR-10 setting (GPU/TPU): the flagship configuration.

python scripts/main.py --config=configs/cifar10_dpmot.py \
    --config.data.root=/path/to/cifar10 \
    --config.evaluation.inception_weights=/path/to/pt_inception-2015-12-05-6726825d.pth \
    --config.training.init_from_diffusers=/path/to/ddpm-cifar10-32   # optional: no training

The DDPM CIFAR-10 UNet trained here (configs/cifar10_ddpm.py, 800k steps, resumable) or the
published google/ddpm-cifar10-32 weights imported as they are (training.init_from_diffusers:
no training step, the architecture from its config.json, the schedule config.diffusion,
fingerprinted by the weights file's path, size and mtime). DPM-OT maps noise onto half of
the test split (targets 'test[:5000]'); the other half is the FID/KID reference, which no
model or target has seen; the data floor and the memorization reference are 5000 training
images. The reference code's protocol (targets = the 10,000 test images, FID against the
training set) is --config.dpmot.target_split=test --config.evaluation.reference_split=train
(then the reference is the DDPM's training data). Switch step 9 with 10 reverse steps
(NFE 10) beside DDIM, DPM-Solver++(3M) and UniPC at 10 NFE, 3 draws of 10,000 samples.

Before anything is trained the run reads the CIFAR-10 folder, the Inception weights ("":
$FID_INCEPTION_WEIGHTS, the torch hub cache, ~/.cache/ddpm_ot_jax/) and the diffusers weights
if set; if any are missing it stops with one message naming each and where it looked.
"""
import ml_collections

from configs import cifar10_ddpm


def get_config() -> ml_collections.ConfigDict:
  config = cifar10_ddpm.network_config()
  config.experiment = "dpmot"
  config.dpmot = ml_collections.ConfigDict(dict(
      target_split="test[:5000]",  # the N targets y_j
      switch_index=9,  # M: the reference code restarts 10 levels from the end on CIFAR-10
      sampler="ddim",  # reverse steps from x_M: 'ddim', 'ddpm' or 'dpm_solver'
      eta=1.0,  # DDIM's η for those steps
      source="gaussian",  # 'gaussian' N(0, I) or 'uniform' U[0,1]^d (the reference code's)
      ot=ml_collections.ConfigDict(dict(
          num_iterations=50_000,  # cap (and cosine-decay horizon) of the potential's Adam
          batch_size=1024,  # source samples per iteration
          # Adam's step size on g: lr · iterations must exceed the range of the optimal g, which
          # grows with M and d (results: ot_converged_m*).
          learning_rate=0.05,
          error_eval_every=2000,  # iterations between χ² checks (stop when below threshold)
          chi2_threshold=2.5e-3,  # χ² of the cell masses vs 1/N that counts as converged
          # Source points per χ² check: noise ≈ √(2N) / (2 · 65536) = 7.6e-4 at N = 5000, a
          # third of the threshold; the check holds a 65536 × N float32 matrix (1.3 GB).
          error_batch_size=65_536,
          check_samples=1_000_000,  # fresh source points for the reported marginal error
          block_size=1024,  # targets per block of the argmax
      )),
  ))
  config.evaluation = ml_collections.ConfigDict(dict(
      methods=("ddim_10", "dpm_solver_pp_3m_10", "unipc_10", "dpm_ot_10"),
      spacings=ml_collections.ConfigDict(),  # every baseline's spacing tuned (validation draws)
      num_samples=10_000,  # images per draw of every row
      num_draws=3,  # independent draws per row (rows are mean ± std over them)
      batch_size=500,  # images per sampler call
      reference_split="test[5000:]",  # FID/KID reference: seen by no model and no target
      floor_split="train[:5000]",  # real non-target images: the data floor, novelty reference
      classifier_split="",  # training split of the digits classifier (features='classifier')
      tuning_split="",  # reference of the spacing choice ('': the targets)
      tuning_num_samples=2000,  # images per validation draw of the spacing choice
      max_novelty_images=5000,  # floor images used as the memorization reference
      features="inception",  # pytorch-fid's Inception-v3 pool3
      inception_weights="",  # "": $FID_INCEPTION_WEIGHTS, torch hub cache, ~/.cache/ddpm_ot_jax
      inception_width=1.0,  # channel scale of the Inception net (1.0: pytorch-fid's)
      inception_resize=299,  # its input size (299: pytorch-fid's)
      classifier_steps=0,  # training steps of the digits classifier (features='classifier')
      pr_k=3,  # k of the k-NN manifolds of precision / recall
      mmr_lambda=0.11,  # MMR's λ (features='classifier': MMR needs class probabilities)
      mmr_sweep=(0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4),
      solver_error_samples=0,  # x_T for the RMS-to-ODE diagnostic (0: off)
      solver_error_rtol=1e-5,  # tolerance of its adaptive PF-ODE reference
  ))
  return config
