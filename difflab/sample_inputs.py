"""What a sampling request starts from: the time grid (a formula's, truncated for
image-to-image by ``strength`` or started at ``t0``), the per-sample seeds, init images in the
model's space, and the depth maps of a depth-conditioned model. :mod:`difflab.sampling` turns
these into samples (and re-exports every name here)."""

from __future__ import annotations

import os
from typing import Any

import torch

from difflab.cond import Cond
from difflab.errors import DifflabError, bad_value
from difflab.paths import EDM, VE, DiscreteVP, GaussianPath
from difflab.runs import LoadedRun


# ----- grids and seeds ---------------------------------------------------------------------------
def auto_grid_name(path: GaussianPath) -> str:
    """``discrete`` on discrete paths, ``karras`` on VE / EDM, ``uniform`` otherwise."""
    if isinstance(path, DiscreteVP):
        return "discrete"
    if isinstance(path, (VE, EDM)):
        return "karras"
    return "uniform"


def sampling_grid(path: GaussianPath, steps: int, grid: str = "auto",
                  grid_options: dict[str, Any] | None = None) -> torch.Tensor:
    """The time grid named ``grid`` (``auto``: :func:`auto_grid_name`) with ``steps`` steps."""
    from difflab.samplers.timesteps import TUNED, make_grid

    name = auto_grid_name(path) if grid == "auto" else grid
    if name == TUNED:  # resolved to its times by resolve_settings
        name = "custom"
    return make_grid(name, path, steps, **(grid_options or {}))


def strength_grid(t_grid: torch.Tensor, strength: float) -> torch.Tensor:
    """The last ``int(steps * strength)`` steps of a grid (image-to-image), ``steps`` being the
    grid's own: diffusers' ``StableDiffusionImg2ImgPipeline`` counts them the same way."""
    steps = t_grid.numel() - 1
    keep = min(int(steps * strength), steps)
    if keep < 1:
        raise DifflabError(f"strength={strength} with {steps} steps runs no step: use a strength "
                           f">= {1 / steps:.3g} or more steps")
    return t_grid[steps - keep:]


def check_t0(t0: Any, name: str = "t0", hint: str = "") -> float:
    """``t0`` as a float if it lies in ``(0, 1]`` (a fraction of the path's time range); the
    error names ``name`` and adds ``hint``."""
    if isinstance(t0, bool) or not isinstance(t0, int | float) or not 0 < t0 <= 1:
        raise bad_value(name, t0, "a number in (0, 1] (a fraction of the path's time range"
                        + (f"; {hint}" if hint else "") + ")")
    return float(t0)


