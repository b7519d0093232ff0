"""difflab's samplers against the same algorithms in diffusers and k-diffusion.

Each test runs one difflab sampler and its peer on the exact Gaussian-mixture oracle (three
components in 8 dimensions, 6 samples, float64), on the same grid, from the same state, and
asserts a max abs difference <= 1e-10 (observed: 1e-16 to 1e-11, most below 1e-13). The peers
are driven by :mod:`difflab.testing.peers` (diffusers' schedulers in float64, k-diffusion's
``sampling.py`` loaded alone). Where difflab's defaults differ from the peer's, the test sets
them explicitly; stochastic pairs share their noise draws.

Covered (difflab sampler <- peer, with the configuration that makes them the same algorithm):

* ``ddim`` (``eta`` 0 and 1) <- ``DDIMScheduler`` (DDPM and Stable Diffusion schedules,
  ``epsilon`` / ``v_prediction`` / ``sample``); ``DPMSolverMultistepScheduler(solver_order=1)``.
* ``dpmpp_2m`` <- ``DPMSolverMultistepScheduler(dpmsolver++, order 2, midpoint)`` (final
  ``zero`` or ``sigma_min``, Karras sigmas), ``EDMDPMSolverMultistepScheduler``,
  k-diffusion ``sample_dpmpp_2m`` and ``sample_dpmpp_2m_sde(eta=0)``.
* ``dpmpp_3m(second_difference="half")`` <- ``DPMSolverMultistepScheduler(dpmsolver++,
  order 3, heun)``, ``EDMDPMSolverMultistepScheduler(order 3)``,
  ``sample_dpmpp_3m_sde(eta=0)``; ``dpm_solver_2m`` / ``dpm_solver_3m(second_difference=
  "half")`` <- ``DPMSolverMultistepScheduler(dpmsolver, order 2 / 3, sigma_min)``. Order 3
  needs diffusers' ``solver_type="heun"``: its second-order warm-up step is then difflab's
  (``h^2 phi_2 x0'``). diffusers' ``lower_order_final`` (below 15 steps) is difflab's
  ``lower_order_final=15`` on grids ending at ``t_min`` (``True``, below 10, where both lower).
* ``dpmpp_2m_sde`` <- ``DPMSolverMultistepScheduler(sde-dpmsolver++, order 2, heun)`` and
  k-diffusion ``sample_dpmpp_2m_sde(eta=1, solver_type="heun")``.
* ``dpmpp_2s`` (``r`` 1/2, 1/3) <- k-diffusion ``sample_dpmpp_2s_ancestral(eta=0)``,
  ``sample_dpmpp_sde(eta=0, r)``; ``dpmpp_2s`` / ``dpm_solver_2`` then ``ddim`` <-
  ``DPMSolverSinglestepScheduler(order 2, midpoint, exponential sigmas)`` (uniform in
  log-SNR, so its intermediate points are difflab's ``r = 1/2``; its last pair is two
  first-order steps).
* ``dpm_solver_2`` <- ``KDPM2DiscreteScheduler``, k-diffusion ``sample_dpm_2``;
  ``dpm_solver_3`` / ``_2`` / ``_1`` in sequence <- ``sample_dpm_fast`` (its order pattern).
* ``unipc_bh1`` / ``unipc_bh2`` (orders 2 and 3, with and without UniC, ``corrector_order=
  order``) <- ``UniPCMultistepScheduler`` (its ``lower_order_final`` is difflab's
  ``"always"`` on grids ending at ``t_min``).
* ``deis`` (orders 1-3) <- ``DEISMultistepScheduler`` (log-rho), on a VE path where
  ``log rho`` is affine in ``t`` (there tAB in ``t`` is the peer's polynomial in log rho);
  ``deis(mode="rhoab")`` (orders 1-3) and ``ipndm_v`` <- k-diffusion ``sample_lms``.
* ``euler`` <- ``EulerDiscreteScheduler`` (also Karras sigmas), ``EDMEulerScheduler``,
  k-diffusion ``sample_euler``; ``heun`` <- ``HeunDiscreteScheduler``, ``sample_heun``;
  ``euler_ancestral`` <- ``sample_euler_ancestral``.
* ``dpm_adaptive(controller="pid", pcoeff=0, icoeff=1)`` <- ``sample_dpm_adaptive`` on EDM's
  path (``alpha = 1``), absolute tolerance only, with ``norm="batch"`` (or one sample at a
  time).

Same method, not the same numbers (untested, on purpose or by a peer's limits):

* ``dpmpp_3m`` / ``dpm_solver_3m`` with ``second_difference="taylor"``: all the peers put half
  the Taylor weight on the second divided difference (their ``D2`` term is
  ``h^3 phi_3 x0''/2`` where the expansion has ``h^3 phi_3 x0''``), which is difflab's
  ``"half"`` (tested above); that the Taylor weight is a different method is tested below.
* ``lower_order_final`` before a final ``sigma = 0`` (order 3): diffusers' DPM-Solver (with
  ``lower_order_final``) and UniPC count the final step as their order-1 step and lower the
  last *solver* step to order 2; difflab lowers that one to order 1. Tested where the rules
  coincide.
* ``UniPCMultistepScheduler(bh1, final_sigmas_type="zero")`` returns NaN (``B(h) = h`` is
  infinite at ``sigma = 0``).
* ``PNDMScheduler`` vs ``pndm`` / ``plms``: diffusers' fixed Adams-Bashforth weights and
  Runge-Kutta midpoints are uniform in the timestep index, difflab's in ``rho`` (PLMS with the
  fixed weights matches to 1e-14); ``IPNDMScheduler`` starts at ``alpha = cos(pi/2)``, where its
  ``x0 = (x - sin eps) / cos`` is ill-conditioned, and, like ``LMSDiscreteScheduler`` and
  ``sample_lms`` on grids ending at 0, extrapolates the multistep noise to ``sigma = 0`` where
  difflab returns ``x0_hat``.
* ``DPMSolverSinglestepScheduler(order 3)`` is neither DPM-Solver-3 variant (its intermediate
  step uses ``solver_type``'s second-order formula, Alg. 2 needs "heun" there and "midpoint"
  after); ``sample_dpm_adaptive`` on other paths measures its error on ``x / alpha``, with
  ``rtol`` against the previous ``x_low`` (difflab: ``x``, the current state).
* Not compared: samplers whose peers draw their own noise (``DDPMScheduler``,
  ``EulerAncestralDiscreteScheduler``, ``KDPM2AncestralDiscreteScheduler``, churn in
  ``sample_euler`` / ``sample_heun``) or need torchsde; flow-matching schedulers start at
  ``alpha = 0``; LCM, TCD, SA-Solver have no difflab twin.
"""

