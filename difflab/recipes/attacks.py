"""White-box attacks on a differentiable classifier, written in difflab (no attack library).

Every attack here is projected gradient descent on the loss (Madry et al. 2018, "Towards Deep
Learning Models Resistant to Adversarial Attacks", eq. 2 and Sec. 2.1): starting at ``x`` (or a
random point of the ball around it), repeat

    x <- Proj_{B(x_orig, eps) & [lo, hi]}( x + step_size * d(grad_x L(f(x), y)) )

with ``d = sign`` for the L-inf ball and ``d = g / ||g||_2`` for the L2 ball, ``L`` the summed
cross-entropy (so each image's gradient is its own: the classifier must be in eval mode).

What differs between attacks is only *which gradient* PGD follows (:data:`GradientFn`):

* :func:`classifier_gradient`: the classifier's own gradient (the undefended model; used as a
  transfer attack against a defence).
* :func:`eot_gradient`: a randomised preprocessing ``transform(x, draw)`` in front of the
  classifier. Expectation over Transformation (EOT; Athalye, Carlini & Wagner 2018,
  "Obfuscated Gradients Give a False Sense of Security", Sec. 4.3; Athalye et al. 2018,
  "Synthesizing Robust Adversarial Examples") averages the gradient over ``samples`` draws of
  the transform's randomness, each differentiated *through* the transform (the full gradient);
  with ``bpda=True`` the transform's backward pass is replaced by the identity (Backward Pass
  Differentiable Approximation, Athalye et al. 2018, Sec. 4.1: ``x + (T(x) - x).detach()``, the
  straight-through estimator), so the gradient is the classifier's gradient at ``T(x)``.

Units: ``eps`` and ``step_size`` are in the units of ``x``. difflab images live in ``[-1, 1]``,
so a budget stated for ``[0, 1]`` pixels (MNIST's L-inf 0.3) is twice that here;
:func:`pixel_budget` converts, and :mod:`difflab.recipes.diffpure` takes pixel units.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from difflab.errors import DifflabError, bad_value

NORMS = ("linf", "l2")

GradientFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
"""``gradient(x, y, step) -> dL/dx`` (same shape as ``x``): what PGD ascends at attack step
``step`` (0-based); a stochastic gradient uses ``step`` to pick fresh randomness."""


# ----- checks ------------------------------------------------------------------------------------
def check_budget(eps, name: str = "eps") -> float:
    """``eps`` as a float if it is a finite number >= 0 (0: no perturbation)."""
    if isinstance(eps, bool) or not isinstance(eps, int | float) or not math.isfinite(eps) \
            or eps < 0:
        raise bad_value(name, eps, "a finite number >= 0 (an attack budget)")
    return float(eps)


def check_count(value, name: str) -> int:
    """``value`` if it is an integer >= 1 (attack steps, EOT samples)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise bad_value(name, value, "an integer >= 1")
    return value


def check_norm(norm: str) -> str:
    if norm not in NORMS:
        raise bad_value("norm", norm, "one of " + ", ".join(NORMS))
    return norm


def pixel_budget(eps: float, data_range: tuple[float, float] = (-1.0, 1.0)) -> float:
    """A budget for ``[0, 1]`` pixels in the units of data spanning ``data_range`` (x2 for
    difflab's ``[-1, 1]``; exact for L-inf and L2 alike, both norms being homogeneous)."""
    return check_budget(eps) * float(data_range[1] - data_range[0])


# ----- gradients ---------------------------------------------------------------------------------
def loss_gradient(classify: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                  y: torch.Tensor) -> torch.Tensor:
    """``grad_x sum_i CE(classify(x)_i, y_i)``; leaves no ``.grad`` on any parameter."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(classify(x), y, reduction="sum")
        (g,) = torch.autograd.grad(loss, x)
    return g.detach()


def classifier_gradient(classify: Callable[[torch.Tensor], torch.Tensor]) -> GradientFn:
    """The classifier's own input gradient (the undefended model)."""

    def gradient(x: torch.Tensor, y: torch.Tensor, step: int) -> torch.Tensor:
        return loss_gradient(classify, x, y)

    return gradient


