"""``difflab demo``: train a DDPM on 8x8 digits for a few CPU minutes, sample it, and check that
the samples are digits.

The check is a small classifier trained here on the real digits (a two-layer MLP, seconds): a
sample counts as *recognisable* when the classifier gives one class probability > 0.9. The
demo reports that fraction for each sampler beside the same fraction on held-out real digits
(the classifier's own ceiling), and the class histogram of the samples (all ten digits should
appear). Outputs in ``--out`` (default ``runs/demo``): ``run/`` (the training run),
``<sampler>_<steps>.png`` (labelled grids), ``summary.txt`` and ``summary.json``.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn

from difflab.config import load_config
from difflab.data import Digits, make_grid
from difflab.errors import DifflabError
from difflab.samplers import SAMPLERS
from difflab.sampling import SampleRequest, generate, load_run
from difflab.training import train

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "ddpm_digits.toml"
SAMPLER_PLAN = (("ddpm", 1000), ("ddim", 50), ("ddim", 10), ("dpmpp_2m", 10))
CONFIDENCE = 0.9


# ----- the judge: a small digit classifier -------------------------------------------------------
class DigitMLP(nn.Module):
    """``image -> logits`` over the ten digits: flatten, 128 ReLU units, 10 outputs."""

    def __init__(self, pixels: int, hidden: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(pixels, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@dataclass
class Judge:
    """A trained classifier and its held-out scores."""

    model: DigitMLP
    accuracy: float
    real_confident: float


def train_classifier(image_size: int = 8, seed: int = 0, steps: int = 300) -> Judge:
    """Fit :class:`DigitMLP` on the digits train split (full-batch Adam, weight decay 1e-3)
    and score it on the held-out split (accuracy and confident fraction)."""
    x, y = Digits("train", image_size=image_size).as_tensors()
    xt, yt = Digits("test", image_size=image_size).as_tensors()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitMLP(x[0].numel())
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-3)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval().requires_grad_(False)
    with torch.no_grad():
        acc = float((model(xt).argmax(1) == yt).float().mean())
    return Judge(model, acc, confident_fraction(model, xt)[0])


@torch.no_grad()
def confident_fraction(model: nn.Module, x: torch.Tensor, threshold: float = CONFIDENCE
                       ) -> tuple[float, list[int]]:
    """Fraction of images with a class probability > ``threshold``, and the histogram of the
    classes those confident images were given."""
    p = torch.softmax(model(x.clamp(-1, 1)), dim=1)
    conf, cls = p.max(1)
    sure = conf > threshold
    hist = torch.bincount(cls[sure], minlength=10).tolist()
    return float(sure.float().mean()), hist


# ----- grids with a title --------------------------------------------------------------------
def labelled_grid(images: torch.Tensor, title: str, path: Path, scale: int = 4) -> Path:
    """Save ``[-1, 1]`` images as a grid, upscaled ``scale`` times, under a one-line title."""
    grid = make_grid(images.clamp(-1, 1), nrow=math.ceil(math.sqrt(len(images))))
    img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    canvas = Image.new(img.mode, (img.width, img.height + 16), 255)
    canvas.paste(img, (0, 16))
    ImageDraw.Draw(canvas).text((3, 2), title, fill=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


# ----- the demo ------------------------------------------------------------------------------
@dataclass
class SamplerScore:
    sampler: str
    steps: int
    seconds: float
    confident: float
    ratio_to_real: float
    classes: list[int]
    grid: str


@dataclass
class DemoSummary:
    config: str
    train_steps: int
    train_seconds: float
    stopped: str
    final_loss: float | None
    classifier_accuracy: float
    real_confident: float
    n_samples: int
    samplers: list[SamplerScore] = field(default_factory=list)

    def goal_met(self) -> bool:
        """Every sampler's confident fraction is at least 0.9 x that of real digits."""
        return all(s.ratio_to_real >= 0.9 for s in self.samplers)

    def text(self) -> str:
        lines = [
            "difflab demo: DDPM on 8x8 digits",
            f"config: {self.config}",
            f"training: {self.train_steps} steps in {self.train_seconds:.0f} s ({self.stopped}), "
            f"final loss {self.final_loss if self.final_loss is not None else float('nan'):.4f}",
            f"judge: MLP, held-out accuracy {self.classifier_accuracy:.3f}; real held-out "
            f"digits confident (p > {CONFIDENCE}): {self.real_confident:.3f}",
            f"generated ({self.n_samples} per sampler, EMA weights):",
        ]
        for s in self.samplers:
            lines.append(f"  {s.sampler:>9} {s.steps:>4} steps: confident {s.confident:.3f} "
                         f"({s.ratio_to_real:.2f} x real), {s.seconds:5.1f} s, classes "
                         f"{s.classes}  -> {s.grid}")
        lines.append("goal (every sampler >= 0.9 x real): "
                     + ("met" if self.goal_met() else "NOT met"))
        return "\n".join(lines) + "\n"