from __future__ import annotations

import math

import pytest
import torch

from difflab.denoiser import FnDenoiser
from difflab.paths import EDM, VE, VP
from difflab.samplers import sample, timesteps
from difflab.testing import GaussianMixture
from difflab.testing.peers import (
    difflab_grid_for,
    difflab_grid_for_sigmas,
    difflab_path_for,
    load_k_diffusion_sampling,
    run_diffusers,
    run_k_diffusion,
)

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore::FutureWarning"),  # diffusers' "dpmsolver"
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]  # numpy 2 on tensors

TOL = 1e-10
STEPS = [5, 8, 12, 25]
SHORT = [5, 8]  # below difflab's 10-step lower_order_final threshold

_g = torch.Generator().manual_seed(0)
MIX = GaussianMixture(torch.randn(3, 8, generator=_g, dtype=torch.float64),
                      0.1 + 0.3 * torch.rand(3, generator=_g, dtype=torch.float64),
                      [0.2, 0.5, 0.3])
NOISE = torch.randn(6, 8, generator=_g, dtype=torch.float64)  # x_T on the VP scale

DDPM = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
          beta_schedule="scaled_linear")


def start(path, grid) -> torch.Tensor:
    """``NOISE`` as the state at ``grid[0]`` on ``path``'s scale (the same VP-scale draw)."""
    rho = float(path.sigma_ve(grid[:1]))
    return NOISE * (float(path.alpha(grid[:1])) * math.sqrt(1.0 + rho * rho))


