"""Metrics against closed forms, naive-loop references and torchmetrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from difflab.errors import DifflabError
from difflab.evaluation.metrics import (
    Score,
    fid_floor,
    fid_from_features,
    frechet_distance,
    inception_score,
    kid,
    precision_recall,
)

# ------------------------------------------------------------------------------- Frechet / FID


def test_frechet_distance_commuting_diagonal_closed_form():
    rng = np.random.default_rng(0)
    m1, m2 = rng.normal(size=6), rng.normal(size=6)
    v1, v2 = rng.uniform(0.1, 3, size=6), rng.uniform(0.1, 3, size=6)
    expected = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    got = frechet_distance(m1, np.diag(v1), m2, np.diag(v2))
    assert got == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_non_commuting_2x2_closed_form():
    # For 2x2 PSD S1 S2 with eigenvalues l1, l2: Tr (S1 S2)^1/2 = sqrt(l1) + sqrt(l2)
    # = sqrt(Tr(S1 S2) + 2 sqrt(det S1 det S2)).
    s1 = np.array([[2.0, 0.9], [0.9, 1.0]])
    s2 = np.array([[0.5, -0.3], [-0.3, 1.5]])
    assert not np.allclose(s1 @ s2, s2 @ s1)
    tr_sqrt = math.sqrt(np.trace(s1 @ s2) + 2 * math.sqrt(np.linalg.det(s1) * np.linalg.det(s2)))
    mu1, mu2 = np.array([1.0, -2.0]), np.array([0.5, 0.5])
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_rank_deficient_is_real_and_symmetric():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(8, 3))
    s1 = a @ a.T  # rank 3: S1 S2 has zero eigenvalues, where sqrtm may go complex
    b = rng.normal(size=(8, 8))
    s2 = b @ b.T
    mu = np.zeros(8)
    d12, d21 = frechet_distance(mu, s1, mu, s2), frechet_distance(mu, s2, mu, s1)
    assert np.isfinite(d12) and d12 == pytest.approx(d21, rel=1e-7)
    # zero eigenvalues known to ~eps * |S| have square roots known to ~sqrt(eps) * |S|^1/2
    assert frechet_distance(mu, s1, mu, s1) == pytest.approx(0.0, abs=1e-7 * np.trace(s1))
    assert frechet_distance(mu, s2, mu, s2) == pytest.approx(0.0, abs=1e-12 * np.trace(s2))


def test_fid_of_gaussian_samples_converges_to_the_closed_form():
    g = torch.Generator().manual_seed(0)
    n, d = 40_000, 3
    std1, std2 = torch.tensor([1.0, 2.0, 0.5]), torch.tensor([1.5, 1.0, 0.5])
    shift = torch.tensor([1.0, 0.0, -1.0])
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * std1
    y = torch.randn(n, d, generator=g, dtype=torch.float64) * std2 + shift
    expected = float(shift.square().sum() + (std1 - std2).square().sum())  # = 2.5
    score = fid_from_features(x, y)
    assert score.value == pytest.approx(expected, abs=0.05)
    assert (score.n_real, score.n_fake) == (n, n)
    assert f"n_fake={n}" in str(score) and f"n_real={n}" in str(score)


class _Identity(torch.nn.Module):
    """A torchmetrics 'feature extractor' that returns its input: FID on given features."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_fid_matches_torchmetrics_on_the_same_features():
    fid_mod = pytest.importorskip("torchmetrics.image.fid")  # dev dependency (pyproject [dev])
    g = torch.Generator().manual_seed(2)
    n, d = 3000, 32
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    real = torch.randn(n, d, generator=g, dtype=torch.float64) @ mix
    fake = (torch.randn(n, d, generator=g, dtype=torch.float64) * 1.3 + 0.2) @ mix.T
    metric = fid_mod.FrechetInceptionDistance(feature=_Identity(d))
    metric.update(real, real=True)
    metric.update(fake, real=False)
    theirs = float(metric.compute())
    ours = fid_from_features(real, fake).value
    assert abs(ours - theirs) / abs(theirs) < 1e-4


def test_fid_needs_more_samples_than_dimensions():
    x = torch.randn(20, 32)
    with pytest.raises(DifflabError, match=r"(?s)20 samples.*32-dimensional.*KID"):
        fid_from_features(x, torch.randn(100, 32))
    with pytest.raises(DifflabError, match="different dimensions"):
        fid_from_features(torch.randn(100, 4), torch.randn(100, 5))


def test_fid_floor_uses_disjoint_halves_and_reports_their_size():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2001, 4, generator=g)
    floor = fid_floor(x, generator=torch.Generator().manual_seed(0))
    assert (floor.n_real, floor.n_fake) == (1000, 1000)
    assert 0 < floor.value < 0.1  # same distribution: only O(d / n) bias
    # disjoint halves of identical copies would give exactly 0; duplicated rows break that
    assert fid_floor(torch.cat([x, x])).value > 0


# ------------------------------------------------------------------------------------------ KID

def _naive_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    d = x.shape[1]

    def k(a, b):
        return (float(np.dot(a, b)) / d + 1.0) ** 3

    m, n = len(x), len(y)
    sxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    syy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    sxy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return sxx + syy - 2 * sxy


def test_kid_matches_naive_loops_on_the_full_sets():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(12, 4)), rng.normal(0.5, 1.2, size=(12, 4))
    score = kid(x, y, subsets=3, subset_size=50)  # clipped to 12: every subset is the full set
    assert score.value == pytest.approx(_naive_mmd2(x, y), rel=1e-12)
    assert score.std == pytest.approx(0.0, abs=1e-12)