def sampler_plan(names: tuple[tuple[str, int], ...] = SAMPLER_PLAN) -> list[tuple[str, int]]:
    """The planned (sampler, steps) pairs that are registered."""
    return [(s, k) for s, k in names if s in SAMPLERS]


def run_demo(out: str | Path = "runs/demo", minutes: float = 5.0,
             config: str | Path | None = None, overrides: tuple[str, ...] | list[str] = (),
             plan: list[tuple[str, int]] | None = None, n: int = 100,
             progress: bool | None = None) -> DemoSummary:
    """Train, sample with each planned sampler, judge, and write the summary.

    Args:
        out: output folder (its ``run/`` subfolder is replaced).
        minutes: time budget of the training phase (the config's steps are the other limit).
        config: the config (default ``configs/ddpm_digits.toml`` of the repository).
        overrides: ``--set`` items.
        plan: ``(sampler, steps)`` pairs (default: DDPM 1000, DDIM 50, DDIM 10, DPM-Solver++
            2M 10 when registered).
        n: samples per sampler.
        progress: progress bar during training (None: on a TTY).
    """
    out = Path(out)
    config = Path(config) if config is not None else CONFIG
    if not config.is_file():
        raise DifflabError(f"demo config {config} does not exist: pass --config PATH")
    cfg = load_config(config, overrides)
    run_dir = out / "run"
    if (run_dir / "config.toml").is_file():
        shutil.rmtree(run_dir)
    log = _printer()
    log(f"training {config.name} for at most {minutes:g} min into {run_dir} ...")
    result = train(cfg, run_dir, time_limit=minutes * 60.0, progress=progress)
    log(f"trained {result.step} steps in {result.seconds:.0f} s; fitting the judge ...")
    judge = train_classifier(cfg.data.image_size or 8)
    summary = DemoSummary(str(config), result.step, result.seconds, result.stopped, result.loss,
                          judge.accuracy, judge.real_confident, n)
    run = load_run(run_dir, ema=True)
    for sampler, steps in plan if plan is not None else sampler_plan():
        t0 = time.monotonic()
        x = generate(SampleRequest(run, sampler=sampler, steps=steps, n=n, batch_size=n,
                                   guidance="none")).images
        seconds = time.monotonic() - t0
        frac, hist = confident_fraction(judge.model, x)
        ratio = frac / max(judge.real_confident, 1e-9)
        name = f"{sampler}_{steps}.png"
        labelled_grid(x, f"{sampler} {steps} steps: {frac:.2f} confident", out / name)
        summary.samplers.append(SamplerScore(sampler, steps, seconds, frac, ratio, hist, name))
        log(f"  {sampler} {steps} steps: confident {frac:.3f} ({ratio:.2f} x real) "
            f"in {seconds:.1f} s")
    (out / "summary.txt").write_text(summary.text())
    (out / "summary.json").write_text(json.dumps(asdict(summary), indent=1))
    log(summary.text())
    return summary


def _printer():
    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    return log


__all__ = ["DemoSummary", "DigitMLP", "Judge", "confident_fraction", "labelled_grid",
           "run_demo", "sampler_plan", "train_classifier"]