def assert_close(ours: torch.Tensor, peer: torch.Tensor) -> None:
    assert bool(torch.isfinite(peer).all())
    diff = float((ours - peer).abs().max())
    assert diff <= TOL, f"max |difflab - peer| = {diff:.3g}"


class Recorder:
    """A difflab noise source that keeps its draws, to hand the same ones to a peer."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.draws: list[torch.Tensor] = []

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.randn(x.shape, generator=self.generator, dtype=x.dtype)
        self.draws.append(z)
        return z

    def padded(self, n: int) -> list[torch.Tensor]:
        """The draws, then zeros up to ``n`` (peers also step into the data, without noise)."""
        return self.draws + [torch.zeros_like(self.draws[0])] * (n - len(self.draws))


# ----- diffusers ---------------------------------------------------------------------------------
def _diffusers():
    import diffusers

    return diffusers


def check_scheduler(scheduler, name: str, steps: int, path=None, grid_slice=None, then=None,
                    **options) -> None:
    """``sample(name, ...)`` on the scheduler's grid against ``run_diffusers``.

    ``path``: the difflab path (default: the scheduler's own); ``grid_slice`` / ``then``: run
    ``name`` on ``grid[grid_slice]`` and then ``then`` on the rest (composite schedules).
    """
    path = difflab_path_for(scheduler) if path is None else path
    den = MIX.denoiser(path)
    grid = difflab_grid_for(scheduler, path, steps)
    x = start(path, grid)
    if grid_slice is None:
        ours = sample(name, den, x, grid, **options)
    else:
        part = grid[grid_slice]
        ours = sample(then, den, sample(name, den, x, part, **options),
                      grid[int(torch.nonzero(grid == part[-1])[0]):])
    assert_close(ours, run_diffusers(scheduler, den, x, steps))


@pytest.mark.parametrize("steps", STEPS)
def test_ddim_matches_diffusers_ddim(steps):
    d = _diffusers()
    check_scheduler(d.DDIMScheduler(**DDPM, clip_sample=False, set_alpha_to_one=True), "ddim",
                    steps)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("steps", [5, 12, 25])
def test_ddim_matches_diffusers_ddim_with_stable_diffusions_schedule(prediction, steps):
    """SD's scheduler config: scaled-linear betas, ``steps_offset=1``, last step to
    ``alpha_bar_0`` (``set_alpha_to_one=False``); every prediction type."""
    d = _diffusers()
    check_scheduler(d.DDIMScheduler(**SD, clip_sample=False, set_alpha_to_one=False,
                                    steps_offset=1, prediction_type=prediction), "ddim", steps)


@pytest.mark.parametrize("eta", [0.5, 1.0])
@pytest.mark.parametrize("steps", [5, 25])
def test_stochastic_ddim_matches_diffusers_ddim_with_the_same_noise(eta, steps):
    d = _diffusers()
    sched = d.DDIMScheduler(**DDPM, clip_sample=False, set_alpha_to_one=True)
    path = difflab_path_for(sched)
    den, grid = MIX.denoiser(path), difflab_grid_for(sched, path, steps)
    noise = Recorder(1)
    ours = sample("ddim", den, NOISE, grid, eta=eta, noise=noise)
    assert len(noise.draws) == steps - 1
    assert_close(ours, run_diffusers(sched, den, NOISE, steps, eta=eta,
                                     variance_noise=noise.padded(steps)))


@pytest.mark.parametrize("steps", STEPS)
def test_first_order_dpm_solver_is_ddim(steps):
    d = _diffusers()
    check_scheduler(d.DPMSolverMultistepScheduler(**DDPM, solver_order=1), "ddim", steps)


# diffusers' DPM-Solver lowers the order of its last step for a final sigma = 0 (always) and,
# with lower_order_final, of its last two steps below 15 steps; difflab's final 0 is that
# first-order step (x0_hat), and its lower_order_final=N lowers the last two solver steps below
# N of them (True: N = 10). With a final 0 diffusers' two lowered steps are difflab's last
# solver step and its final step: no difflab option lowers that solver step to order 2 only.
DPM_CASES = [
    # (algorithm, order, final_sigmas_type, diffusers lower_order_final, difflab options, steps)
    *[("dpmsolver++", p, "zero", False, {"lower_order_final": False}, s)
      for p in (2, 3) for s in STEPS],
    *[("dpmsolver++", 2, "zero", True, {"lower_order_final": False}, s) for s in STEPS],
    *[(alg, p, "sigma_min", False, {"lower_order_final": False}, s)
      for alg in ("dpmsolver++", "dpmsolver") for p in (2, 3) for s in STEPS],
    *[(alg, p, "sigma_min", True, {"lower_order_final": lof}, s)
      for alg in ("dpmsolver++", "dpmsolver") for p in (2, 3)
      for lof, steps in ((True, SHORT), (15, STEPS)) for s in steps],
]


@pytest.mark.parametrize("algorithm,order,final,lof,options,steps", DPM_CASES)
def test_multistep_dpm_solver_matches_diffusers(algorithm, order, final, lof, options, steps):
    """Orders 2 and 3, data and noise form. Order 3: diffusers' second-order warm-up step is
    its ``solver_type="heun"`` one (``h^2 phi_2 f'``, difflab's Taylor step) and its ``D2`` term
    is difflab's ``second_difference="half"``; order 2 is the "midpoint" (Adams) form."""
    d = _diffusers()
    sched = d.DPMSolverMultistepScheduler(**DDPM, algorithm_type=algorithm, solver_order=order,
                                          solver_type="midpoint" if order == 2 else "heun",
                                          final_sigmas_type=final, lower_order_final=lof)
    form = "dpmpp" if algorithm == "dpmsolver++" else "dpm_solver"
    if order == 3:
        options = {**options, "second_difference": "half"}
    check_scheduler(sched, f"{form}_{order}m", steps, **options)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [5, 12, 25])
