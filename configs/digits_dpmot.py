"""DPM-OT on scikit-learn's digits, end to end on CPU: the offline default of scripts/main.py.

python scripts/main.py                       # this config, workdir runs/digits_dpmot
python scripts/main.py --config=configs/digits_dpmot.py --config.dpmot.switch_sweep='()'

Trains the digits DDPM (configs/digits_ddpm.py), diffuses the target set to the switch step
M, solves the semi-discrete OT from N(0, I_64) to those latents, samples every method of
`evaluation.methods` and writes the comparison table (comparison.md, results.json).
"""
import ml_collections

from configs import digits_ddpm


def get_config() -> ml_collections.ConfigDict:
  config = digits_ddpm.network_config()
  config.experiment = "dpmot"
  config.dpmot = ml_collections.ConfigDict(dict(
      target_split="train",  # the N targets y_j: 'train' (the model's data) or 'heldout'
      max_targets=0,  # 0: all of the split
      # Switch step M: x_M = √ᾱ_M y + √(1 − ᾱ_M) ε. The reference code's σ ≈ 0.014 on [0, 1]
      # pixels (0.028 on [−1, 1]) sits at index ≈ 4 here; index 9 (√((1 − ᾱ)/ᾱ) = 0.044) is the
      # lowest that leaves room for 10 reverse steps, so NFE = 10 as in the paper.
      switch_index=9,
      sampler="ddim",  # reverse steps from x_M: 'ddim', 'ddpm' or 'dpm_solver'
      eta=1.0,  # DDIM's η (1: ancestral-like noise, as the reference's Langevin steps)
      source="gaussian",  # 'gaussian' N(0, I) or 'uniform' U[0,1]^d (the reference code's)
      ot=ml_collections.ConfigDict(dict(
          # Adam with cosine decay over num_iterations (DESIGN.md: spreads mass evenly), stopped
          # at the first χ² check below chi2_threshold.
          num_iterations=4000,
          batch_size=1024,
          # Adam moves each g_j by ≲ lr per step, so lr · num_iterations / 2 caps how far g
          # travels; the optimal g's range grows with M (digits: ≈ 23 at M = 9, 62 at M = 399).
          # Measured with 50k-point checks: 0.03 converges within 4000 iterations at M = 9, 49,
          # 99 and 399; 0.01 stalls at χ² 3.6e-3 (M = 99) and 3.6e-2 (M = 399).
          learning_rate=0.03,
          error_eval_every=1000,
          chi2_threshold=2.5e-3,  # stop once the χ² of cell masses vs 1/N is below this
          # Source points per χ² check (0: the solver's default max(batch_size, 8N)). The
          # estimate's noise is ≈ √(2N) / (2 · error_batch_size) (4 repeats): 5.5e-4 here for
          # N = 1497, a fifth of the threshold (the default 8N gives 2.3e-3, so 'converged' would
          # be a coin flip). ott-jax builds an error_batch_size × N cost matrix per check
          # (float32: 4·B·N bytes, 300 MB here; N = 10⁴ configs set their own).
          error_batch_size=50_000,
          check_samples=200_000,  # fresh noise for the reported marginal error
          block_size=2048,  # targets per block of the argmax
      )),
      # M values of the FID-vs-memorization sweep (() = off); at M = switch_index the main
      # potential is reused. Four points keep the default run within 10 minutes on 2 cores.
      switch_sweep=(9, 49, 99, 399),
      sweep_num_steps=10,
      sweep_ot_iterations=4000,
  ))
  config.evaluation = ml_collections.ConfigDict(dict(
      methods=("ddpm", "ddim_10", "ddim_50", "dpm_solver_10", "dpmot_10", "pf_ode"),
      num_samples=300,  # per method (= the held-out split's size, so the floor is comparable)
      batch_size=300,
      floor_split="heldout",  # real images outside the training set: the data floor row
      novelty_split="heldout",  # real images outside the targets: the memorization reference
      max_novelty_images=0,  # 0: all of novelty_split
      features="classifier",  # 'classifier' (digits) or 'inception' (RGB sets)
      inception_weights="",  # pytorch-fid weights file (features='inception')
      inception_width=1.0,  # channel scale of the Inception net (1.0: pytorch-fid's; tests: 1/16)
      inception_resize=299,  # its input size (299: pytorch-fid's)
      classifier_steps=600,  # training steps of the digits classifier (features='classifier')
      pr_k=3,
      mmr_lambda=0.11,
      mmr_sweep=(0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4),
  ))
  return config
