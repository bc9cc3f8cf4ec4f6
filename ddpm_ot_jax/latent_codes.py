"""Images ↔ latent codes through a trained DDPM's deterministic encoder and decoder.

Khrulkov et al. (2022), Sec. 3: the DDPM encoder E maps an image x_0 to the code
y = E(x_0) = x_T by the probability-flow ODE (Eq. 6) run forward from step 0 to N − 1; the
decoder D runs it backwards, D(y) = x_0. Two discretizations are used (`samplers`):

* 'ode'  (encoders) / 'pf_ode' (decoders): the PF-ODE solved adaptively with diffrax;
* 'ddim': DDIM inversion (encoder) and DDIM with η = 0 (decoder) on the same `ddim_steps`
  grid: the paper's encoder.

Every function works in chunks of `batch_size` rows split across the model's mesh
(`samplers.shard_rows`, padded to a multiple of the devices) and gathers the rows back
(`samplers.gather_rows`).
"""
from __future__ import annotations

import dataclasses
import time

import jax.numpy as jnp
import numpy as np

from ddpm_ot_jax import flow
from ddpm_ot_jax import samplers
from ddpm_ot_jax.model_sources import LoadedModel

ENCODERS = ("ode", "ddim")
DECODERS = ("ddim", "pf_ode")


@dataclasses.dataclass
class Codes:
  """codes y_i = E(x_i); reconstructions D(y_i) with the matching decoder (None when not
  computed); network evaluations of the encoder and of the decoder (per image, last chunk);
  seconds: wall time of encoding and decoding."""

  codes: np.ndarray
  reconstructions: np.ndarray | None
  nfe_encode: int
  nfe_decode: int
  seconds: float


def encode_images(loaded: LoadedModel, images: np.ndarray, method: str, batch_size: int,
                  ddim_steps: int, options: flow.SolverOptions,
                  labels: np.ndarray | None = None, round_trip: bool = False) -> Codes:
  """Codes y = E(x) of `images` (N, H, W, C) in [−1, 1] under `method`:

  * 'ode': the PF-ODE encoder from step 0 to N − 1 (`samplers.ode_encode`, adaptive, solver
    `options`); decoder: the same ODE backwards (`samplers.pf_ode`);
  * 'ddim': DDIM inversion with `ddim_steps` steps (`samplers.ddim_invert`); decoder: DDIM
    with η = 0 on the same grid (`samplers.ddim`).

  With `round_trip` the codes are decoded back, D(E(x)) (as `samplers.round_trip` does). A
  class-conditional model encodes each image with its label (`labels`, (N,)).
  """
  if method not in ENCODERS:
    raise ValueError(f"Unknown encoder {method!r}; choose one of {ENCODERS}.")
  codes, recons, nfe_encode, nfe_decode = [], [], 0, 0
  start = time.perf_counter()
  for lo in range(0, len(images), batch_size):
    count = len(images[lo:lo + batch_size])
    x = samplers.shard_rows(images[lo:lo + batch_size], loaded.mesh)
    y = None
    if loaded.num_classes:
      y = samplers.shard_rows(np.asarray(labels[lo:lo + batch_size], np.int32), loaded.mesh)
    eps_fn = loaded.eps_fn(y)
    if method == "ode":
      encoded = samplers.ode_encode(eps_fn, loaded.schedule, x, options)
    else:
      encoded = samplers.ddim_invert(eps_fn, loaded.schedule, x, ddim_steps)
    codes.append(samplers.gather_rows(encoded.x, count))
    nfe_encode = int(encoded.nfe)
    if round_trip:
      if method == "ode":
        decoded = samplers.pf_ode(eps_fn, loaded.schedule, encoded.x, options, end_index=0.0)
      else:
        decoded = samplers.ddim(eps_fn, loaded.schedule, encoded.x, ddim_steps)
      recons.append(samplers.gather_rows(decoded.x, count))
      nfe_decode = int(decoded.nfe)
  seconds = time.perf_counter() - start
  return Codes(np.concatenate(codes), np.concatenate(recons) if recons else None, nfe_encode,
               nfe_decode, seconds)


def decode_latents(loaded: LoadedModel, latents: np.ndarray, sampler: str, num_steps: int,
                   options: flow.SolverOptions, batch_size: int,
                   label: int | None = None) -> tuple[np.ndarray, int]:
  """Images D(z) (clipped to [−1, 1]) from x_T = z with the deterministic `sampler`
  ('ddim' with `num_steps` steps and η = 0, or the adaptive 'pf_ode' with solver `options`) on
  the model's own schedule view; a class-conditional model decodes every latent with
  `label`. Returns (images, NFE per image)."""
  if sampler not in DECODERS:
    raise ValueError(f"Unknown decoder {sampler!r}; choose one of {DECODERS}.")
  chunks, nfe = [], 0
  for lo in range(0, len(latents), batch_size):
    count = len(latents[lo:lo + batch_size])
    z = samplers.shard_rows(latents[lo:lo + batch_size], loaded.mesh)
    y = None
    if label is not None:
      y = samplers.shard_rows(np.full((count,), label, np.int32), loaded.mesh)
    eps_fn = loaded.eps_fn(y)
    if sampler == "ddim":
      result = samplers.sample("ddim", eps_fn, loaded.schedule, z, num_steps=num_steps, eta=0.0)
    else:
      result = samplers.sample("pf_ode", eps_fn, loaded.schedule, z, options=options)
    chunks.append(samplers.gather_rows(jnp.clip(result.x, -1.0, 1.0), count))
    nfe = int(result.nfe)
  return np.concatenate(chunks), nfe
