"""Exact discrete OT and the tests of "is this map an OT map?".

Two kinds of test:

* The paper's cost test (Khrulkov et al. 2022, Sec. 3.4). Given samples x_i ~ μ0 and their
  codes y_i = E(x_i), compare the cost of the encoder pairing with the optimal assignment:

      ε_rel = (Cost(E) − Cost(OT)) / Cost(OT),   Cost(π) = (1/n) Σ_i |x_i − y_π(i)|².

  A true OT map T makes the identity pairing optimal for every n, so ε_rel = 0 exactly; but a
  map close to T also gives ε_rel = 0 at small n, so this test is weak.
* Brenier's criterion. An OT map for the quadratic cost is the gradient of a convex
  function, so its Jacobian J is symmetric positive semidefinite. `jacobian_asymmetry`
  measures ‖J − Jᵀ‖_F / ‖J‖_F and `min_symmetric_eigenvalue` the smallest eigenvalue of
  (J + Jᵀ)/2.

The discrete problems are solved by POT's network simplex (`ot.emd`) or scipy's
Jonker–Volgenant `linear_sum_assignment`; both are exact.
"""
from __future__ import annotations

import numpy as np
import ot as pot
import scipy.optimize
import scipy.spatial.distance

import jax
import jax.numpy as jnp

Array = jax.Array


def squared_distances(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """C_ij = |x_i − y_j|², in float64."""
  x = np.asarray(x, np.float64).reshape(len(x), -1)
  y = np.asarray(y, np.float64).reshape(len(y), -1)
  return scipy.spatial.distance.cdist(x, y, "sqeuclidean")


def optimal_assignment(x: np.ndarray, y: np.ndarray, method: str = "pot") -> np.ndarray:
  """The permutation π minimising Σ_i |x_i − y_π(i)|² (uniform weights, equal sizes).

  method: 'pot' (network simplex, POT's `ot.emd`) or 'scipy' (`linear_sum_assignment`).
  Returns π as an int array: x[i] is matched with y[π[i]].
  """
  if len(x) != len(y):
    raise ValueError(f"Assignment needs equal sizes, got {len(x)} and {len(y)}.")
  cost = squared_distances(x, y)
  n = len(x)
  if method == "pot":
    weights = np.full(n, 1.0 / n)
    plan = pot.emd(weights, weights, cost, numItermax=max(100_000, 50 * n * n))
    # With uniform weights the optimal vertex is a permutation matrix scaled by 1/n.
    return np.argmax(plan, axis=1)
  if method == "scipy":
    rows, cols = scipy.optimize.linear_sum_assignment(cost)
    perm = np.empty(n, dtype=np.int64)
    perm[rows] = cols
    return perm
  raise ValueError(f"Unknown assignment method {method!r}; choose 'pot' or 'scipy'.")


def pairing_cost(x: np.ndarray, y: np.ndarray, perm: np.ndarray | None = None) -> float:
  """Cost(π) = (1/n) Σ_i |x_i − y_π(i)|²; π = identity when `perm` is None."""
  x = np.asarray(x, np.float64).reshape(len(x), -1)
  y = np.asarray(y, np.float64).reshape(len(y), -1)
  if perm is not None:
    y = y[perm]
  return float(np.mean(np.sum((x - y) ** 2, axis=1)))


def pairing_test(x: np.ndarray, y: np.ndarray, method: str = "pot") -> dict:
  """The paper's test (Sec. 3.4) on the pairing x_i ↔ y_i, i = 1..n, with its raw pieces.

  Returns 'perm' (the optimal assignment π), 'cost_encoder' = Cost(id), 'cost_ot' = Cost(π),
  'ot_relative_error' ε_rel = (Cost(id) − Cost(π)) / Cost(π), 'identity_fraction'
  (1/n) #{i : π(i) = i}, and 'nearest_code_fraction' (1/n) #{i : argmin_j |x_i − y_j| = i}:
  when the latter is 1 every x_i is closer to its own y_i than to any other, and π = id
  follows without solving anything (the test is then trivially passed).
  """
  perm = optimal_assignment(x, y, method)
  cost_encoder = pairing_cost(x, y)
  cost_ot = pairing_cost(x, y, perm)
  nearest = np.argmin(squared_distances(x, y), axis=1)
  return {"perm": perm, "cost_encoder": cost_encoder, "cost_ot": cost_ot,
          "ot_relative_error": (cost_encoder - cost_ot) / cost_ot,
          "identity_fraction": identity_fraction(perm),
          "nearest_code_fraction": float(np.mean(nearest == np.arange(len(perm))))}


def ot_relative_error(x: np.ndarray, y: np.ndarray, method: str = "pot") -> dict[str, float]:
  """The paper's test: ε_rel = (Cost(E) − Cost(OT)) / Cost(OT) for the pairing x_i ↔ y_i.

  Returns {'cost_encoder', 'cost_ot', 'ot_relative_error', 'identity_fraction'}
  (`pairing_test` without the permutation and the nearest-code fraction).
  """
  test = pairing_test(x, y, method)
  return {k: test[k] for k in ("cost_encoder", "cost_ot", "ot_relative_error",
                               "identity_fraction")}


def identity_fraction(perm: np.ndarray) -> float:
  """Share of points the optimal assignment leaves in place: (1/n) #{i : π(i) = i}."""
  perm = np.asarray(perm)
  return float(np.mean(perm == np.arange(len(perm))))


def jacobian_asymmetry(jac: Array) -> Array:
  """‖J − Jᵀ‖_F / ‖J‖_F over the last two axes (0 for the Jacobian of a gradient map)."""
  asym = jnp.linalg.norm(jac - jnp.swapaxes(jac, -1, -2), axis=(-2, -1))
  return asym / jnp.linalg.norm(jac, axis=(-2, -1))


def min_symmetric_eigenvalue(jac: Array) -> Array:
  """λ_min((J + Jᵀ)/2): ≥ 0 when J is the Hessian of a convex function."""
  return jnp.linalg.eigvalsh(0.5 * (jac + jnp.swapaxes(jac, -1, -2)))[..., 0]