def straight_through(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out`` in the forward pass, the identity in the backward pass (BPDA with ``g(x) = x``;
    Athalye et al. 2018, Sec. 4.1)."""
    return out.detach() + (x - x.detach())  # exactly ``out`` forward, identity back


def eot_gradient(classify: Callable[[torch.Tensor], torch.Tensor],
                 transform: Callable[[torch.Tensor, int], torch.Tensor], samples: int = 1,
                 bpda: bool = False) -> GradientFn:
    """EOT (Athalye et al. 2018, Sec. 4.3): ``(1/K) sum_k grad_x L(classify(T(x, d_k)), y)``.

    ``transform(x, draw)`` is the randomised preprocessing with its randomness picked by the
    integer ``draw``; attack step ``s`` uses the draws ``s * K, ..., s * K + K - 1``, so every
    step and every sample sees fresh randomness and the whole attack is reproducible. The
    ``K`` backward passes run one after the other (memory of one draw). ``bpda=True``
    differentiates each draw with the straight-through estimator instead of through ``T``.
    """
    check_count(samples, "samples")

    def gradient(x: torch.Tensor, y: torch.Tensor, step: int) -> torch.Tensor:
        total = torch.zeros_like(x)
        for k in range(samples):
            draw = step * samples + k
            if bpda:
                def f(v: torch.Tensor, draw: int = draw) -> torch.Tensor:
                    with torch.no_grad():
                        out = transform(v, draw)
                    return classify(straight_through(v, out))
            else:
                def f(v: torch.Tensor, draw: int = draw) -> torch.Tensor:
                    return classify(transform(v, draw))
            total += loss_gradient(f, x, y)
        return total / samples

    return gradient


# ----- PGD ---------------------------------------------------------------------------------------
def _row_norm(v: torch.Tensor) -> torch.Tensor:
    n = v.flatten(1).norm(dim=1).clamp_min(torch.finfo(v.dtype).tiny)
    return n.reshape(-1, *([1] * (v.ndim - 1)))


def project(delta: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """The nearest point of the ``norm`` ball of radius ``eps`` (per row)."""
    if norm == "linf":
        return delta.clamp(-eps, eps)
    return delta * torch.clamp(eps / _row_norm(delta), max=1.0)


def random_start(x: torch.Tensor, eps: float, norm: str,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """A uniform random point of the ball (Madry et al. 2018 restart from one): for L-inf
    each coordinate uniform in ``[-eps, eps]``; for L2 a uniform direction times
    ``eps * U^(1/d)``."""
    shape = x.shape
    if norm == "linf":
        u = torch.rand(shape, generator=generator, dtype=x.dtype)
        return ((2 * u - 1) * eps).to(x.device)
    d = x[0].numel()
    z = torch.randn(shape, generator=generator, dtype=x.dtype)
    r = torch.rand((shape[0],), generator=generator, dtype=x.dtype) ** (1.0 / d)
    z = z / _row_norm(z) * (eps * r).reshape(-1, *([1] * (x.ndim - 1)))
    return z.to(x.device)


def pgd(x: torch.Tensor, y: torch.Tensor, gradient: GradientFn, *, eps: float,
        norm: str = "linf", steps: int = 10, step_size: float | None = None,
        random_init: bool = True, generator: torch.Generator | None = None,
        start: torch.Tensor | None = None, bounds: tuple[float, float] = (-1.0, 1.0),
        callback: Callable[[int], None] | None = None) -> torch.Tensor:
    """Projected gradient ascent on the loss (Madry et al. 2018); returns the last iterate.

    Args:
        x, y: images (in ``bounds``) and their labels.
        gradient: ``gradient(x, y, step)`` (:func:`classifier_gradient`, :func:`eot_gradient`).
        eps: the budget, in the units of ``x``, for ``norm`` (``linf`` or ``l2``).
        steps: attack iterations.
        step_size: per-step move (default ``2.5 eps / steps``, which lets the iterates cross
            the whole ball even from a random start).
        random_init: start at a uniform random point of the ball (drawn from ``generator``).
        start: the initial perturbation instead (e.g. one drawn per image); projected.
        bounds: the valid pixel range; every iterate is clipped to it.
        callback: called with the step index after each step (progress bars).

    Every iterate lies in the ball around ``x`` and in ``bounds``: clipping to the box after
    projecting to the ball can only shrink each coordinate's offset.
    """
    eps = check_budget(eps)
    norm = check_norm(norm)
    steps = check_count(steps, "steps")
    step_size = 2.5 * eps / steps if step_size is None else check_budget(step_size,
                                                                          "step_size")
    lo, hi = bounds
    if not lo < hi:
        raise bad_value("bounds", bounds, "(lo, hi) with lo < hi")
    if x.shape[0] != y.shape[0]:
        raise DifflabError(f"{x.shape[0]} images but {y.shape[0]} labels")
    x0 = x.detach()
    if eps == 0:
        return x0.clone()
    if start is not None:
        if start.shape != x0.shape:
            raise DifflabError(f"start has shape {tuple(start.shape)}, the images "
                               f"{tuple(x0.shape)}")
        delta = project(start.to(x0), eps, norm)
    elif random_init:
        delta = random_start(x0, eps, norm, generator)
    else:
        delta = torch.zeros_like(x0)
    delta = (x0 + delta).clamp(lo, hi) - x0
    for i in range(steps):
        g = gradient(x0 + delta, y, i)
        if g.shape != x0.shape:
            raise DifflabError(f"the gradient has shape {tuple(g.shape)}, the images "
                               f"{tuple(x0.shape)}")
        move = g.sign() if norm == "linf" else g / _row_norm(g)
        delta = project(delta + step_size * move, eps, norm)
        delta = (x0 + delta).clamp(lo, hi) - x0
        if callback is not None:
            callback(i)
    return (x0 + delta).detach()


def pgd_linf(classify: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor,
             eps: float, steps: int = 10, **kwargs) -> torch.Tensor:
    """PGD in the L-inf ball on the classifier itself (``eps`` in the units of ``x``)."""
    return pgd(x, y, classifier_gradient(classify), eps=eps, norm="linf", steps=steps, **kwargs)


def pgd_l2(classify: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor,
           eps: float, steps: int = 10, **kwargs) -> torch.Tensor:
    """PGD in the L2 ball on the classifier itself (``eps`` in the units of ``x``)."""
    return pgd(x, y, classifier_gradient(classify), eps=eps, norm="l2", steps=steps, **kwargs)
