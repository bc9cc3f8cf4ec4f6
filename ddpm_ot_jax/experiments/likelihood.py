r"""Experiment `likelihood`: negative log-likelihood in bits/dim through the probability-flow ODE.

Two parts, each run when its config block is present:

**A DDPM on images** (config.likelihood; configs/digits_likelihood.py, cifar10_likelihood.py).

1. Inputs first: the evaluation split `likelihood.split` of config.data (its integer pixel
   values k, `data.pixel_levels` with the dataset's number of levels L = `data.NUM_LEVELS`:
   17 for the digits' 0..16, 256 for 8-bit images), and the diffusers weights when
   training.init_from_diffusers is set (used as they are, no training).
2. Model: otherwise the DDPM of config.{model, diffusion, training} is trained on the 'train'
   split into <workdir>/model-<fingerprint>/ (resumable; fingerprint over seed, data, model, diffusion, training,
   the same as the dpmot experiment's model stage) and its EMA parameters are used.
3. Bits/dim in batches of `likelihood.batch_size` (a short last batch is padded to that size
   with repeated rows: one compilation), split along the 'data' axis of the devices (padded
   to a multiple of their count), one progress line per batch. Image i gets its own
   key fold_in(PRNGKey(seed), LIKELIHOOD_STREAM, i), so its value does not depend on the batch
   size or the device count: its uniform dequantization y = 2(k + u)/L − 1
   (`flow.dequantize`), and its Hutchinson probes. `flow.log_likelihood` solves the PF-ODE on
   the samplers' view of the network's schedule from DDPM's first step t = 1/N to t = 1 with
   the prior N(0, I), and `flow.bits_per_dim` turns log p(y) into
   bpd = (−log p(y) + D log(L/2)) / (D log 2) (score_sde's convention: + 7 for L = 256).
   Each finished batch is kept in <workdir>/likelihood-<fingerprint>/ (fingerprint over a digest of the
   parameters, the view, data, likelihood block and seed), so an interrupted run resumes.

Results: bits_per_dim (mean over images), bits_per_dim_stderr (their standard deviation /
√n: data, dequantization and Hutchinson noise together), nfe_mean, nfe_max, num_images,
num_dims, num_levels, params, train_steps, imported_weights (0/1), num_devices,
batches_reused, likelihood_seconds, images_per_second; per-image values in bits_per_dim.npz.

**Exact scores** (config.exact; in float64, switched on for this part only). For each case a
density whose log p0 has a closed form, points drawn from it, and the log-likelihood by the
same `flow.log_likelihood` (exact divergence, d JVPs) on the paper's OU schedule (β = 2,
`samplers.ContinuousTimeSchedule`), from OU time exact.t_start to exact.t_end (the prior gap
is O(e^{−t_end})):

* gaussian            N(a0, Σ0) in exact.gaussian_dims (gaussian.random_gaussian), exact score;
* gmm                 a random Gaussian mixture (gmm.random_mixture), exact score, gmm.log_prob;
* perturbed_gaussian  (∇u)⁻¹#N(0, I) of the perturbed_gaussian experiment
                      (densities.default_perturbation(exact.perturbation_epsilon)): p0 in
                      closed form, score from the Fokker–Planck grid (`fokker_planck`);
* quartic_2d          one random density of the synthetic_2d experiment's family
                      (densities.random_quartic_mixture): p0 in closed form (Z by quadrature),
                      score from the Fokker–Planck grid.

Results per case c: c_nll_ode and c_nll_exact (mean −log p0 over the points, nats),
c_max_abs_diff and c_median_abs_diff (over the points, of |log p_ode − log p0|), c_nfe_mean,
c_dims. For the two grid cases the difference is the grid tables' error (their own log p at
t = 0 differs from the closed form by about as much), not the ODE's.
"""
from __future__ import annotations