def encode_images(run: LoadedRun, x: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Pixels ``(N, C, H, W)`` in the run's sampling space: the codec's scaled posterior mean
    for a latent run (on the CPU), the pixels themselves otherwise."""
    codec = run.codec
    if codec is None:
        return x
    with torch.no_grad():
        device = next(iter(codec.parameters()), torch.empty(0)).device
        return torch.cat([codec.to_latent(b.to(device), sample=False).cpu()
                          for b in x.split(max(1, batch_size))])


def start_grid(path: GaussianPath, steps: int, grid: str = "auto",
               grid_options: dict[str, Any] | None = None, t0: float = 1.0) -> torch.Tensor:
    """``steps`` steps from ``t0 * path.t_max`` down to the data (SDEdit, Meng et al. 2022,
    Alg. 1: ``N`` steps of ``t0 / N`` each), so the budget does not shrink with ``t0``.

    ``t0 = 1`` is :func:`sampling_grid` itself. Below it, the continuous grids (uniform,
    quadratic, log_snr, karras) start at ``t0 * t_max``; the discrete grid takes the path's own
    steps below the one nearest ``t0``, spaced as ``trailing`` spacing spaces a full path (so
    the first is that step itself); a custom or tuned grid is truncated there
    (:func:`~difflab.samplers.timesteps.grid_from`).
    """
    from difflab.samplers.timesteps import TUNED, discrete, grid_from

    t0 = check_t0(t0)
    if t0 == 1:
        return sampling_grid(path, steps, grid, grid_options)
    name = auto_grid_name(path) if grid == "auto" else grid
    t_start = t0 * path.t_max
    if name in ("uniform", "quadratic", "log_snr", "karras"):
        if not t_start > path.t_min:
            raise DifflabError(f"t0={t0} starts at t={t_start:.3g}, below the path's t_min="
                               f"{path.t_min:g}: use a larger t0")
        from difflab.samplers.timesteps import make_grid

        g = make_grid(name, path, steps, **{**(grid_options or {}), "t_start": t_start})
        if float(g[1]) < t_start:  # an inverted log-SNR / sigma may miss t_start slightly
            g[0] = t_start
        return g
    if name == "discrete":
        if isinstance(path, DiscreteVP):
            if grid_options:
                raise DifflabError(f"grid options {sorted(grid_options)} do not apply to a "
                                   f"discrete grid started at t0={t0}: its steps are the path's "
                                   "below t0, trailing-spaced")
            top = max(1, round(t0 * path.N))  # steps 0 .. top-1 lie at or below t0
            if steps > top:
                raise DifflabError(f"t0={t0} leaves {top} of the path's {path.N} steps: ask for "
                                   f"at most {top} steps")
            idx = torch.round(torch.arange(top, 0, -top / steps, dtype=torch.float64)) - 1
            t = torch.cat([(idx + 1) / path.N, idx.new_zeros(1)])
            return torch.unique_consecutive(t)
        return discrete(path, steps)  # raises the discrete grid's own error
    full = sampling_grid(path, steps, "custom" if name == TUNED else name, grid_options)
    return grid_from(full, t_start)


def init_latents(run: LoadedRun, init: Any, strength: float | None, st: dict[str, Any],
                 n_given: bool, t0: float | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """Image-to-image inputs: ``init`` as a tensor in the model's space (the codec's scaled
    posterior mean for a latent run) and the settings with ``n`` and ``strength`` (or ``t0``)
    resolved."""
    if t0 is not None:
        if strength is not None:
            raise DifflabError("give strength or t0, not both: strength keeps the last part "
                               "of the grid, t0 runs all the steps from t0")
        t0 = check_t0(t0)
    strength = 0.8 if strength is None else strength
    if isinstance(strength, bool) or not isinstance(strength, int | float) \
            or not 0 < strength <= 1:
        raise bad_value("strength", strength, "a number in (0, 1]")
    shape = tuple(run.image_shape)
    if isinstance(init, torch.Tensor):
        x = init.detach().float()
        if x.ndim == len(shape):
            x = x[None]
        if tuple(x.shape[1:]) != shape:
            raise DifflabError(f"init images have shape {tuple(x.shape[1:])} but this run makes "
                               f"images of shape {shape} (channels, height, width)")
        if not bool(torch.isfinite(x).all()):
            raise DifflabError("init images hold NaN or infinite values")
    else:
        x = _read_init_files(init, shape)
    n = st["n"] if n_given else (x.shape[0] if x.shape[0] > 1 else st["n"])
    if x.shape[0] not in (1, n):
        raise DifflabError(f"{x.shape[0]} init images for n={n} samples: give one image, "
                           f"or one per sample")
    x = encode_images(run, x, st["batch_size"])
    if t0 is not None:
        return x, {**st, "n": n, "t0": t0}
    return x, {**st, "n": n, "strength": float(strength)}


def _read_init_files(init: Any, shape: tuple[int, ...]) -> torch.Tensor:
    from pathlib import Path

    from difflab.data.decode import decode_image

    paths = [init] if isinstance(init, (str, os.PathLike)) else list(init)
    if not paths or not all(isinstance(p, (str, os.PathLike)) for p in paths):
        raise bad_value("init", init, "a tensor of images or image file path(s)")
    channels, height, width = shape
    if height != width or channels not in (1, 3):
        raise DifflabError(f"init files need a square 1- or 3-channel model; this run makes "
                           f"{shape}: pass a tensor instead")
    rows = []
    for p in paths:
        if not Path(p).is_file():
            raise DifflabError(f"init image {p} does not exist (expected an image file)")
        a = decode_image(p, height, channels)
        rows.append(torch.from_numpy(a).permute(2, 0, 1).float() / 127.5 - 1.0)
    return torch.stack(rows)


def sample_seeds(seed: int, n: int) -> list[int]:
    """One seed per sample, derived from ``(seed, i)``."""
    from difflab.training.data import mix_seed

    return [mix_seed(seed, 0x5A3B1E, i) for i in range(n)]


def concat_inputs(run: LoadedRun, depth: Any, n: int, cond: Cond | None, null: Cond | None
                  ) -> tuple[Cond | None, Cond | None]:
    """Join a depth-conditioned model's depth maps to both guidance branches' conditions."""
    from dataclasses import replace

    from difflab.tasks.conditioning import depth_condition

    kind = getattr(run.task, "concat_kind", None)
    if kind is None:
        if depth is not None:
            raise DifflabError("depth maps apply to a depth-conditioned model "
                               "(task.concat='depth'); this one takes none")
        return cond, null
    if depth is None:
        raise DifflabError("this model is depth-conditioned: give depth maps (SampleRequest("
                           "depth=...), difflab sample --depth FILE)")
    if isinstance(depth, torch.Tensor):
        d, inverse = depth.detach(), False
        if d.ndim == 3:
            d = d[None]
    else:
        d, inverse = _read_depth_files(depth)
    if d.shape[0] not in (1, n):
        raise DifflabError(f"{d.shape[0]} depth maps for n={n} samples: give one, or one per "
                           "sample")
    c = depth_condition(d, tuple(run.sample_shape[1:]), inverse=inverse)
    c = c.expand(n, *c.shape[1:]).contiguous()
    cond = replace(cond or Cond(), concat=c)
    return cond, (None if null is None else replace(null, concat=c))


def _read_depth_files(files: Any) -> tuple[torch.Tensor, bool]:
    from pathlib import Path

    import numpy as np
    from PIL import Image

    items = [files] if isinstance(files, (str, os.PathLike)) else list(files)
    maps, kinds = [], set()
    for f in items:
        p = Path(f)
        if not p.is_file():
            raise DifflabError(f"depth map {p} is not a file")
        if p.suffix.lower() == ".npy":
            try:
                a = np.load(p, allow_pickle=False)
            except (OSError, ValueError) as e:
                raise DifflabError(f"depth map {p} cannot be read ({e})") from None
            kinds.add(False)
        else:
            try:
                with Image.open(p) as im:
                    a = np.asarray(im.convert("F"), dtype=np.float32) / (
                        65535.0 if im.mode.startswith("I") else 255.0)
            except OSError as e:
                raise DifflabError(f"depth map {p} cannot be read as an image ({e})") from None
            kinds.add(True)
        a = np.asarray(a, dtype=np.float32).squeeze()
        if a.ndim != 2:
            raise DifflabError(f"depth map {p} has shape {a.shape}; expected (H, W)")
        maps.append(torch.from_numpy(a.copy())[None])
    if len(kinds) > 1:
        raise DifflabError("depth maps mix .npy depths and image files: give one kind")
    shapes = {tuple(m.shape) for m in maps}
    if len(shapes) > 1:
        raise DifflabError(f"depth maps of different sizes {sorted(shapes)}")
    return torch.stack(maps), kinds.pop()
