"""Sample-quality metrics on feature vectors: FID, KID, precision / recall, Inception Score.

Every metric here takes features (or logits) as ``(N, D)`` tensors or arrays and computes in
float64. Which network produced the features is :mod:`difflab.evaluation.features`' business.
Each result carries the sample counts it was computed from, and its ``str`` prints them beside
the number: FID and KID are biased / noisy in ``n``, so a figure without its ``n`` means little.

References:
    - Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local
      Nash Equilibrium" (FID, eq. 6); Dowson & Landau 1982 (Frechet distance of Gaussians).
    - Binkowski et al. 2018, "Demystifying MMD GANs" (KID: unbiased MMD^2, eq. 2 / App. D,
      with the cubic polynomial kernel).
    - Kynkaanniemi et al. 2019, "Improved Precision and Recall Metric for Assessing Generative
      Models" (eqs. 1-3).
    - Salimans et al. 2016, "Improved Techniques for Training GANs" (Inception Score, Sec. 4).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from difflab.errors import DifflabError, bad_value

ArrayLike = torch.Tensor | np.ndarray


@dataclass(frozen=True)
class Score:
    """One metric value with the sample counts behind it.

    Attributes:
        name: metric name (``"FID"``, ``"KID"``, ``"precision"``, ...).
        value: the estimate.
        n_fake: number of generated samples it used.
        n_real: number of reference samples it used (0 when the metric has none, e.g. IS).
        std: spread of the per-subset / per-split estimates, when there are several.
        stderr: standard error of ``value`` (``std / sqrt(#subsets)``), when known.
    """

    name: str
    value: float
    n_fake: int
    n_real: int
    std: float | None = None
    stderr: float | None = None

    def __float__(self) -> float:
        return float(self.value)

    def __str__(self) -> str:
        spread = f" ± {self.stderr:.3g} (s.e.)" if self.stderr is not None else (
            f" ± {self.std:.3g} (std)" if self.std is not None else "")
        real = f" vs n_real={self.n_real}" if self.n_real else ""
        return f"{self.name} = {self.value:.4g}{spread} [n_fake={self.n_fake}{real}]"

    def to_dict(self) -> dict:
        """A JSON-ready dict of every field."""
        return {"name": self.name, "value": self.value, "n_fake": self.n_fake,
                "n_real": self.n_real, "std": self.std, "stderr": self.stderr}


def as_features(x: ArrayLike, name: str = "features") -> torch.Tensor:
    """``x`` as a float64 ``(N, D)`` CPU tensor; anything else raises a :class:`DifflabError`."""
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    if t.ndim != 2 or t.shape[0] == 0 or t.shape[1] == 0:
        raise bad_value(f"{name}.shape", tuple(t.shape), "(N, D) with N, D >= 1")
    t = t.detach().to("cpu", torch.float64)
    if not torch.isfinite(t).all():
        raise bad_value(name, "non-finite values", "finite features (no NaN / inf)")
    return t


def _check_pair(real: torch.Tensor, fake: torch.Tensor) -> None:
    if real.shape[1] != fake.shape[1]:
        raise DifflabError(f"real and fake features have different dimensions ({real.shape[1]} "
                           f"vs {fake.shape[1]}): they must come from the same extractor")


# ---------------------------------------------------------------------------------------------
# Frechet distance (FID)
# ---------------------------------------------------------------------------------------------

def gaussian_stats(features: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased covariance (divisor ``N - 1``) of ``(N, D)`` features, in float64."""
    f = as_features(features)
    if f.shape[0] < 2:
        raise bad_value("features.shape[0]", f.shape[0], ">= 2 samples for a covariance")
    mu = f.mean(dim=0)
    centered = f - mu
    return mu, centered.T @ centered / (f.shape[0] - 1)


def _sqrt_psd(m: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a symmetric positive semi-definite matrix (eigh; negative
    round-off eigenvalues clamped to 0)."""
    w, v = torch.linalg.eigh((m + m.T) / 2)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_distance(mu1: ArrayLike, cov1: ArrayLike, mu2: ArrayLike, cov2: ArrayLike) -> float:
    """Frechet (2-Wasserstein squared) distance between ``N(mu1, cov1)`` and ``N(mu2, cov2)``.

    ``d^2 = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2})`` (Dowson & Landau 1982; FID is this
    between Gaussians fitted to features, Heusel et al. 2017 eq. 6).

    ``S1 S2`` is not symmetric, and a general ``sqrtm`` of it may return complex round-off
    (the reason other implementations drop imaginary parts). We use the similar matrix
    ``S1^{1/2} S2 S1^{1/2}`` instead: it is symmetric PSD and has the same eigenvalues as
    ``S1 S2``, so ``Tr (S1 S2)^{1/2} = sum_i sqrt(lambda_i(S1^{1/2} S2 S1^{1/2}))`` with two
    ``eigh`` calls, real by construction (tiny negative eigenvalues from round-off clamp to 0).

    Args:
        mu1, mu2: means ``(D,)``.
        cov1, cov2: covariances ``(D, D)``, symmetric PSD.

    Returns:
        The distance (>= 0 up to round-off), as a Python float.
    """
    m1, m2 = (torch.as_tensor(np.asarray(m) if not isinstance(m, torch.Tensor) else m)
              .to(torch.float64).reshape(-1) for m in (mu1, mu2))
    s1, s2 = (torch.as_tensor(np.asarray(s) if not isinstance(s, torch.Tensor) else s)
              .to(torch.float64) for s in (cov1, cov2))
    d = m1.shape[0]
    for name, s in (("cov1", s1), ("cov2", s2)):
        if s.shape != (d, d):
            raise bad_value(f"{name}.shape", tuple(s.shape), f"({d}, {d}) to match the means")
    if m2.shape != (d,):
        raise bad_value("mu2.shape", tuple(m2.shape), f"({d},) to match mu1")
    root1 = _sqrt_psd(s1)
    inner = root1 @ s2 @ root1
    eig = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp_min(0)
    trace_sqrt = eig.sqrt().sum()
    dist = (m1 - m2).square().sum() + s1.trace() + s2.trace() - 2 * trace_sqrt
    return float(dist)


def fid_from_features(real: ArrayLike, fake: ArrayLike, name: str = "FID") -> Score:
    """FID between two feature sets: :func:`frechet_distance` of their fitted Gaussians.

    Both sets need more samples than feature dimensions (``N > D``): with fewer, the sample
    covariance is singular and FID is dominated by estimation error; that raises an error
    recommending a larger ``n`` or KID (which has no such requirement).

    Args:
        real: reference features ``(N_r, D)``.
        fake: generated features ``(N_f, D)``.
        name: name of the returned score.

    Returns:
        A :class:`Score` with ``n_fake``, ``n_real``.
    """
    r, f = as_features(real, "real"), as_features(fake, "fake")
    _check_pair(r, f)
    d = r.shape[1]
    for which, x in (("real", r), ("fake", f)):
        if x.shape[0] <= d:
            raise DifflabError(
                f"FID needs more samples than feature dimensions: the {which} set has "
                f"{x.shape[0]} samples for {d}-dimensional features, so its covariance is "
                f"singular. Use n > {d} (ideally >= {10 * d}), or KID (--metrics kid), which is "
                f"unbiased at any n.")
    mu_r, cov_r = gaussian_stats(r)
    mu_f, cov_f = gaussian_stats(f)
    return Score(name, frechet_distance(mu_r, cov_r, mu_f, cov_f), n_fake=f.shape[0],
                 n_real=r.shape[0])


def split_halves(n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor,
                                                                             torch.Tensor]:
    """Two disjoint random halves of ``range(n)`` (each ``n // 2`` long)."""
    perm = torch.randperm(n, generator=generator)
    half = n // 2
    return perm[:half], perm[half: 2 * half]


def fid_floor(real: ArrayLike, generator: torch.Generator | None = None) -> Score:
    """The real-versus-real floor: FID between two disjoint random halves of the real features.

    FID is biased upwards at finite ``n``; the floor shows what "indistinguishable from the
    data" reads as at this sample size (each half has ``N // 2`` samples).
    """
    r = as_features(real, "real")
    a, b = split_halves(r.shape[0], generator)
    return fid_from_features(r[a], r[b], name="FID floor (real vs real)")


# ---------------------------------------------------------------------------------------------
# KID
# ---------------------------------------------------------------------------------------------

def polynomial_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``k(x, y) = (x . y / d + 1)^3`` for all pairs of rows (Binkowski et al. 2018, Sec. 4)."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Unbiased ``MMD^2`` (Gretton et al. 2012 eq. 3; Binkowski et al. 2018 eq. 2)::

        1/(m(m-1)) sum_{i != j} k(x_i, x_j) + 1/(n(n-1)) sum_{i != j} k(y_i, y_j)
            - 2/(m n) sum_{i, j} k(x_i, y_j)
    """
    m, n = x.shape[0], y.shape[0]
    kxx, kyy, kxy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    sxx = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
    syy = (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
    return sxx + syy - 2 * kxy.mean()


def kid(
    real: ArrayLike,
    fake: ArrayLike,
    subsets: int = 100,
    subset_size: int = 1000,
    generator: torch.Generator | None = None,
) -> Score:
    """Kernel Inception Distance (Binkowski et al. 2018): unbiased ``MMD^2`` with the cubic
    polynomial kernel, averaged over random subsets.

    Each of ``subsets`` rounds draws ``min(subset_size, N_r, N_f)`` rows from each set without
    replacement (independently for the two sets) and computes :func:`mmd2_unbiased`. The value
    is the mean; ``std`` is the spread over rounds and ``stderr = std / sqrt(subsets)``. KID is
    unbiased for two independent samples, so it can be (slightly) negative and needs no
    ``N > D``. (Comparing a set with itself is not two independent samples: the expectation is
    then ``2 mean_{i != j} k - 2 mean_{i, j} k``, a small negative number.)

    Args:
        real: reference features ``(N_r, D)``.
        fake: generated features ``(N_f, D)``.
        subsets: number of subset rounds.
        subset_size: rows per set and round (clipped to the smaller set).
        generator: source of the subset draws.

    Returns:
        A :class:`Score` named ``"KID"``.
    """
    r, f = as_features(real, "real"), as_features(fake, "fake")
    _check_pair(r, f)
    if subsets < 1:
        raise bad_value("subsets", subsets, "an int >= 1")
    m = min(int(subset_size), r.shape[0], f.shape[0])
    if m < 2:
        raise bad_value("subset_size", subset_size, "an int >= 2 with >= 2 samples in each set")
    values = torch.empty(subsets, dtype=torch.float64)
    for s in range(subsets):
        ir = torch.randperm(r.shape[0], generator=generator)[:m]
        jf = torch.randperm(f.shape[0], generator=generator)[:m]
        values[s] = mmd2_unbiased(r[ir], f[jf])
    std = float(values.std()) if subsets > 1 else 0.0
    return Score("KID", float(values.mean()), n_fake=f.shape[0], n_real=r.shape[0], std=std,
                 stderr=std / math.sqrt(subsets))


# ---------------------------------------------------------------------------------------------
# Precision and recall (k-NN manifolds)
# ---------------------------------------------------------------------------------------------

def knn_radii(x: torch.Tensor, k: int = 3, block: int = 1024) -> torch.Tensor:
    """Distance from each row of ``x`` to its ``k``-th nearest other row (Kynkaanniemi eq. 1).

    The point itself (distance 0) is the first neighbour, so this is the ``(k+1)``-th smallest
    distance of its row.
    """
    if not 1 <= k < x.shape[0]:
        raise bad_value("k", k, f"an int in [1, {x.shape[0] - 1}] (fewer than the set size)")
    out = torch.empty(x.shape[0], dtype=torch.float64)
    for i in range(0, x.shape[0], block):
        d = torch.cdist(x[i: i + block], x)
        out[i: i + block] = d.kthvalue(k + 1, dim=1).values
    return out


def manifold_coverage(queries: torch.Tensor, support: torch.Tensor, radii: torch.Tensor,
                      block: int = 1024) -> torch.Tensor:
    """``f(q, S)`` for each query: 1 when some ``s`` in ``S`` has ``||q - s|| <= r(s)``
    (Kynkaanniemi et al. 2019 eq. 1); returns a boolean ``(N_q,)`` tensor."""
    hit = torch.empty(queries.shape[0], dtype=torch.bool)
    for i in range(0, queries.shape[0], block):
        d = torch.cdist(queries[i: i + block], support)
        hit[i: i + block] = (d <= radii[None, :]).any(dim=1)
    return hit


@dataclass(frozen=True)
class PrecisionRecall:
    """Improved precision and recall (Kynkaanniemi et al. 2019) and their inputs."""

    precision: Score
    recall: Score
    k: int

    def __str__(self) -> str:
        return f"{self.precision}; {self.recall} (k={self.k})"


def precision_recall(real: ArrayLike, fake: ArrayLike, k: int = 3,
                     real_radii: torch.Tensor | None = None) -> PrecisionRecall:
    """Improved precision and recall (Kynkaanniemi et al. 2019, eqs. 1-3).

    Each set's manifold is the union of balls around its points with radius the distance to the
    ``k``-th nearest neighbour in the same set. Precision is the fraction of generated samples
    inside the real manifold (fidelity); recall is the fraction of real samples inside the
    generated manifold (coverage).

    Args:
        real: reference features ``(N_r, D)``.
        fake: generated features ``(N_f, D)``.
        k: neighbourhood size (the paper uses 3).
        real_radii: ``knn_radii(real, k)`` when already computed (a fixed reference set).

    Returns:
        :class:`PrecisionRecall` with two :class:`Score` values in ``[0, 1]``.
    """
    r, f = as_features(real, "real"), as_features(fake, "fake")
    _check_pair(r, f)
    radii = knn_radii(r, k) if real_radii is None else real_radii
    if radii.shape != (r.shape[0],):
        raise bad_value("real_radii.shape", tuple(radii.shape), f"({r.shape[0]},)")
    precision = manifold_coverage(f, r, radii).double().mean()
    recall = manifold_coverage(r, f, knn_radii(f, k)).double().mean()
    n_f, n_r = f.shape[0], r.shape[0]
    return PrecisionRecall(Score("precision", float(precision), n_fake=n_f, n_real=n_r),
                           Score("recall", float(recall), n_fake=n_f, n_real=n_r), k)


# ---------------------------------------------------------------------------------------------
# Inception Score
# ---------------------------------------------------------------------------------------------

def inception_score(logits: ArrayLike, splits: int = 10) -> Score:
    """Inception Score (Salimans et al. 2016, Sec. 4): ``exp(E_x KL(p(y|x) || p(y)))``.

    The samples are cut into ``splits`` contiguous parts; in each, ``p(y)`` is the mean of
    ``p(y|x)`` over that part. The value is the mean of the per-split scores and ``std`` their
    standard deviation (the usual "mean ± std" report).

    Args:
        logits: classifier logits ``(N, C)`` of generated samples (a softmax gives ``p(y|x)``).
        splits: number of parts (each needs >= 1 sample).

    Returns:
        A :class:`Score` named ``"IS"`` (``n_real = 0``).
    """
    lg = as_features(logits, "logits")
    n = lg.shape[0]
    if not 1 <= splits <= n:
        raise bad_value("splits", splits, f"an int in [1, {n}] (at most the number of samples)")
    log_p = torch.log_softmax(lg, dim=1)
    scores = []
    for part in torch.tensor_split(log_p, splits):
        log_py = torch.logsumexp(part, dim=0) - math.log(part.shape[0])
        kl = (part.exp() * (part - log_py)).sum(dim=1).mean()
        scores.append(math.exp(float(kl)))
    s = torch.tensor(scores, dtype=torch.float64)
    std = float(s.std()) if splits > 1 else 0.0
    return Score("IS", float(s.mean()), n_fake=n, n_real=0, std=std)
