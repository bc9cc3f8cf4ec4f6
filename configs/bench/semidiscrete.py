"""scripts/bench_semidiscrete.py: ott-jax (the library's solver) vs the DPM-OT reference
semi-discrete OT solver at the project's accuracy target.

  python scripts/bench_semidiscrete.py --config=configs/bench/semidiscrete.py \
      --config.problems=digits --config.source=uniform --config.num_seeds=5

Defaults are sized for a shared 2-core CPU (about 10 minutes); on an accelerator raise
digits.num_targets (≤ 1797), images.num_targets / images.side and the iteration caps.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.problems = "digits,images"  # comma-separated: digits, images
  config.source = "gaussian"  # 'gaussian' N(0, I) or 'uniform' U[0, 1]^d (the reference's own)
  config.init = "h0"  # common start: 'h0' (the reference's h = 0) or 'g0' (ott's g = 0)
  config.num_seeds = 3  # seeds 0 … num_seeds − 1; the lr sweep runs on seed 0
  # The judge: unbiased χ² of the cell masses (ott's estimator, semidiscrete.solve_potential's
  # target) on fixed fresh samples (one key per seed), checked every eval_every iterations.
  config.chi2_target = 2.5e-3
  config.eval_every = 10
  # Judge samples S; 0: the smallest multiple of 4096 with noise √(2N)/S ≤ chi2_target / 5
  # (the noise of the unbiased χ² at a perfect potential).
  config.eval_samples = 0
  config.block_size = 2048  # targets per block of the running argmax (judge and reference)

  # Targets. digits: the first num_targets of scikit-learn's 8×8 digits on [−1, 1] (d = 64).
  config.digits = ml_collections.ConfigDict(dict(num_targets=256))
  # images: smooth random RGB images side × side × 3 on [−1, 1] (fixed key).
  config.images = ml_collections.ConfigDict(dict(num_targets=256, side=8))

  # Ours: semidiscrete.solve_potential's ott-jax SemidiscreteSolver (Adam, cosine decay from
  # the lr to 0 over max_iterations, EMA of g), driven eval_every steps at a time.
  config.ott = ml_collections.ConfigDict(dict(
      learning_rates=(0.0125, 0.025, 0.05, 0.1),  # the sweep (units of g = 2h + ‖y‖²)
      max_iterations=1500,  # cap and cosine-decay horizon
      batch_size=1024,
      potential_ema=0.99,
  ))
  # The reference (DPM-OT ot_utils/optimal_transport.py, from AE-OT): Adam without bias
  # correction on the heights h, h re-centred, samples_factor · N source samples per step;
  # when ‖∇E‖ has not improved for more than `patience` steps and fewer than max_doublings
  # doublings happened, the sample count doubles and lr × lr_decay.
  config.reference = ml_collections.ConfigDict(dict(
      learning_rates=(0.003125, 0.00625, 0.0125, 0.025, 0.05, 0.1),  # the sweep (units of h); the authors' lr_ot: 0.1
      max_iterations=1500,
      samples_factor=10,
      chunk=4096,  # source samples per chunk (the authors' bat_size_sr)
      patience=50,
      max_doublings=3,
      lr_decay=0.8,
  ))
  # A sweep run stops once it has used this × the seconds of the fastest run that reached the
  # target so far (it can no longer be picked).
  config.sweep_abandon_factor = 2.0
  config.out = "bench_results/semidiscrete.json"
  return config