def test_dpmpp_2m_matches_diffusers_on_karras_sigmas(prediction, steps):
    """Karras sigmas sit between diffusers' integer timesteps: the oracle is evaluated at the
    scheduler's own noise level (the timesteps it would feed a network are rounded)."""
    d = _diffusers()
    sched = d.DPMSolverMultistepScheduler(**SD, solver_order=2, use_karras_sigmas=True,
                                          prediction_type=prediction)
    check_scheduler(sched, "dpmpp_2m", steps, lower_order_final=False)


@pytest.mark.parametrize("steps", STEPS)
def test_dpmpp_2m_sde_matches_diffusers_with_the_same_noise(steps):
    """SDE-DPM-Solver++(2M): difflab's ``(h - (1 - e^-2h)/2) x0'`` term is diffusers' "heun"
    variant (its "midpoint" one uses ``(1 - e^-2h) h x0' / 2``)."""
    d = _diffusers()
    sched = d.DPMSolverMultistepScheduler(**DDPM, algorithm_type="sde-dpmsolver++",
                                          solver_order=2, solver_type="heun")
    path = difflab_path_for(sched)
    den, grid = MIX.denoiser(path), difflab_grid_for(sched, path, steps)
    noise = Recorder(2)
    ours = sample("dpmpp_2m_sde", den, NOISE, grid, noise=noise)
    assert_close(ours, run_diffusers(sched, den, NOISE, steps,
                                     variance_noise=noise.padded(steps)))


@pytest.mark.parametrize("algorithm,final", [("dpmsolver++", "zero"),
                                             ("dpmsolver++", "sigma_min"),
                                             ("dpmsolver", "sigma_min")])
@pytest.mark.parametrize("steps", [6, 8, 12, 24])
def test_singlestep_dpm_solver_2_matches_diffusers(algorithm, final, steps):
    """diffusers' singlestep order 2 visits ``sigma_1, sigma_3, ...`` as the intermediate points
    of steps ``sigma_0 -> sigma_2 -> ...``; exponential sigmas are uniform in log-SNR, so these
    are difflab's ``r = 1/2`` midpoints. Its last pair is two first-order steps (with
    ``sigma_min``, the second has length 0): ``ddim`` from the last pair's start."""
    d = _diffusers()
    sched = d.DPMSolverSinglestepScheduler(**DDPM, algorithm_type=algorithm, solver_order=2,
                                           use_exponential_sigmas=True,
                                           final_sigmas_type=final, lower_order_final=True)
    name = "dpmpp_2s" if algorithm == "dpmsolver++" else "dpm_solver_2"
    check_scheduler(sched, name, steps, grid_slice=slice(0, steps - 1, 2), then="ddim")


