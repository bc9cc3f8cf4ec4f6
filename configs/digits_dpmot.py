"""DPM-OT on scikit-learn's digits, end to end on CPU: the offline default of scripts/main.py.

python scripts/main.py                       # this config, workdir runs/digits_dpmot

Trains the digits DDPM (configs/digits_ddpm.py's network), diffuses the targets to the switch
step M, solves the semi-discrete OT from N(0, I_64) to those latents, and compares DPM-OT
with DDIM, DPM-Solver++(2M), DPM-Solver++(3M) and UniPC at 10 network evaluations, beside the
copy-machine and data-floor controls: 5 draws of 300 samples per row (mean ± std). The time spacing of
each baseline is fixed here to the one configs/digits_dpmot_full.py chose on its validation
draws; that config is the statistically solid version (1000 samples per draw, NFE 5–50, the
spacing tuned, DPM-OT at four switch steps).
"""
import ml_collections

from configs import digits_ddpm


def get_config() -> ml_collections.ConfigDict:
  config = digits_ddpm.network_config()
  config.experiment = "dpmot"
  config.dpmot = ml_collections.ConfigDict(dict(
      target_split="train[:897]",  # the N targets y_j (a slice of the DDPM's training split)
      # Switch step M: x_M = √ᾱ_M y + √(1 − ᾱ_M) ε. Index 9 (√((1 − ᾱ)/ᾱ) = 0.044) is the lowest
      # that leaves 10 reverse steps; the reference code's σ ≈ 0.014 on [0, 1] pixels would
      # be index ≈ 4.
      switch_index=9,
      sampler="ddim",  # reverse steps from x_M: 'ddim', 'ddpm' or 'dpm_solver'
      eta=1.0,  # DDIM's η for those steps (1: stochastic, like the reference's Langevin steps)
      source="gaussian",  # 'gaussian' N(0, I) or 'uniform' U[0,1]^d (the reference code's)
      ot=ml_collections.ConfigDict(dict(
          num_iterations=4000,  # cap (and cosine-decay horizon) of the potential's Adam
          batch_size=1024,  # source samples per iteration
          # Adam's step size on g. Adam moves each g_j by ≲ lr per step, so lr · iterations
          # must exceed the range of the optimal g (≈ 23 at M = 9 and ≈ 62 at M = 399 here).
          learning_rate=0.03,
          error_eval_every=1000,  # iterations between χ² checks (stop when below threshold)
          chi2_threshold=2.5e-3,  # χ² of the cell masses vs 1/N that counts as converged
          # Source points per χ² check (0: max(batch_size, 8N)). The estimate's noise is
          # ≈ √(2N) / (2 · error_batch_size); the check builds an error_batch_size × N matrix.
          error_batch_size=50_000,
          check_samples=200_000,  # fresh source points for the reported marginal error
          block_size=2048,  # targets per block of the argmax
      )),
  ))
  config.evaluation = ml_collections.ConfigDict(dict(
      # Rows ('ddpm', 'pf_ode', '<family>_<k>', 'dpm_ot_<k>', 'dpm_ot_<k>_m<M>'; see
      # experiments/dpmot.py); the copy machine and the data floor are always added.
      methods=("ddim_10", "dpm_solver_pp_2m_10", "dpm_solver_pp_3m_10", "unipc_10", "dpm_ot_10",
               "dpm_ot_10_m99"),
      # Time spacing per few-step method ('logSNR', 'time_uniform', 'time_quadratic'); a method
      # not listed is tuned on validation draws against tuning_split.
      spacings=ml_collections.ConfigDict(dict(
          ddim_10="time_uniform", dpm_solver_pp_2m_10="logSNR",
          dpm_solver_pp_3m_10="time_quadratic", unipc_10="time_uniform")),
      num_samples=300,  # images per draw of every row
      num_draws=5,  # independent draws per row (rows are mean ± std over them)
      batch_size=300,  # images per sampler call
      reference_split="heldout",  # FID/KID reference: seen by no model, classifier or target
      floor_split="train[1197:]",  # real non-target images: the data floor, novelty reference
      classifier_split="train[897:1197]",  # trains the digits classifier (features, MMR)
      tuning_split="",  # reference of the spacing choice ('': the targets)
      tuning_num_samples=300,  # images per validation draw of the spacing choice
      max_novelty_images=0,  # 0: all of floor_split as the memorization reference
      features="classifier",  # 'classifier' (digits) or 'inception' (RGB sets)
      inception_weights="",  # pytorch-fid weights file (features='inception')
      inception_width=1.0,  # channel scale of the Inception net (1.0: pytorch-fid's)
      inception_resize=299,  # its input size (299: pytorch-fid's)
      classifier_steps=600,  # training steps of the digits classifier
      pr_k=3,  # k of the k-NN manifolds of precision / recall
      mmr_lambda=0.11,  # a sample is mixed when ≥ 2 classes have softmax ≥ λ (DPM-OT's)
      mmr_sweep=(0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4),  # λ values of the MMR sweep keys
      solver_error_samples=0,  # x_T for the RMS-to-ODE diagnostic (0: off)
      solver_error_rtol=1e-5,  # tolerance of its adaptive PF-ODE reference
  ))
  return config
