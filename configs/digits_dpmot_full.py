"""DPM-OT on digits, the statistically solid version (1 h 34 min on 2 shared CPU cores).

python scripts/main.py --config=configs/digits_dpmot_full.py

The default run's setup (configs/digits_dpmot.py) with every few-step baseline at 5, 10, 20
and 50 network evaluations, its time spacing chosen per NFE on validation draws against the
targets (never the reported reference), DPM-OT at four switch steps M, 5 draws of 1000
samples per row, and the RMS distance of each sampler to the PF-ODE solution from the same
x_T (solver_error.md). DDPM's 1000 ancestral steps and the adaptive PF-ODE (~600 NFE) would
cost more than all other rows together at 5 × 1000 samples on 2 cores; add them with
--config.evaluation.methods='("ddpm", "pf_ode", ...)' where there is a GPU.
"""
import ml_collections

from configs import digits_dpmot

FAMILIES = ("ddim", "dpm_solver", "dpm_solver_pp_2m", "dpm_solver_pp_3m", "unipc")
NFES = (5, 10, 20, 50)
SWITCH_STEPS = (9, 49, 99, 399)


def get_config() -> ml_collections.ConfigDict:
  config = digits_dpmot.get_config()
  config.evaluation.methods = (
      tuple(f"{family}_{nfe}" for family in FAMILIES for nfe in NFES)
      + tuple(f"dpm_ot_10_m{m}" for m in SWITCH_STEPS))
  config.evaluation.spacings = ml_collections.ConfigDict()  # every spacing tuned
  config.evaluation.num_samples = 1000
  config.evaluation.batch_size = 1000
  config.evaluation.tuning_num_samples = 500
  config.evaluation.solver_error_samples = 200
  return config
