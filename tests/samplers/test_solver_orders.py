"""Convergence orders of the deterministic solvers against the exact probability-flow ODE.

The answer is ``probability_flow_reference`` (scipy DOP853 at 1e-10 on the exact mixture
denoiser, float64), integrated over the same interval as the solver's grid, which stops at a
positive ``t_end`` (``to_zero=False``). The observed order is the slope of ``log RMS error``
against ``log(1 / steps)`` on log-SNR grids (uniform steps ``h`` in ``lambda``).

Two regimes:

* *from the prior* (``t_max -> t_end``), how samplers are used. There ``x0_hat`` hardly moves
  at the start (``d x0_hat / d lambda = O(alpha / sigma)``, ~``e^-5``), so the first-order
  warm-up steps of multistep methods add errors far below the steady-state method's and every
  solver shows the order of its main formula;
* *from inside the trajectory* (``lambda`` from -0.7 to 1.8), where the warm-up is visible and
  the asymptotic order is the one the starting-value theory predicts: a first-order first step
  (local error ``O(h^2)``) caps DPM-Solver++(3M) at 2; PLMS's improved-Euler start and AB2 step
  (``O(h^3)``) cap it at 3, while PNDM's Runge-Kutta start keeps 4; UniPC-3's (UniP-3 with
  UniC-3) first, UniC-1 corrected step (``O(h^3)``) caps it at 3 although its corrected steps
  are of order 4 (the default UniC-2 is third order anyway); the
  Euler first step of iPNDM(-v) and DEIS-3 caps them at 2.

DPM-Solver++(3M)'s ``second_difference="half"`` (the peers' weight) leaves a local
``O(h^3)`` error: second order, seen from the prior only at 64 steps and more (below, its
slope is close to 3: the term it drops is small there).

iPNDM's fixed uniform-step weights are fourth order only on grids uniform in ``rho``; a log-SNR
grid is geometric in ``rho`` (step ratio ``e^-h = 1 + O(h)``), which leaves an ``O(h^3)`` local
error in the second-order condition: second order (``ipndm_v``, with the variable-step weights,
keeps 4).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import difflab.samplers.deis  # noqa: F401  (registers the solvers)
import difflab.samplers.dpm_solver  # noqa: F401
import difflab.samplers.edm  # noqa: F401
import difflab.samplers.pndm  # noqa: F401
import difflab.samplers.unipc  # noqa: F401
from difflab.paths import EDM, VP
from difflab.samplers import get_sampler, sample, timesteps
from difflab.testing import CountingDenoiser, GaussianMixture, probability_flow_reference

TOL = 0.3
LOW, MID, HIGH = (16, 32, 64), (16, 32, 64, 128), (64, 128, 256)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: intra-op threads only add synchronisation
    yield
    torch.set_num_threads(before)


def overlapping_mixture() -> GaussianMixture:
    """Three overlapping 3-D components: a smooth flow whose asymptotic regime starts early."""
    g = torch.Generator().manual_seed(0)
    means = torch.randn(3, 3, generator=g, dtype=torch.float64)
    return GaussianMixture(means, [0.3, 0.5, 0.4], [0.3, 0.3, 0.4])


class Problem:
    """An ODE problem: the exact denoiser, 32 starting points and the reference solution."""

    def __init__(self, path, t_start: float, t_end: float, seed: int = 1) -> None:
        self.path, self.t_start, self.t_end = path, t_start, t_end
        self.den = overlapping_mixture().denoiser(path)
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(32, 3, generator=g, dtype=torch.float64) * float(path.sigma(t_start))
        self.ref = probability_flow_reference(self.den, self.x, t_start, t_end)

    def error(self, name: str, steps: int, **opts) -> float:
        grid = timesteps.log_snr(self.path, steps, t_start=self.t_start, t_end=self.t_end,
                                 to_zero=False)
        out = sample(name, self.den, self.x, grid, **opts)
        return float((out - self.ref).pow(2).mean().sqrt())

    def slope(self, name: str, steps, **opts) -> tuple[float, list[float]]:
        errors = [self.error(name, n, **opts) for n in steps]
        assert min(errors) > 1e-9, f"{name}: errors {errors} reach the float64 floor"
        return float(-np.polyfit(np.log(steps), np.log(errors), 1)[0]), errors


@pytest.fixture(scope="module")
def vp_prior() -> Problem:
    return Problem(VP.discrete_linear(), 1.0, 0.1)


@pytest.fixture(scope="module")
def edm_prior() -> Problem:
    return Problem(EDM(), 80.0, 0.1)


@pytest.fixture(scope="module")
def vp_inside() -> Problem:
    return Problem(VP.discrete_linear(), 0.4, 0.05)


# (name, options, expected order, step counts); lower_order_final="long_step" does not act here
# (every step is shorter than 1 in lambda)
FROM_PRIOR = [
    ("ddim", {}, 1, LOW),
    ("euler", {}, 1, LOW),
    ("dpm_solver_1", {}, 1, LOW),
    ("heun", {}, 2, LOW),
    ("dpm_solver_2", {}, 2, LOW),
    ("dpmpp_2s", {}, 2, LOW),
    ("dpmpp_2m", {}, 2, LOW),
    ("dpm_solver_2m", {}, 2, LOW),
    ("dpm_solver_3", {}, 3, LOW),
    ("dpmpp_3m", {"second_difference": "taylor"}, 3, MID),
    ("dpmpp_3m", {"second_difference": "half"}, 2, HIGH),  # the peers' weight: second order
    ("dpm_solver_3m", {}, 3, MID),  # the Taylor weight by default
    ("dpm_solver_3m", {"second_difference": "half"}, 2, HIGH),
    ("unipc_bh1", {"order": 2, "corrector_order": 2}, 3, MID),  # UniP-2 + UniC-2: third order
    ("unipc_bh2", {"order": 2, "corrector_order": 2}, 3, MID),
    ("unipc_bh2", {"order": 2}, 2, MID),  # the default UniC-1 after UniP-2: second order
    ("unipc_bh2", {"order": 3, "corrector_order": 3}, 4, MID),  # UniPC-3 (see the docstring)
    ("pndm", {}, 4, HIGH),
    ("plms", {}, 4, HIGH),
    ("ipndm", {}, 2, HIGH),  # fixed weights on a grid geometric in rho (module docstring)
    ("ipndm_v", {}, 4, HIGH),
    ("deis", {"order": 1}, 1, LOW),
    ("deis", {"order": 2}, 2, LOW),
    ("deis", {}, 3, MID),
    ("deis", {"mode": "rhoab"}, 3, HIGH),
]


def case_id(case) -> str:
    name, opts = case[0], case[1]
    return name + "".join(f"-{k}={v}" for k, v in opts.items())


@pytest.mark.parametrize("name,opts,order,steps", FROM_PRIOR, ids=[case_id(c) for c in FROM_PRIOR])
def test_every_solver_converges_at_its_order_on_vp_discrete(vp_prior, name, opts, order, steps):
    slope, errors = vp_prior.slope(name, steps, **opts)
    assert abs(slope - order) < TOL, f"{name}: slope {slope:.2f}, errors {errors}"


EDM_SUBSET = [
    ("ddim", {}, 1, LOW),
    ("heun", {}, 2, LOW),
    ("dpm_solver_2", {}, 2, LOW),
    ("dpmpp_2m", {}, 2, LOW),
    ("dpm_solver_3", {}, 3, LOW),
    ("unipc_bh2", {"order": 2, "corrector_order": 2}, 3, (32, 64, 128)),
    ("pndm", {}, 4, (128, 256, 512)),
    ("deis", {}, 3, (32, 64, 128)),  # on EDM's path (t = sigma) tAB is rhoAB
]


@pytest.mark.parametrize("name,opts,order,steps", EDM_SUBSET, ids=[case_id(c) for c in EDM_SUBSET])
def test_representative_solvers_converge_at_their_order_on_edm(edm_prior, name, opts, order,
                                                               steps):
    slope, errors = edm_prior.slope(name, steps, **opts)
    assert abs(slope - order) < TOL, f"{name}: slope {slope:.2f}, errors {errors}"


INSIDE = [
    ("pndm", {}, 4, (40, 80, 160)),
    ("plms", {}, 3, (80, 160, 320)),
    ("unipc_bh1", {"corrector_order": 3}, 3, (40, 80, 160)),  # UniPC-3: UniC-1 first step
    ("unipc_bh1", {}, 3, (40, 80, 160)),  # UniP-3 + UniC-2
    ("unipc_bh2", {}, 3, (40, 80, 160)),
    ("dpmpp_3m", {"second_difference": "taylor"}, 2, LOW),
    ("dpmpp_3m", {}, 2, LOW),
    ("dpm_solver_3", {}, 3, LOW),
    ("ipndm_v", {}, 2, (40, 80, 160)),
    ("deis", {}, 2, (40, 80, 160)),
    ("deis", {"order": 2}, 2, (40, 80, 160)),
]


@pytest.mark.parametrize("name,opts,order,steps", INSIDE, ids=[case_id(c) for c in INSIDE])
def test_warm_starts_set_the_asymptotic_order(vp_inside, name, opts, order, steps):
    slope, errors = vp_inside.slope(name, steps, **opts)
    assert abs(slope - order) < TOL, f"{name}: slope {slope:.2f}, errors {errors}"


DETERMINISTIC = ["euler", "heun", "dpm_solver_1", "dpm_solver_2", "dpm_solver_3", "dpmpp_2s",
                 "dpmpp_2m", "dpmpp_3m", "dpm_solver_2m", "dpm_solver_3m", "unipc_bh1",
                 "unipc_bh2", "pndm", "plms", "ipndm", "ipndm_v", "deis"]
PATHS_KINDS = [("vp_discrete_linear", "eps"), ("vp_discrete_cosine", "x0"), ("vp_linear", "v"),
               ("vp_cosine", "score"), ("subvp", "velocity"), ("ve", "eps"), ("edm", "x0"),
               ("linear", "velocity"), ("gvp", "v")]


@pytest.mark.parametrize("path_name,kind", PATHS_KINDS, ids=[p for p, _ in PATHS_KINDS])
def test_every_solver_works_on_every_path_and_parameterization(make_path, oracle_denoiser,
                                                               path_name, kind):
    """The oracle seen through ``Denoiser`` in a rotating parameterization: every solver matches
    the reference from the prior to ``lambda = 1.5`` at 32 steps, each higher-order one at least
    4x better than DDIM (whose own error is below 5e-2)."""
    path = make_path(path_name)
    den = oracle_denoiser(overlapping_mixture(), path, kind)
    t_end = float(path.t_from_log_snr(torch.tensor(3.0, dtype=torch.float64)))
    g = torch.Generator().manual_seed(2)
    x = torch.randn(8, 3, generator=g, dtype=torch.float64) * path.prior_std
    ref = probability_flow_reference(den, x, path.t_max, t_end, rtol=1e-8, atol=1e-8)
    grid = timesteps.log_snr(path, 32, t_end=t_end, to_zero=False)

    def err(name: str) -> float:
        return float((sample(name, den, x, grid) - ref).pow(2).mean().sqrt())

    e_ddim = err("ddim")
    assert e_ddim < 5e-2
    for name in DETERMINISTIC:
        e = err(name)
        bound = e_ddim * 1.1 if get_sampler(name).order == 1 else e_ddim / 4
        assert e < bound, f"{name} on {path_name} ({kind}): error {e:.3g} vs DDIM {e_ddim:.3g}"


# ----- the shared contract: evaluations per grid and the final step to the data ---------------

# evaluations for n solver steps, z = 1 when the grid ends at 0 (the denoising step)
NFE = {
    "dpm_solver_1": lambda n, z: n + z, "euler": lambda n, z: n + z,
    "dpm_solver_2": lambda n, z: 2 * n + z, "dpmpp_2s": lambda n, z: 2 * n + z,
    "dpm_solver_3": lambda n, z: 3 * n + z,
    "dpmpp_2m": lambda n, z: n + z, "dpmpp_3m": lambda n, z: n + z,
    "dpm_solver_2m": lambda n, z: n + z, "dpm_solver_3m": lambda n, z: n + z,
    "dpmpp_2m_sde": lambda n, z: n + z, "euler_ancestral": lambda n, z: n + z,
    "unipc_bh1": lambda n, z: n + z, "unipc_bh2": lambda n, z: n + z,
    "heun": lambda n, z: 2 * n + z,  # the step to sigma = 0 is a single Euler evaluation
    "pndm": lambda n, z: 4 * min(n, 3) + max(n - 3, 0) + z,
    "plms": lambda n, z: n + 1 + z,
    "ipndm": lambda n, z: n + z, "ipndm_v": lambda n, z: n + z, "deis": lambda n, z: n + z,
}


DENOISE = {"pndm": {"final": "denoise"}, "plms": {"final": "denoise"}}


@pytest.mark.parametrize("name", sorted(NFE))
def test_evaluations_and_the_final_step_to_the_data(name):
    """A grid ending at 0 returns ``x0_hat`` at its last positive time, taken from exactly
    the state the same grid without the 0 ends with; evaluations follow each method's count.
    (PNDM / PLMS by default step into 0 with their multistep formula instead, at the same
    count: ``test_pndm.py``.)"""
    opts = DENOISE.get(name, {})
    path = VP.discrete_linear()
    den = overlapping_mixture().denoiser(path)
    x = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    x_before = x.clone()
    to_zero = timesteps.log_snr(path, 12)  # 11 solver steps, then 0
    positive = to_zero[:-1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for grid, z in ((to_zero, 1), (positive, 0)):
            for o in ({}, opts):
                counted = CountingDenoiser(den)
                out = sample(name, counted, x, grid, noise=5, **o)
                assert counted.calls == NFE[name](11, z), (name, z, counted.calls)
        last = sample(name, den, x, positive, noise=5)
        torch.testing.assert_close(sample(name, den, x, to_zero, noise=5, **opts),
                                   den(last, positive[-1]).x0, rtol=0, atol=1e-12)
    assert out.shape == x.shape and torch.equal(x, x_before)  # the input is left alone


# options whose final steps differ: every way a multistep solver can end at the data
ENDINGS = {name: [{"lower_order_final": v} for v in (False, True, 3, "always", "long_step")]
           for name in ("dpmpp_2m", "dpmpp_3m", "dpm_solver_2m", "dpm_solver_3m")}
ENDINGS["dpmpp_3m"] += [{"second_difference": "taylor"}, {"second_difference": "half"}]
for _name in ("unipc_bh1", "unipc_bh2"):
    ENDINGS[_name] = [{"order": p, "corrector_order": q, "lower_order_final": lof}
                      for p in (1, 2, 3) for q in (1, 3) for lof in (False, "always")]
ENDINGS["pndm"] = ENDINGS["plms"] = [{"final": "multistep"}, {"final": "denoise"}]


@pytest.mark.parametrize("path_name", ["vp_discrete_linear", "edm", "ve", "linear"])
def test_no_sampler_returns_nan_on_grids_ending_at_zero(make_path, path_name):
    """Grids ending at exactly ``t = 0`` (``lambda = inf``, ``sigma = 0``), short and long, with
    a small or a large final step: every sampler and every way of ending stays finite (diffusers'
    UniPC-bh1 returns NaN there: ``B(h) = h`` is infinite)."""
    path = make_path(path_name)
    den = overlapping_mixture().denoiser(path)
    x = torch.randn(4, 3, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(4)) * path.prior_std
    grids = [timesteps.log_snr(path, k) for k in (2, 3, 5, 12)]
    grids += [torch.linspace(path.t_max, 0.0, k + 1, dtype=torch.float64) for k in (2, 4, 12)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in NFE:
            for opts in ENDINGS.get(name, [{}]):
                for grid in grids:
                    out = sample(name, den, x, grid, noise=3, **opts)
                    assert bool(torch.isfinite(out).all()), (name, opts, grid.tolist())


@pytest.mark.parametrize("path_name", ["vp_discrete_linear", "edm"])
def test_float32_images_through_a_network(make_path, path_name):
    """A float32 batch of images through ``Denoiser`` around a small network: every sampler
    keeps shape and dtype, stays finite, and is deterministic given its noise."""
    from difflab.denoiser import Denoiser

    path = make_path(path_name)
    torch.manual_seed(0)
    net = torch.nn.Conv2d(3, 3, 3, padding=1)
    den = Denoiser(lambda x, t_in, cond: 0.1 * torch.tanh(net(x)), path, prediction="eps")
    x = torch.randn(2, 3, 8, 8) * path.prior_std
    grid = timesteps.karras(path, 6)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in [*NFE, "dpm_adaptive"]:
            out = sample(name, den, x, grid, noise=1)
            assert out.shape == x.shape and out.dtype == torch.float32, name
            assert bool(torch.isfinite(out).all()), name
            torch.testing.assert_close(sample(name, den, x, grid, noise=1), out, rtol=0, atol=0)
