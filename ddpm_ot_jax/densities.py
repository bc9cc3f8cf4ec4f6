r"""The 2-D test densities of Sec. 3.4 and perturbed Gaussians with a known OT map.

**The paper's family** (Khrulkov et al. 2022, Sec. 3.4). A component is

    p_k(x) = exp(−q1(x) − q2(x)) / Z_k,
    q1(x) = (x − a1)ᵀ Q1 (x − a1),   q2(x) = ((x − a2)²)ᵀ Q2 (x − a2)²,

with Q1, Q2 symmetric positive definite and the square in q2 elementwise (q2 is a quartic, not
necessarily convex). A density is the uniform mixture p = (1/K) Σ_k p_k, K ~ Uniform{1..5};
Z_k comes from numerical integration (the trapezoid rule on a fine grid, which is spectrally
accurate for these smooth, fast-decaying integrands). Each mixture is then centred and scaled
(`random_quartic_mixture`) so that it decays well inside [−10, 10]²; a scaling keeps the form,
with a ↦ c(a − μ), Q1 ↦ Q1/c², Q2 ↦ Q2/c⁴.

Exact sampling: since q2 ≥ 0, p_k ≤ exp(−q1)/Z_k, so drawing y ~ N(a1, (2 Q1)⁻¹) and accepting
with probability exp(−q2(y)) gives exact samples of p_k; the acceptance rate is
Z_k / (π / √det Q1), known in advance.

**Perturbed Gaussians** (Lavenant & Santambrogio 2022). u(x) = |x|²/2 + ε φ(x) with a smooth
bounded bump φ whose Hessian satisfies |ε| ‖∇²φ‖ < 1, so u is strictly convex and ∇u is the
Brenier (OT) map from μ0 = (∇u)⁻¹#N(0, I) to N(0, I). Its density is, by change of variables,

    p0(x) = N(∇u(x); 0, I) det ∇²u(x),

and x ~ μ0 exactly by drawing z ~ N(0, I) and solving ∇u(x) = z (Newton's method).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


# ----------------------------------------------------------------------------------------
# The paper's family: mixtures of exp(−q1 − q2)
# ----------------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuarticMixture:
  """(1/K) Σ_k exp(−q1_k − q2_k)/Z_k: a1, a2 (K, 2); q1, q2 (K, 2, 2) SPD; log_norm (K,) = log Z_k."""

  a1: Array
  q1: Array
  a2: Array
  q2: Array
  log_norm: Array

  @property
  def num_components(self) -> int:
    return self.a1.shape[0]


def _quadratic_form(q: Array, v1: Array, v2: Array) -> Array:
  """vᵀ Q v for 2×2 matrices q (..., 2, 2), written out (XLA fuses it; tiny dots do not)."""
  return q[..., 0, 0] * v1 * v1 + 2.0 * q[..., 0, 1] * v1 * v2 + q[..., 1, 1] * v2 * v2


def _quartic_energy(mixture: QuarticMixture, x: Array) -> Array:
  """q1_k(x) + q2_k(x) for every component k, at one point x of shape (2,)."""
  d1 = x - mixture.a1
  d2 = (x - mixture.a2) ** 2
  return _quadratic_form(mixture.q1, d1[:, 0], d1[:, 1]) + _quadratic_form(mixture.q2, d2[:, 0], d2[:, 1])


def component_log_prob(mixture: QuarticMixture, x: Array) -> Array:
  """log p_k(x) = −q1_k(x) − q2_k(x) − log Z_k for each component (K,), one point x."""
  return -_quartic_energy(mixture, x) - mixture.log_norm


def log_prob(mixture: QuarticMixture, x: Array) -> Array:
  """log p(x) = logsumexp_k(log p_k(x)) − log K, one point x."""
  return jax.scipy.special.logsumexp(component_log_prob(mixture, x)) - jnp.log(mixture.num_components)


def score(mixture: QuarticMixture, x: Array) -> Array:
  """∇ log p(x) = Σ_k r_k(x) ∇ log p_k(x), with ∇ log p_k = −2 Q1 (x − a1) − 4 (x − a2) ⊙ Q2 (x − a2)²."""
  logs = component_log_prob(mixture, x)
  resp = jax.nn.softmax(logs)
  d1 = x - mixture.a1
  d2 = x - mixture.a2
  grads = -2.0 * jnp.einsum("kij,kj->ki", mixture.q1, d1) - 4.0 * d2 * jnp.einsum("kij,kj->ki", mixture.q2, d2**2)
  return resp @ grads


def components(mixture: QuarticMixture) -> list[QuarticMixture]:
  """The K components as one-component mixtures: `log_prob` of each is log p_k."""
  return [jax.tree_util.tree_map(lambda leaf: leaf[k:k + 1], mixture) for k in range(mixture.num_components)]


def quadrature_grid(grid_size: int = 1024, domain: float = 10.0) -> tuple[np.ndarray, float]:
  """Nodes of the paper's grid on [−domain, domain] and the spacing h."""
  nodes = np.linspace(-domain, domain, grid_size)
  return nodes, float(nodes[1] - nodes[0])


