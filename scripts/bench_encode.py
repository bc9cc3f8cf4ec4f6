r"""Benchmark: probability-flow encoding with exact scores (float64, Tsit5, rtol=atol=1e-8).

  python scripts/bench_encode.py [--config=configs/bench/encode.py] [--config.repeats=5]

Reads configs/bench/encode.py (ml_collections, `--config.KEY=VALUE` overrides, as
scripts/main.py). Cases: 1000 points of a Gaussian in d=1000 (Theorem 3.1's score; error
against its closed form) and 2500 points of a 5-component Gaussian mixture in d=2 (exact
score; error against a Dopri8 solve at rtol = atol = 1e-12); sizes in config.gaussian and
config.gmm. Times exclude compilation (one warm-up call on the same shapes) and are the
median of config.repeats runs. Writes config.out (JSON) and prints a table.
"""
from __future__ import annotations

import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO)
from ddpm_ot_jax import flow  # pylint: disable=g-import-not-at-top,wrong-import-position
from ddpm_ot_jax import gaussian  # pylint: disable=g-import-not-at-top,wrong-import-position
from ddpm_ot_jax import gmm  # pylint: disable=g-import-not-at-top,wrong-import-position
from ddpm_ot_jax import sde  # pylint: disable=g-import-not-at-top,wrong-import-position
from ddpm_ot_jax.experiments import common  # pylint: disable=g-import-not-at-top,wrong-import-position

DEFAULT_CONFIG = os.path.join(_REPO, "configs", "bench", "encode.py")


def _time(fn, x, repeats):
  out = fn(x)
  jax.block_until_ready(out)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    out = jax.block_until_ready(fn(x))
    times.append(time.perf_counter() - start)
  return statistics.median(times), out


def run(config) -> dict:
  """The benchmark for a config of configs/bench/encode.py; returns the JSON dict."""
  if config.repeats < 1:
    raise ValueError(f"config.repeats must be ≥ 1, got {config.repeats}.")
  jax.config.update("jax_enable_x64", True)
  schedule = sde.ConstantSchedule(t_max=16.0)
  options = flow.SolverOptions(rtol=1e-8, atol=1e-8)
  key = jax.random.PRNGKey(0)
  rows = []

  dim, n = config.gaussian.dim, config.gaussian.num_points
  mean, cov = gaussian.random_gaussian(key, dim)
  x = mean + jax.random.normal(key, (n, dim)) @ gaussian.sqrtm_spd(cov)
  enc = jax.jit(lambda x: flow.encode(schedule, gaussian.score_fn(schedule, mean, cov), x, options=options))
  seconds, out = _time(enc, x, config.repeats)
  err = float(jnp.max(jnp.abs(out.x - gaussian.encoder_at(x, mean, cov, 16.0))))
  rows.append(dict(case=f"gaussian d={dim}, {n} points", seconds=seconds, nfe_mean=float(out.nfe.mean()),
                   points_per_second=n / seconds, max_abs_err=err))

  dim, k, n = config.gmm.dim, config.gmm.num_components, config.gmm.num_points
  mixture = gmm.random_mixture(key, dim, k)
  x = gmm.sample(mixture, key, n)
  enc = jax.jit(lambda x: flow.encode(schedule, gmm.score_fn(mixture, schedule), x, options=options))
  seconds, out = _time(enc, x, config.repeats)
  # No closed form for a mixture: the reference is an independent, much tighter solve.
  tight = flow.SolverOptions(solver="dopri8", rtol=1e-12, atol=1e-12)
  reference = flow.encode(schedule, gmm.score_fn(mixture, schedule), x, options=tight)
  err = float(jnp.max(jnp.abs(out.x - reference.x)))
  rows.append(dict(case=f"gmm d={dim} K={k}, {n} points", seconds=seconds, nfe_mean=float(out.nfe.mean()),
                   points_per_second=n / seconds, max_abs_err=err))

  return dict(device=str(jax.devices()[0]), cpu_count=os.cpu_count(), python=platform.python_version(),
              jax=jax.__version__, rows=rows)


def main(argv) -> None:
  del argv  # only the program name: `cli.flags_parser` refuses any other argument
  import cli  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value
  try:
    report = run(config)
  except ValueError as e:
    cli.fail(str(e))
  common.write_json(config.out, report)
  rows = report["rows"]
  print(f"{'case':32s} {'seconds':>9s} {'NFE/point':>10s} {'points/s':>10s} {'max|err|':>10s}")
  for r in rows:
    print(f"{r['case']:32s} {r['seconds']:9.3f} {r['nfe_mean']:10.1f} {r['points_per_second']:10.0f} {r['max_abs_err']:10.2e}")
  print(f"(device {report['device']}, {report['cpu_count']} cores; JSON in {config.out})")


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  import cli  # pylint: disable=g-import-not-at-top  # scripts/ is first on sys.path
  _CONFIG = cli.define_config_flag(DEFAULT_CONFIG, "Path to a config file in configs/bench/.")
  app.run(main, flags_parser=cli.flags_parser(DEFAULT_CONFIG))