import functools
import hashlib
import math
import os
import time
from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ddpm_ot_jax import data
from ddpm_ot_jax import densities
from ddpm_ot_jax import flow
from ddpm_ot_jax import fokker_planck
from ddpm_ot_jax import gaussian
from ddpm_ot_jax import gmm
from ddpm_ot_jax import samplers
from ddpm_ot_jax import sde
from ddpm_ot_jax import trainer
from ddpm_ot_jax.experiments import common
from ddpm_ot_jax.experiments import stages

# The config fields this experiment reads (scripts/main.py rejects any other field or override).
CONFIG_FIELDS = ("data", "model", "diffusion", "training", "likelihood", "exact")

LIKELIHOOD_STREAM, EXACT_STREAM = 20, 21  # streams derived from config.seed
EXACT_CASES = ("gaussian", "gmm", "perturbed_gaussian", "quartic_2d")


# ----------------------------------------------------------------------------------------
# A DDPM on images.
# ----------------------------------------------------------------------------------------


def _check_likelihood_config(lc: ml_collections.ConfigDict) -> None:
  if lc.divergence not in flow.DIVERGENCES:
    raise ValueError(f"likelihood.divergence must be one of {flow.DIVERGENCES}, got "
                     f"{lc.divergence!r}.")
  if lc.probe not in flow.PROBES:
    raise ValueError(f"likelihood.probe must be one of {flow.PROBES}, got {lc.probe!r}.")
  if not (isinstance(lc.num_probes, int) and lc.num_probes >= 1):
    raise ValueError(f"likelihood.num_probes must be a positive int, got {lc.num_probes!r}.")
  if lc.batch_size < 1 or lc.max_images < 0:
    raise ValueError(f"likelihood.batch_size must be ≥ 1 and max_images ≥ 0 (0: all), got "
                     f"{lc.batch_size}, {lc.max_images}.")
  flow.SolverOptions(**lc.solver)  # a bad solver name or tolerance fails here, before training


def _load(config: ml_collections.ConfigDict, split: str) -> data.ImageDataset:
  data_config = config.data
  return data.load_dataset(data_config.name, split, data_config.root or None,
                           data_config.resolution or None)


def _trained_model(config: ml_collections.ConfigDict, workdir: str, dataset: data.ImageDataset
                   ) -> tuple[samplers.Network, int]:
  """(the EMA network, train steps): the DDPM of config trained on `dataset` into
  <workdir>/model-<fingerprint>/ (resumable)."""
  fingerprint = stages.fingerprint(dict(seed=config.seed, data=config.data, model=config.model,
                                        diffusion=config.diffusion, training=config.training))
  directory = stages.stage_dir(workdir, "model", fingerprint)
  result = trainer.train_ddpm(config, os.path.join(directory, "checkpoints"), dataset,
                              hooks=common.training_hooks(directory))
  return result.network, int(jax.device_get(result.state.step))


def _imported_model(config: ml_collections.ConfigDict, image_shape: tuple[int, int, int]
                    ) -> tuple[samplers.Network, int]:
  """The diffusers UNet at training.init_from_diffusers, used as it is (`trainer.place_network`:
  the first training.num_devices devices, the view of config.diffusion and training.loss_type)."""
  model, params = trainer.model_from_config(config, image_shape)
  return trainer.place_network(config, model, params), 0


def _stderr(values: np.ndarray) -> float:
  """Standard error of the mean: std (n − 1 in the denominator) / √n; NaN for one value."""
  return float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else math.nan


def _params_digest(params: Any) -> str:
  """SHA-256 of the parameters' bytes (a replicated array's local copy)."""
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves(params):
    local = leaf.addressable_data(0) if isinstance(leaf, jax.Array) else leaf
    digest.update(np.ascontiguousarray(np.asarray(local)).tobytes())
  return digest.hexdigest()


@functools.partial(jax.jit, static_argnames=("view", "t_start", "options", "num_levels",
                                             "divergence", "num_probes", "probe"))
