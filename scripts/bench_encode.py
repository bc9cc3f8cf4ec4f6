r"""Benchmark: probability-flow encoding with exact scores (float64, Tsit5, rtol=atol=1e-8).

  python scripts/bench_encode.py [--out=bench_results/encode.json]

Cases: 1000 points of a Gaussian in d=1000 (Theorem 3.1's score; error against its closed
form) and 2500 points of a 5-component Gaussian mixture in d=2 (exact score; error against a
Dopri8 solve at rtol = atol = 1e-12). Times exclude compilation (one warm-up call on the
same shapes) and are the median of --repeats runs. Writes JSON and prints a table.
"""
from __future__ import annotations

import os
import platform
import statistics
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ddpm_ot_jax import flow  # pylint: disable=g-import-not-at-top,wrong-import-position
from ddpm_ot_jax import gaussian  # pylint: disable=g-import-not-at-top,wrong-import-position
from ddpm_ot_jax import gmm  # pylint: disable=g-import-not-at-top,wrong-import-position
from ddpm_ot_jax import sde  # pylint: disable=g-import-not-at-top,wrong-import-position
from ddpm_ot_jax.experiments import common  # pylint: disable=g-import-not-at-top,wrong-import-position

_OUT = flags.DEFINE_string("out", "bench_results/encode.json", "Where to write the JSON.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per case (median reported).")


def _time(fn, x, repeats):
  out = fn(x)
  jax.block_until_ready(out)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    out = jax.block_until_ready(fn(x))
    times.append(time.perf_counter() - start)
  return statistics.median(times), out


def main(_):
  jax.config.update("jax_enable_x64", True)
  schedule = sde.ConstantSchedule(t_max=16.0)
  options = flow.SolverOptions(rtol=1e-8, atol=1e-8)
  key = jax.random.PRNGKey(0)
  rows = []

  mean, cov = gaussian.random_gaussian(key, 1000)
  x = mean + jax.random.normal(key, (1000, 1000)) @ gaussian.sqrtm_spd(cov)
  enc = jax.jit(lambda x: flow.encode(schedule, gaussian.score_fn(schedule, mean, cov), x, options=options))
  seconds, out = _time(enc, x, _REPEATS.value)
  err = float(jnp.max(jnp.abs(out.x - gaussian.encoder_at(x, mean, cov, 16.0))))
  rows.append(dict(case="gaussian d=1000, 1000 points", seconds=seconds, nfe_mean=float(out.nfe.mean()),
                   points_per_second=1000 / seconds, max_abs_err=err))

  mixture = gmm.random_mixture(key, 2, 5)
  x = gmm.sample(mixture, key, 2500)
  enc = jax.jit(lambda x: flow.encode(schedule, gmm.score_fn(mixture, schedule), x, options=options))
  seconds, out = _time(enc, x, _REPEATS.value)
  # No closed form for a mixture: the reference is an independent, much tighter solve.
  tight = flow.SolverOptions(solver="dopri8", rtol=1e-12, atol=1e-12)
  reference = flow.encode(schedule, gmm.score_fn(mixture, schedule), x, options=tight)
  err = float(jnp.max(jnp.abs(out.x - reference.x)))
  rows.append(dict(case="gmm d=2 K=5, 2500 points", seconds=seconds, nfe_mean=float(out.nfe.mean()),
                   points_per_second=2500 / seconds, max_abs_err=err))

  report = dict(device=str(jax.devices()[0]), cpu_count=os.cpu_count(), python=platform.python_version(),
                jax=jax.__version__, rows=rows)
  common.write_json(_OUT.value, report)
  print(f"{'case':32s} {'seconds':>9s} {'NFE/point':>10s} {'points/s':>10s} {'max|err|':>10s}")
  for r in rows:
    print(f"{r['case']:32s} {r['seconds']:9.3f} {r['nfe_mean']:10.1f} {r['points_per_second']:10.0f} {r['max_abs_err']:10.2e}")
  print(f"(device {report['device']}, {report['cpu_count']} cores; JSON in {_OUT.value})")


if __name__ == "__main__":
  app.run(main)