UNIPC_CASES = [
    # (solver_type, order, corrector, final_sigmas_type, diffusers lower_order_final,
    #  difflab lower_order_final, steps)
    *[(bh, p, c, "sigma_min", False, False, s)
      for bh in ("bh1", "bh2") for p in (2, 3) for c in (True, False) for s in (5, 12, 25)],
    *[(bh, p, c, "sigma_min", True, lof, s)
      for bh in ("bh1", "bh2") for p in (2, 3) for c in (True, False)
      for lof, steps in ((True, SHORT), ("always", (12, 25))) for s in steps],
    *[("bh2", 2, c, "zero", True, False, s) for c in (True, False) for s in STEPS],
]


@pytest.mark.parametrize("bh,order,corrector,final,lof_peer,lof,steps", UNIPC_CASES)
def test_unipc_matches_diffusers(bh, order, corrector, final, lof_peer, lof, steps):
    """diffusers pairs UniP-p with UniC-p (``corrector_order=order``) and lowers the orders of
    the last steps on every grid (``"always"``); with a final 0 its order-1 step is the final
    denoising step, so for order 2 no solver step is lowered."""
    d = _diffusers()
    sched = d.UniPCMultistepScheduler(
        **DDPM, solver_type=bh, solver_order=order, final_sigmas_type=final,
        lower_order_final=lof_peer, disable_corrector=[] if corrector else list(range(steps)))
    check_scheduler(sched, f"unipc_{bh}", steps, order=order, corrector=corrector,
                    corrector_order=order, lower_order_final=lof)


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("steps", STEPS)
def test_deis_matches_diffusers_where_log_rho_is_affine_in_t(order, steps):
    """On VE's path ``log rho = log sigma`` is affine in ``t``, so tAB-DEIS (a polynomial in
    ``t``) is diffusers' log-rho DEIS; the oracle on that path has the same posterior at each
    noise level as on the scheduler's own schedule."""
    d = _diffusers()
    sched = d.DEISMultistepScheduler(**DDPM, solver_order=order, lower_order_final=False)
    check_scheduler(sched, "deis", steps, path=VE(sigma_min=0.005, sigma_max=200.0),
                    order=order)


@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("peer,name", [("EulerDiscreteScheduler", "euler"),
                                       ("HeunDiscreteScheduler", "heun"),
                                       ("KDPM2DiscreteScheduler", "dpm_solver_2")])
def test_sigma_space_schedulers_match(peer, name, spacing, steps):
    d = _diffusers()
    check_scheduler(getattr(d, peer)(**DDPM, timestep_spacing=spacing), name, steps)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("steps", [5, 12, 25])
def test_euler_matches_diffusers_euler_on_karras_sigmas(prediction, steps):
    d = _diffusers()
    check_scheduler(d.EulerDiscreteScheduler(**SD, use_karras_sigmas=True,
                                             prediction_type=prediction), "euler", steps)


@pytest.mark.parametrize("steps", [5, 12, 25])
def test_edm_schedulers_match_on_edms_path(steps):
    d = _diffusers()
    check_scheduler(d.EDMEulerScheduler(), "euler", steps, path=EDM())
    check_scheduler(d.EDMDPMSolverMultistepScheduler(solver_order=2, lower_order_final=False),
                    "dpmpp_2m", steps, path=EDM(), lower_order_final=False)
    check_scheduler(d.EDMDPMSolverMultistepScheduler(solver_order=3, solver_type="heun",
                                                     lower_order_final=False),
                    "dpmpp_3m", steps, path=EDM(), lower_order_final=False,
                    second_difference="half")