def _bits_per_dim_batch(eps_fn, levels, indices, key, *, view, t_start, options, num_levels,
                        divergence, num_probes, probe):
  """(bits/dim, NFE, ok) of the images with pixel values `levels` (B, H, W, C) and indices
  `indices` (B,): image i dequantized and probed with the keys of fold_in(key, i)."""
  keys = jax.vmap(lambda i: jax.random.split(jax.random.fold_in(key, i)))(indices)
  y = jax.vmap(lambda k, pixels: flow.dequantize(k, pixels, num_levels))(keys[:, 0], levels)
  result = flow.log_likelihood(view, samplers.score_fn_from_eps(eps_fn, view), y, t_start,
                               options=options, divergence=divergence, keys=keys[:, 1],
                               num_probes=num_probes, probe=probe)
  dims = math.prod(levels.shape[1:])
  return flow.bits_per_dim(result.log_prob, dims, num_levels), result.nfe, result.ok


def _image_bits_per_dim(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Part 1 of the module docstring; returns its results."""
  lc = config.likelihood
  evaluation = _load(config, lc.split)
  num_levels = data.NUM_LEVELS[config.data.name]
  levels = data.pixel_levels(evaluation.images, num_levels)
  if lc.max_images:
    levels = levels[:lc.max_images]
  imported = bool(config.training.init_from_diffusers)
  if imported:
    network, train_steps = _imported_model(config, evaluation.image_shape)
  else:
    if config.model.num_classes:
      raise ValueError("the likelihood is that of an unconditional model: set "
                       f"model.num_classes=0 (got {config.model.num_classes}).")
    network, train_steps = _trained_model(config, workdir, _load(config, "train"))
  model, params, view, mesh = network.model, network.params, network.view, network.mesh
  if getattr(model, "num_classes", 0):
    raise ValueError("the diffusers model is class-conditional; the likelihood needs an "
                     "unconditional one.")
  fingerprint = stages.fingerprint(dict(params=_params_digest(params), view=repr(view),
                                        data=config.data, likelihood=lc, seed=config.seed))
  folder = stages.stage_dir(workdir, "likelihood", fingerprint)
  eps_fn = samplers.model_eps_fn(model.apply, params)
  batch_fn = functools.partial(
      _bits_per_dim_batch, view=view, t_start=float(samplers.time_of_index(view, 0)),
      options=flow.SolverOptions(**lc.solver), num_levels=num_levels, divergence=lc.divergence,
      num_probes=lc.num_probes, probe=lc.probe)
  key = jax.random.fold_in(jax.random.PRNGKey(config.seed), LIKELIHOOD_STREAM)
  num_images, dims = len(levels), int(np.prod(levels.shape[1:]))
  batch_size = min(lc.batch_size, num_images)
  starts = range(0, num_images, batch_size)
  logging.info("Bits/dim of %d %s %s images (D = %d, L = %d levels) with %s divergence, "
               "batches of %d on %d device(s); batches kept in %s", num_images,
               config.data.name, lc.split, dims, num_levels, lc.divergence, batch_size,
               mesh.devices.size, folder)
  bpd, nfe, reused, stopwatch = [], [], 0, common.Stopwatch()
  for b, start in enumerate(starts):
    index = np.arange(start, min(start + batch_size, num_images), dtype=np.int32)

    def compute(index=index):
      full = np.resize(index, batch_size)  # a short last batch repeats its rows: one compile
      values, counts, ok = batch_fn(eps_fn, samplers.shard_rows(levels[full], mesh),
                                    samplers.shard_rows(full, mesh), key)
      ok = samplers.gather_rows(ok, len(index))
      if not ok.all():
        raise ValueError(
            f"the PF-ODE solve of {int((~ok).sum())} image(s) of batch {b} did not finish "
            f"within likelihood.solver.max_steps={lc.solver.max_steps} steps; raise it or "
            "loosen likelihood.solver.rtol / atol.")
      return {"bits_per_dim": samplers.gather_rows(values, len(index)),
              "nfe": samplers.gather_rows(counts, len(index))}

    arrays, cached = stages.cached_arrays(os.path.join(folder, f"batch-{b:05d}.npz"), fingerprint, compute)
    reused += int(cached)
    bpd.append(arrays["bits_per_dim"])
    nfe.append(arrays["nfe"])
    done, seconds = int(index[-1]) + 1, stopwatch.seconds()
    so_far = np.concatenate(bpd)
    logging.info("%s batch %d/%d%s: %d/%d images, %.4f ± %.4f bits/dim so far, NFE %.0f, "
                 "%.1f s, ETA %.0f s", common.progress_bar(b + 1, len(starts)), b + 1,
                 len(starts), " (reused)" if cached else "", done, num_images, so_far.mean(),
                 _stderr(so_far), arrays["nfe"].mean(), seconds,
                 seconds / done * (num_images - done))
  bpd, nfe = np.concatenate(bpd), np.concatenate(nfe)
  seconds = stopwatch.seconds()
  common.save_npz(os.path.join(workdir, "bits_per_dim.npz"), bits_per_dim=bpd, nfe=nfe)
  return {
      "bits_per_dim": float(bpd.mean()),
      "bits_per_dim_stderr": _stderr(bpd),
      "nfe_mean": float(nfe.mean()),
      "nfe_max": int(nfe.max()),
      "num_images": num_images,
      "num_dims": dims,
      "num_levels": num_levels,
      "params": int(sum(np.size(leaf) for leaf in jax.tree.leaves(params))),
      "train_steps": train_steps,
      "imported_weights": int(imported),
      "num_devices": int(mesh.devices.size),
      "batches_reused": reused,
      "likelihood_seconds": seconds,
      "images_per_second": num_images / seconds,
  }


# ----------------------------------------------------------------------------------------
# Exact scores.
# ----------------------------------------------------------------------------------------


def _grid_spec(ec: ml_collections.ConfigDict) -> fokker_planck.GridSpec:
  return fokker_planck.GridSpec(grid_size=ec.grid_size, num_time_steps=ec.num_time_steps,
                     table_size=ec.table_size, t_max=ec.t_end)


def _grid_score(log_density: fokker_planck.LogDensity, params: list, log_weights: np.ndarray,
                ec: ml_collections.ConfigDict) -> sde.ScoreFn:
  """The Fokker–Planck grid score of p0 = Σ_k w_k exp(log_density(params_k, ·))."""
  tables, info = fokker_planck.solve(log_density, params, log_weights, _grid_spec(ec))
  if np.any(np.abs(info.mass - 1.0) > 1e-6):
    raise ValueError(f"a component is not contained in the grid domain (masses {info.mass}).")
  return fokker_planck.score_fn(tables)


def exact_case(case: str, key: jax.Array, ec: ml_collections.ConfigDict,
               view: samplers.NoiseSchedule) -> tuple[sde.ScoreFn, Callable, jax.Array]:
  """(score_fn on `view`, log p0 of one point, exact.num_points samples of p0) of a case."""
  k_density, k_points = jax.random.split(key)
  n = ec.num_points
  if case == "gaussian":
    mean, cov = gaussian.random_gaussian(k_density, ec.gaussian_dims)
    x = mean + jax.random.normal(k_points, (n, ec.gaussian_dims)) @ gaussian.sqrtm_spd(cov)
    return (gaussian.score_fn(view, mean, cov),
            lambda xi: gaussian.log_prob(xi, mean, cov), x)
  if case == "gmm":
    mixture = gmm.random_mixture(k_density, ec.gmm_dims, ec.gmm_components)
    return gmm.score_fn(mixture, view), functools.partial(gmm.log_prob, mixture), gmm.sample(
        mixture, k_points, n)
  if case == "perturbed_gaussian":
    perturbed = densities.default_perturbation(ec.perturbation_epsilon)
    x, _ = densities.sample_perturbed(perturbed, k_points, n)
    score = _grid_score(densities.log_prob_perturbed, [perturbed], np.zeros(1), ec)
    return score, functools.partial(densities.log_prob_perturbed, perturbed), x
  if case == "quartic_2d":
    mixture = densities.random_quartic_mixture(k_density, grid_size=ec.grid_size)
    k = mixture.num_components
    score = _grid_score(densities.log_prob, densities.components(mixture),
                        np.full(k, -math.log(k)), ec)
    return score, functools.partial(densities.log_prob, mixture), densities.sample(
        mixture, k_points, n)
  raise ValueError(f"Unknown exact case {case!r} in exact.cases; choose from {EXACT_CASES}.")


def _exact_likelihoods(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Part 2 of the module docstring, in float64; returns its results."""
  exact_config = config.exact
  unknown = [c for c in exact_config.cases if c not in EXACT_CASES]
  if unknown:
    raise ValueError(f"exact.cases has {unknown}; choose from {EXACT_CASES}.")
  if not 0.0 < exact_config.t_start < exact_config.t_end:
    raise ValueError(f"need 0 < exact.t_start < exact.t_end, got {exact_config.t_start}, "
                     f"{exact_config.t_end}.")
  if exact_config.num_points < 1:
    raise ValueError(f"exact.num_points must be ≥ 1, got {exact_config.num_points}.")
  options = flow.SolverOptions(**exact_config.solver)
  results: dict[str, Any] = {}
  with jax.enable_x64(True):
    view = samplers.ContinuousTimeSchedule(sde.ConstantSchedule(2.0, float(exact_config.t_end)))
    for i, case in enumerate(exact_config.cases):
      start = time.perf_counter()
      key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(config.seed), EXACT_STREAM), i)
      score, log_prob, x = exact_case(case, key, exact_config, view)
      ode = flow.log_likelihood(view, score, jnp.asarray(x, jnp.float64), exact_config.t_start,
                                options=options)
      if not bool(ode.ok.all()):
        raise ValueError(f"exact case {case}: the PF-ODE solve did not finish within "
                         f"exact.solver.max_steps={options.max_steps}; raise it.")
      exact = jax.vmap(log_prob)(x)
      diff = np.abs(np.asarray(ode.log_prob - exact))
      results.update({
          f"{case}_nll_ode": -float(ode.log_prob.mean()),
          f"{case}_nll_exact": -float(exact.mean()),
          f"{case}_max_abs_diff": float(diff.max()),
          f"{case}_median_abs_diff": float(np.median(diff)),
          f"{case}_nfe_mean": float(ode.nfe.mean()),
          f"{case}_dims": int(x.shape[1]),
      })
      logging.info("exact %s (d = %d, %d points): −log p ODE %.8f, exact %.8f, max |diff| "
                   "%.2e, NFE %.0f, %.1f s", case, x.shape[1], len(x),
                   results[f"{case}_nll_ode"], results[f"{case}_nll_exact"], diff.max(),
                   ode.nfe.mean(), time.perf_counter() - start)
  return results


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """The exact-score cases (config.exact) and the DDPM's bits/dim (config.likelihood)."""
  if "exact" not in config and "likelihood" not in config:
    raise ValueError("a likelihood config needs a `likelihood` block (a DDPM on images), an "
                     "`exact` block (exact scores), or both.")
  stopwatch = common.Stopwatch()
  results: dict[str, Any] = {}
  if "likelihood" in config:  # the user's inputs are checked before any work
    _check_likelihood_config(config.likelihood)
    data_config = config.data
    data.check_dataset(data_config.name, config.likelihood.split, data_config.root or None,
                       data_config.resolution or None)
  if "exact" in config:
    results.update(_exact_likelihoods(config))
  if "likelihood" in config:
    results.update(_image_bits_per_dim(config, workdir))
  results["seconds"] = stopwatch.seconds()
  return results