def test_kid_subsets_match_naive_loops_on_the_same_draws():
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(30, 3)), rng.normal(0.3, 1.0, size=(25, 3))
    score = kid(x, y, subsets=4, subset_size=10, generator=torch.Generator().manual_seed(9))
    g = torch.Generator().manual_seed(9)
    values = []
    for _ in range(4):  # the documented draw order: real rows, then fake rows, per round
        i = torch.randperm(30, generator=g)[:10].numpy()
        j = torch.randperm(25, generator=g)[:10].numpy()
        values.append(_naive_mmd2(x[i], y[j]))
    assert score.value == pytest.approx(np.mean(values), rel=1e-12)
    assert score.std == pytest.approx(np.std(values, ddof=1), rel=1e-9)
    assert score.stderr == pytest.approx(np.std(values, ddof=1) / 2, rel=1e-9)


def test_kid_of_point_masses_is_the_kernel_distance():
    a, b = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    x, y = np.tile(a, (5, 1)), np.tile(b, (7, 1))
    # k(a, a) = k(b, b) = (1/2 + 1)^3 = 3.375, k(a, b) = 1  ->  MMD^2 = 4.75
    assert kid(x, y, subsets=2).value == pytest.approx(4.75, rel=1e-12)


def test_kid_same_distribution_is_zero_within_its_standard_error():
    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(800, 8, generator=g), torch.randn(800, 8, generator=g)
    score = kid(x, y, subsets=50, subset_size=400, generator=g)
    # stderr only measures the subset draws; the spread of one size-400 estimate (std) bounds
    # the sampling error of an estimate from these 800 + 800 samples
    assert abs(score.value) < score.std
    far = kid(x, y + 1.0, subsets=50, subset_size=400, generator=g)
    assert far.value > 10 * far.std


def test_kid_of_a_set_with_itself_is_near_zero_and_matches_its_known_bias():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(300, 4, generator=g, dtype=torch.float64)
    n = x.shape[0]
    kxx = (x @ x.T / 4 + 1) ** 3
    # independent subset draws of one finite set: E = 2 mean_{i != j} k - 2 mean_{i,j} k
    expected = float(2 * (kxx.sum() - kxx.trace()) / (n * (n - 1)) - 2 * kxx.mean())
    score = kid(x, x, subsets=400, subset_size=100, generator=g)
    assert abs(score.value - expected) < 4 * score.stderr
    assert abs(score.value) < 4 * score.stderr + abs(expected)


# --------------------------------------------------------------------------- precision / recall

def _naive_pr(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    def radii(s):
        out = []
        for i in range(len(s)):
            dists = sorted(np.linalg.norm(s[i] - s[j]) for j in range(len(s)) if j != i)
            out.append(dists[k - 1])
        return out

    def inside(q, s, r):
        return any(np.linalg.norm(q - s[j]) <= r[j] for j in range(len(s)))

    rr, rf = radii(real), radii(fake)
    precision = np.mean([inside(q, real, rr) for q in fake])
    recall = np.mean([inside(q, fake, rf) for q in real])
    return float(precision), float(recall)


@pytest.mark.parametrize("k", [1, 3])
def test_precision_recall_match_naive_loops(k):
    rng = np.random.default_rng(8)
    real = rng.normal(size=(40, 3))
    fake = rng.normal(0.8, 0.6, size=(35, 3))
    pr = precision_recall(real, fake, k=k)
    p, r = _naive_pr(real, fake, k)
    assert (pr.precision.value, pr.recall.value) == (pytest.approx(p), pytest.approx(r))
    assert 0 < p < 1 and 0 < r < 1  # a case where both matter
    assert (pr.precision.n_fake, pr.precision.n_real) == (35, 40)


def test_precision_recall_identical_sets_are_one():
    x = np.random.default_rng(9).normal(size=(50, 5))
    pr = precision_recall(x, x.copy())
    assert pr.precision.value == 1.0 and pr.recall.value == 1.0


def test_precision_recall_constructed_case():
    real = np.arange(10.0)[:, None]  # points 0..9 on a line
    fake = np.array([0, 1, 2, 3, 100, 101, 102, 103], dtype=float)[:, None]
    pr = precision_recall(real, fake, k=3)
    # fake 0..3 coincide with real points; 100..103 are far from every real ball (radius 3)
    assert pr.precision.value == pytest.approx(0.5)
    # fake radii (k=3) are 3, 2, 2, 3 on {0..3}: balls cover [-3, 6] -> real 0..6 = 7 of 10
    assert pr.recall.value == pytest.approx(0.7)


# ------------------------------------------------------------------------------ Inception Score

def test_inception_score_confident_and_uniform_extremes():
    c = 10
    confident = 200.0 * torch.eye(c).repeat(20, 1)  # one-hot p(y|x), uniform marginal
    assert inception_score(confident, splits=4).value == pytest.approx(c, rel=1e-9)
    assert inception_score(torch.zeros(50, c), splits=5).value == pytest.approx(1.0, abs=1e-12)


def test_inception_score_matches_naive_loops():
    rng = np.random.default_rng(10)
    logits = rng.normal(size=(60, 5)) * 2
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    scores = []
    for part in np.split(p, 3):
        py = part.mean(0)
        kl = [sum(q[c] * math.log(q[c] / py[c]) for c in range(5)) for q in part]
        scores.append(math.exp(np.mean(kl)))
    s = inception_score(logits, splits=3)
    assert s.value == pytest.approx(np.mean(scores), rel=1e-10)
    assert s.std == pytest.approx(np.std(scores, ddof=1), rel=1e-8)


def test_score_prints_its_sample_counts():
    s = Score("FID", 12.5, n_fake=5000, n_real=10000)
    assert str(s) == "FID = 12.5 [n_fake=5000 vs n_real=10000]"
    assert float(s) == 12.5