@pytest.mark.parametrize("peer", ["DPMSolverMultistepScheduler", "UniPCMultistepScheduler"])
def test_run_diffusers_evaluates_a_float32_model_in_float32(peer):
    """``model_dtype=torch.float32`` (a trained network): the denoiser sees float32 inputs under
    the caller's default dtype; the scheduler stays in float64, so the result is the float64
    run's up to the model's float32 rounding."""
    d = _diffusers()
    sched = getattr(d, peer)(**DDPM)
    path = difflab_path_for(sched)
    oracle = MIX.denoiser(path)
    seen = []

    def fn(x_t, t, cond):
        seen.append((x_t.dtype, torch.get_default_dtype()))
        pred = oracle(x_t.to(torch.float64), t)
        return type(pred).from_x0(pred.x0.to(torch.float32), x_t, t, path)

    den = FnDenoiser(fn, path)
    grid = difflab_grid_for(sched, path, 8)
    x = start(path, grid)
    ours = run_diffusers(sched, den, x, 8, model_dtype=torch.float32)
    assert ours.dtype == torch.float64 and len(seen) == 8
    assert set(seen) == {(torch.float32, torch.float32)}
    diff = float((ours - run_diffusers(sched, oracle, x, 8)).abs().max())
    assert 0 < diff < 1e-5, diff


# ----- k-diffusion -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def kd():
    return load_k_diffusion_sampling()


KD_PATHS = {"edm": EDM, "vp": VP.discrete_linear}
NO_NOISE = lambda sigma, sigma_next: 0.0  # noqa: E731  (the SDE samplers at eta = 0)

KD_CASES = [
    # (k-diffusion function, its options, difflab sampler, options, grids: "zero" / "positive")
    ("sample_euler", {}, "euler", {}, ("zero", "positive")),
    ("sample_heun", {}, "heun", {}, ("zero", "positive")),
    ("sample_dpm_2", {}, "dpm_solver_2", {}, ("zero", "positive")),
    ("sample_dpmpp_2m", {}, "dpmpp_2m", {"lower_order_final": False}, ("zero", "positive")),
    ("sample_dpmpp_2m_sde", {"eta": 0.0, "noise_sampler": NO_NOISE}, "dpmpp_2m",
     {"lower_order_final": False}, ("zero", "positive")),
    ("sample_dpmpp_2s_ancestral", {"eta": 0.0}, "dpmpp_2s", {}, ("zero", "positive")),
    ("sample_dpmpp_sde", {"eta": 0.0, "r": 1 / 3, "noise_sampler": NO_NOISE}, "dpmpp_2s",
     {"r": 1 / 3}, ("zero", "positive")),
    ("sample_dpmpp_3m_sde", {"eta": 0.0, "noise_sampler": NO_NOISE}, "dpmpp_3m",
     {"lower_order_final": False, "second_difference": "half"}, ("zero", "positive")),
    ("sample_lms", {}, "ipndm_v", {}, ("positive",)),
    *[("sample_lms", {"order": k}, "deis", {"order": k, "mode": "rhoab"}, ("positive",))
      for k in (1, 2, 3)],
]


def kd_grid(path, steps: int, to_zero: bool):
    grid = timesteps.karras(path, steps, to_zero=to_zero)
    return grid, path.sigma_ve(grid)


@pytest.mark.parametrize("path_name", list(KD_PATHS))
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("fn,kw,name,options,ends", KD_CASES,
                         ids=[f"{c[0]}-{c[2]}-{i}" for i, c in enumerate(KD_CASES)])
def test_k_diffusion_samplers_match(kd, fn, kw, name, options, ends, path_name, steps):
    path = KD_PATHS[path_name]()
    den = MIX.denoiser(path)
    for end in ends:
        grid, sigmas = kd_grid(path, steps, to_zero=end == "zero")
        x = start(path, grid)
        assert_close(sample(name, den, x, grid, **options),
                     run_k_diffusion(getattr(kd, fn), den, x, sigmas, **kw))


def replay(draws):
    """k-diffusion's ``noise_sampler(sigma, sigma_next)`` returning ``draws`` in order."""
    it = iter(draws)
    return lambda sigma, sigma_next: next(it)