def _grid_log_components(mixture: QuarticMixture, grid_size: int, domain: float) -> tuple[Array, Array]:
  """(nodes, −q1_k − q2_k on the grid (grid_size, grid_size, K)), unnormalised."""
  nodes = jnp.linspace(-domain, domain, grid_size)
  x1, x2 = nodes[:, None, None], nodes[None, :, None]
  d1x, d1y = x1 - mixture.a1[:, 0], x2 - mixture.a1[:, 1]
  d2x, d2y = (x1 - mixture.a2[:, 0]) ** 2, (x2 - mixture.a2[:, 1]) ** 2
  return nodes, -(_quadratic_form(mixture.q1, d1x, d1y) + _quadratic_form(mixture.q2, d2x, d2y))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _log_normalizers(mixture: QuarticMixture, grid_size: int, domain: float) -> Array:
  nodes, logs = _grid_log_components(mixture, grid_size, domain)
  h = nodes[1] - nodes[0]
  return jax.scipy.special.logsumexp(logs, axis=(0, 1)) + 2.0 * jnp.log(h)


def normalize(mixture: QuarticMixture, grid_size: int = 1024, domain: float = 10.0) -> QuarticMixture:
  """Sets log Z_k = log ∫ exp(−q1_k − q2_k) by the trapezoid rule on the grid."""
  return dataclasses.replace(mixture, log_norm=_log_normalizers(mixture, grid_size, float(domain)))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _mixture_log_grid(mixture: QuarticMixture, grid_size: int, domain: float) -> Array:
  _, logs = _grid_log_components(mixture, grid_size, domain)
  return jax.scipy.special.logsumexp(logs - mixture.log_norm, axis=-1) - jnp.log(mixture.num_components)


def mixture_log_density_grid(mixture: QuarticMixture, grid_size: int = 1024, domain: float = 10.0) -> np.ndarray:
  """log p on the grid (grid_size, grid_size), axis 0 = x1."""
  return np.asarray(_mixture_log_grid(mixture, grid_size, float(domain)))


@functools.partial(jax.jit, static_argnums=(2, 3))
def _grid_summary(mixture: QuarticMixture, fit_log_drop: float, grid_size: int, domain: float):
  """(max of log p on the grid's boundary − max log p, mean, covariance, the ∞-norm radius of
  {log p ≥ max − drop} around the mean), by quadrature on the grid of [−domain, domain]²."""
  log_p = _mixture_log_grid(mixture, grid_size, domain)
  nodes = jnp.linspace(-domain, domain, grid_size)
  w = jnp.exp(log_p - log_p.max())
  total = w.sum()
  x1, x2 = nodes[:, None], nodes[None, :]
  mean = jnp.stack([(w * x1).sum(), (w * x2).sum()]) / total
  d1, d2 = x1 - mean[0], x2 - mean[1]
  c11, c12, c22 = (w * d1 * d1).sum() / total, (w * d1 * d2).sum() / total, (w * d2 * d2).sum() / total
  cov = jnp.array([[c11, c12], [c12, c22]])
  far = jnp.where(log_p >= log_p.max() - fit_log_drop, jnp.maximum(jnp.abs(d1), jnp.abs(d2)), 0.0).max()
  edge = jnp.max(jnp.stack([log_p[0].max(), log_p[-1].max(), log_p[:, 0].max(), log_p[:, -1].max()]))
  return edge - log_p.max(), mean, cov, far


def grid_moments(log_density: np.ndarray, nodes: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
  """(mean, covariance, mass) of a density given by its log on the tensor grid `nodes`²."""
  h = nodes[1] - nodes[0]
  w = np.exp(log_density - log_density.max())
  total = w.sum()
  x1, x2 = np.meshgrid(nodes, nodes, indexing="ij")
  mean = np.array([(w * x1).sum(), (w * x2).sum()]) / total
  d1, d2 = x1 - mean[0], x2 - mean[1]
  c12 = (w * d1 * d2).sum() / total
  cov = np.array([[(w * d1 * d1).sum() / total, c12], [c12, (w * d2 * d2).sum() / total]])
  return mean, cov, float(total * h * h * math.exp(log_density.max()))


def _random_spd(key: Array, log_min: float, log_max: float) -> Array:
  """R(φ) diag(λ) R(φ)ᵀ with φ ~ U[0, π) and λ log-uniform in [e^{log_min}, e^{log_max}]."""
  k_angle, k_lam = jax.random.split(key)
  phi = jax.random.uniform(k_angle, (), jnp.float64, 0.0, jnp.pi)
  rot = jnp.array([[jnp.cos(phi), -jnp.sin(phi)], [jnp.sin(phi), jnp.cos(phi)]])
  lam = jnp.exp(jax.random.uniform(k_lam, (2,), jnp.float64, log_min, log_max))
  return (rot * lam) @ rot.T


def random_quartic_mixture(
    key: Array,
    max_components: int = 5,
    target_std: float = 1.5,
    fit_radius: float = 8.0,
    fit_log_drop: float = 80.0,
    grid_size: int = 1024,
    domain: float = 10.0,
    max_widenings: int = 3,
) -> QuarticMixture:
  """A random density of the paper's family, centred and scaled to sit well inside the domain.

  K ~ Uniform{1..max_components}; per component a1 ~ N(0, 1.5² I), a2 ~ a1 + N(0, I),
  Q1 = R diag(λ) Rᵀ with λ log-uniform in [0.1, 2], Q2 likewise with λ in [0.02, 0.5] (R a
  random rotation). The mixture is then centred at its mean and scaled by
  c = min(target_std / σ_max, fit_radius / r), σ_max its largest principal standard deviation
  and r the largest |x|_∞ where log p ≥ max log p − fit_log_drop, so that p < e^{−80} max p
  outside [−8, 8]² ⊂ [−10, 10]² (up to one grid spacing: r is read off the grid).

  The raw draw is not always inside [−domain, domain]² (about 1 in 10 with the defaults has
  its e^{−80} level set reaching the boundary: a1 is unbounded), so its mean, covariance and r
  are measured on [−D, D]² with D = domain, doubled (at most `max_widenings` times, same
  grid_size) until that level set stays inside; the draw itself is never changed, so the
  family's distribution is the one stated above. The result is checked to be contained in
  [−domain, domain]² (p < e^{−fit_log_drop} max p on the boundary).
  """
  k_num, k_comp = jax.random.split(key)
  num = int(jax.random.randint(k_num, (), 1, max_components + 1))
  keys = jax.random.split(k_comp, num)
  a1s, q1s, a2s, q2s = [], [], [], []
  for k in keys:
    k_a1, k_a2, k_q1, k_q2 = jax.random.split(k, 4)
    a1 = 1.5 * jax.random.normal(k_a1, (2,), jnp.float64)
    a1s.append(a1)
    a2s.append(a1 + jax.random.normal(k_a2, (2,), jnp.float64))
    q1s.append(_random_spd(k_q1, math.log(0.1), math.log(2.0)))
    q2s.append(_random_spd(k_q2, math.log(0.02), math.log(0.5)))
  raw = QuarticMixture(jnp.stack(a1s), jnp.stack(q1s), jnp.stack(a2s), jnp.stack(q2s), jnp.zeros(num))
  measure_domain = float(domain)
  for _ in range(max_widenings + 1):
    raw = normalize(raw, grid_size, measure_domain)
    edge_drop, mean, cov, far = _grid_summary(raw, fit_log_drop, grid_size, measure_domain)
    if float(edge_drop) < -fit_log_drop:
      break
    measure_domain *= 2.0
  else:
    raise ValueError(
        f"a raw density reaches the boundary of [−{measure_domain / 2:g}, {measure_domain / 2:g}]² "
        f"(e^{{{float(edge_drop):.1f}}} of its maximum there) after {max_widenings} widenings; "
        "raise max_widenings.")
  scale = min(target_std / math.sqrt(float(np.linalg.eigvalsh(np.asarray(cov)).max())), fit_radius / float(far))
  mixture = rescale(raw, mean, scale, grid_size, domain)
  edge_drop = float(_grid_summary(mixture, fit_log_drop, grid_size, float(domain))[0])
  if not edge_drop < -fit_log_drop:
    raise ValueError(
        f"the scaled density is not contained in [−{domain:g}, {domain:g}]² (e^{{{edge_drop:.1f}}} of its "
        f"maximum on the boundary); choose fit_radius < domain (got {fit_radius:g}, {domain:g}).")
  return mixture


def rescale(mixture: QuarticMixture, center: Array, scale: float, grid_size: int = 1024,
            domain: float = 10.0) -> QuarticMixture:
  """The density of c (X − center) for X ~ mixture: a ↦ c(a − center), Q1 ↦ Q1/c², Q2 ↦ Q2/c⁴."""
  moved = QuarticMixture(
      a1=scale * (mixture.a1 - center),
      q1=mixture.q1 / scale**2,
      a2=scale * (mixture.a2 - center),
      q2=mixture.q2 / scale**4,
      log_norm=mixture.log_norm,
  )
  return normalize(moved, grid_size, domain)


def _acceptance_rates(mixture: QuarticMixture) -> np.ndarray:
  """P(accept) = Z_k / ∫ exp(−q1_k) = Z_k √det Q1_k / π for the exp(−q1) envelope."""
  return np.exp(np.asarray(mixture.log_norm)) * np.sqrt(np.linalg.det(np.asarray(mixture.q1))) / math.pi


_PROPOSALS_PER_ROUND = 8192


@jax.jit
def _propose(a1: Array, q1: Array, a2: Array, q2: Array, key: Array) -> tuple[Array, Array]:
  """Proposals y = a1 + (2 Q1)^{-1/2} ε of one component, and whether each is accepted
  (U < exp(−q2(y)))."""
  k_eps, k_u = jax.random.split(key)
  eps = jax.random.normal(k_eps, (_PROPOSALS_PER_ROUND, 2), a1.dtype)
  lam, vecs = jnp.linalg.eigh(2.0 * q1)
  y = a1 + (eps * lam**-0.5) @ vecs.T
  d2 = (y - a2) ** 2
  log_u = jnp.log(jax.random.uniform(k_u, (_PROPOSALS_PER_ROUND,), a1.dtype))
  return y, log_u < -_quadratic_form(q2, d2[:, 0], d2[:, 1])


def sample(mixture: QuarticMixture, key: Array, n: int) -> Array:
  """n exact samples: component counts ~ Multinomial(n, 1/K), then rejection from exp(−q1)."""
  k_comp, k_perm, k_rest = jax.random.split(key, 3)
  comp = jax.random.randint(k_comp, (n,), 0, mixture.num_components)
  counts = np.bincount(np.asarray(comp), minlength=mixture.num_components)
  out = []
  for k in range(mixture.num_components):
    got, need, rounds = [], int(counts[k]), 0
    while need > 0:
      y, accepted = _propose(mixture.a1[k], mixture.q1[k], mixture.a2[k], mixture.q2[k],
                             jax.random.fold_in(jax.random.fold_in(k_rest, k), rounds))
      y = np.asarray(y)[np.asarray(accepted)][:need]
      got.append(y)
      need -= len(y)
      rounds += 1
      if rounds > 10_000:
        raise ValueError(f"component {k} accepts almost no proposals (rate {_acceptance_rates(mixture)[k]:.2e}).")
    out.append(np.concatenate(got) if got else np.zeros((0, 2)))
  x = np.concatenate(out)
  order = np.asarray(jax.random.permutation(k_perm, n))
  return jnp.asarray(x[order])


# ----------------------------------------------------------------------------------------
# Perturbed Gaussians: μ0 = (∇u)⁻¹ # N(0, I), u = |x|²/2 + ε φ
# ----------------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PerturbedGaussian:
  """u(x) = |x|²/2 + ε φ(x), φ(x) = exp(−½ |B (x − c)|²) (an off-centre anisotropic bump).

  epsilon (), center (2,), shape B (2, 2). ‖∇²φ‖₂ ≤ ‖BᵀB‖₂ · max(1, 2/e) = ‖BᵀB‖₂
  (`hessian_bound`), so u is strictly convex for |ε| < 1/‖BᵀB‖₂.
  """

  epsilon: Array
  center: Array
  shape: Array


def default_perturbation(epsilon: float) -> PerturbedGaussian:
  """The bump used by the experiment: centre (0.6, −0.4), B = R(π/6) diag(1.2, 0.7) R(π/6)ᵀ.

  No symmetry of N(0, I) maps it to itself, so nothing forces the flow map to be ∇u.
  """
  angle = math.pi / 6
  rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
  shape = rot @ np.diag([1.2, 0.7]) @ rot.T
  return PerturbedGaussian(jnp.asarray(float(epsilon)), jnp.asarray([0.6, -0.4]), jnp.asarray(shape))


def hessian_bound(gaussian: PerturbedGaussian) -> float:
  """‖BᵀB‖₂ ≥ sup_x ‖∇²φ(x)‖₂ (u is strictly convex when |ε| times this is < 1).

  ∇²φ = φ (g gᵀ − BᵀB) with g = BᵀB(x − c); its eigenvalues lie in [−φ‖BᵀB‖, φ(|g|² − λ_min)]
  and φ|g|² ≤ ‖BᵀB‖ · |B(x−c)|² e^{−|B(x−c)|²/2} ≤ 2 e^{−1} ‖BᵀB‖ < ‖BᵀB‖.
  """
  btb = np.asarray(gaussian.shape).T @ np.asarray(gaussian.shape)
  return float(np.linalg.eigvalsh(btb).max())


def bump(gaussian: PerturbedGaussian, x: Array) -> Array:
  """φ(x) = exp(−½ |B (x − c)|²), one point."""
  d = gaussian.shape @ (x - gaussian.center)
  return jnp.exp(-0.5 * d @ d)


def potential(gaussian: PerturbedGaussian, x: Array) -> Array:
  """u(x) = |x|²/2 + ε φ(x), one point."""
  return 0.5 * x @ x + gaussian.epsilon * bump(gaussian, x)


def brenier_map(gaussian: PerturbedGaussian, x: Array) -> Array:
  """∇u(x) = x + ε ∇φ(x): the Brenier map μ0 → N(0, I), one point."""
  return jax.grad(potential, argnums=1)(gaussian, x)


def log_prob_perturbed(gaussian: PerturbedGaussian, x: Array) -> Array:
  """log p0(x) = log N(∇u(x); 0, I) + log det ∇²u(x), one point."""
  z = brenier_map(gaussian, x)
  hess = jax.hessian(potential, argnums=1)(gaussian, x)
  return -0.5 * z @ z - jnp.log(2.0 * jnp.pi) + jnp.linalg.slogdet(hess)[1]


def score_perturbed(gaussian: PerturbedGaussian, x: Array) -> Array:
  """∇ log p0(x), by autodiff, one point."""
  return jax.grad(log_prob_perturbed, argnums=1)(gaussian, x)


def invert_brenier_map(gaussian: PerturbedGaussian, z: Array, num_steps: int = 40) -> Array:
  """x with ∇u(x) = z, by Newton's method from x = z (u is strongly convex), one point."""

  def step(x, _):
    residual = brenier_map(gaussian, x) - z
    hess = jax.hessian(potential, argnums=1)(gaussian, x)
    return x - jnp.linalg.solve(hess, residual), None

  x, _ = jax.lax.scan(step, z, None, length=num_steps)
  return x


def sample_perturbed(gaussian: PerturbedGaussian, key: Array, n: int) -> tuple[Array, Array]:
  """(x, z): z ~ N(0, I) and x = (∇u)⁻¹(z) ~ μ0, exactly (Newton converges to round-off)."""
  z = jax.random.normal(key, (n, 2), jnp.float64)
  x = jax.jit(jax.vmap(invert_brenier_map, in_axes=(None, 0)))(gaussian, z)
  return x, z