@pytest.mark.parametrize("path_name", list(KD_PATHS))
@pytest.mark.parametrize("steps", [5, 25])
def test_stochastic_k_diffusion_samplers_match_with_the_same_noise(kd, path_name, steps):
    path = KD_PATHS[path_name]()
    den = MIX.denoiser(path)
    grid, sigmas = kd_grid(path, steps, to_zero=True)
    x = start(path, grid)
    noise = Recorder(3)
    ours = sample("euler_ancestral", den, x, grid, noise=noise)
    assert_close(ours, run_k_diffusion(kd.sample_euler_ancestral, den, x, sigmas,
                                       noise_sampler=replay(noise.padded(steps))))
    noise = Recorder(4)
    ours = sample("dpmpp_2m_sde", den, x, grid, noise=noise)
    assert_close(ours, run_k_diffusion(kd.sample_dpmpp_2m_sde, den, x, sigmas, eta=1.0,
                                       solver_type="heun",
                                       noise_sampler=replay(noise.padded(steps))))


@pytest.mark.parametrize("path_name", list(KD_PATHS))
@pytest.mark.parametrize("nfe", [5, 6, 12, 25])
def test_dpm_solver_fast_is_dpm_solver_3_2_1_in_sequence(kd, path_name, nfe):
    """k-diffusion's DPM-Solver-fast (Lu et al. 2022, Sec. 3.4): ``n // 3 + 1`` steps uniform
    in log-SNR, of orders ``3, .., 3, 2, 1`` (``n % 3 == 0``) or ``3, .., 3, n % 3``."""
    path = KD_PATHS[path_name]()
    den = MIX.denoiser(path)
    m = nfe // 3 + 1
    orders = [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]
    s_min, s_max = float(path.sigma_ve(path.t_min)), float(path.sigma_ve(path.t_max))
    lam = torch.linspace(-math.log(s_max), -math.log(s_min), m + 1, dtype=torch.float64)
    grid = difflab_grid_for_sigmas(path, torch.exp(-lam))
    x = start(path, grid)
    ours = x
    for i, order in enumerate(orders):
        ours = sample(f"dpm_solver_{order}", den, ours, grid[i:i + 2])
    assert_close(ours, run_k_diffusion(kd.sample_dpm_fast, den, x, (s_min, s_max), n=nfe))


@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("atol", [1e-3, 1e-4])
@pytest.mark.parametrize("norm", ["sample", "batch"])
def test_dpm_adaptive_matches_k_diffusion_with_its_integral_controller(kd, order, atol, norm):
    """Equal where the designs coincide: ``alpha = 1`` (k-diffusion measures the error on
    ``x / alpha``), ``rtol`` so small that ``atol`` sets the scale (its ``rtol`` refers to the
    previous ``x_low``), and its one norm over the batch: ``norm="batch"``, or the per-sample
    norm one sample at a time."""
    path = EDM()
    den = MIX.denoiser(path)
    grid = torch.tensor([path.t_max, path.t_min], dtype=torch.float64)
    x = start(path, grid)
    batches = [x[i:i + 1] for i in range(3)] if norm == "sample" else [x]
    for rows in batches:
        ours = sample("dpm_adaptive", den, rows, grid, order=order, rtol=1e-9, atol=atol,
                      controller="pid", pcoeff=0.0, icoeff=1.0, dcoeff=0.0, norm=norm)
        assert_close(ours, run_k_diffusion(kd.sample_dpm_adaptive, den, rows,
                                           (path.sigma_min, path.sigma_max), order=order,
                                           rtol=1e-9, atol=atol))


# ----- the documented difference -----------------------------------------------------------------
@pytest.mark.parametrize("steps", [5, 12])
def test_the_peers_third_order_step_is_not_the_taylor_one(steps):
    """The peers' DPM-Solver++(3M) is ``second_difference="half"`` (tested above), not the
    Taylor weight: the two are different methods, not a rounding apart."""
    d = _diffusers()
    path = EDM()
    sched = d.EDMDPMSolverMultistepScheduler(solver_order=3, solver_type="heun",
                                             lower_order_final=False)
    den, grid = MIX.denoiser(path), difflab_grid_for(sched, path, steps)
    x = start(path, grid)
    ours = sample("dpmpp_3m", den, x, grid, lower_order_final=False, second_difference="taylor")
    assert float((ours - run_diffusers(sched, den, x, steps)).abs().max()) > 1e-4
