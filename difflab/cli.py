"""The ``difflab`` command: ``train``, ``sample``, ``demo``, ``eval``, ``compare``, ``export``,
``upgrade``, ``families`` (and whatever other modules register).

Each command is a ``register(subparsers)`` function that adds its sub-parser and sets
``func`` to a function ``(args) -> int``; add one to :data:`COMMANDS` (or call
:func:`add_command`) to extend the CLI. A :class:`~difflab.errors.DifflabError` is printed as
``difflab: error: ...`` (no traceback) with exit status 2.

Multi-process training: ``accelerate launch --num_processes 2 -m difflab.cli train CONFIG``.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shlex
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

from difflab.argtypes import (  # noqa: F401 (re-exported)
    HelpFormatter,
    count_from_zero,
    device_name,
    existing_folder,
    fraction,
    key_value,
    output_file,
    output_folder,
    positive_float,
    positive_int,
    set_threads,
)
from difflab.errors import DifflabError

Register = Callable[[argparse._SubParsersAction], None]


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, ``difflab CMD: error: ...`` + a pointer
    to ``--help`` (exit status 2), instead of the usage block."""

    def error(self, message: str):  # noqa: D102 - argparse's hook
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ----- train -------------------------------------------------------------------------------------
def register_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train a model from a TOML config",
        description="Train a model from a TOML config into a run folder (config.toml, "
        "checkpoints/step_N, samples/, metrics.jsonl, tb/). Under `accelerate launch "
        "--num_processes K -m difflab.cli train ...` it trains data-parallel.",
        epilog="examples:\n  difflab train configs/ddpm_digits.toml --out runs/digits\n"
        "  difflab train configs/ddpm_mnist.toml --set data.root=../shared/data/mnist "
        "--set train.lr=1e-4\n  difflab train --resume runs/digits --set train.steps=20000\n"
        "  difflab train configs/ddpm_digits.toml --set 'path={kind=\"discrete_cosine\"}'"
        "  # a whole section",
        formatter_class=HelpFormatter)
    p.add_argument("config", nargs="?", help="the TOML config (default with --resume: the "
                   "run's own config.toml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. train.lr=1e-4 (repeatable; values are "
                   "TOML literals, else strings)")
    p.add_argument("--resume", metavar="RUN", help="continue the run in folder RUN from its "
                   "newest complete checkpoint (exactly as if never interrupted)")
    p.add_argument("--out", metavar="RUN_DIR", help="run folder (default: "
                   "runs/<config name>-<date>-<time>)")
    p.add_argument("--minutes", type=positive_float, help="stop (with a checkpoint) after this "
                   "much training time")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: only when stderr is a terminal)")
    p.add_argument("--threads", type=positive_int, help="torch intra-op threads per process "
                   "(small models on a shared CPU are often fastest with 1)")
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from accelerate.utils import broadcast_object_list

    from difflab.config import load_config
    from difflab.runs import CONFIG_FILE
    from difflab.tasks import make_task
    from difflab.training import Trainer, make_accelerator

    if args.config is None and args.resume is None:
        raise DifflabError("train needs a CONFIG (or --resume RUN to continue a run)")
    if args.resume and args.out and Path(args.out) != Path(args.resume):
        raise DifflabError(f"--out {args.out} and --resume {args.resume} disagree: a resumed run "
                           "stays in its folder")
    config = args.config
    if config is None:
        config = Path(args.resume) / CONFIG_FILE
        if not config.is_file():
            raise DifflabError(f"--resume {args.resume}: {config} does not exist (not a run "
                               "folder?)")
    set_threads(args.threads)
    cfg = load_config(config, args.overrides, upgrade=args.config is None)
    acc = make_accelerator(cfg)
    run_dir = args.resume or args.out
    if run_dir is None:  # decided once, on the main process
        name = [f"runs/{Path(config).stem}-{time.strftime('%Y%m%d-%H%M%S')}"]
        if acc.num_processes > 1:
            broadcast_object_list(name)
        run_dir = name[0]
    task = make_task(cfg, device=acc.device, accelerator=acc)
    trainer = Trainer(task, run_dir, resume=args.resume is not None, accelerator=acc,
                      progress=args.progress)
    time_limit = args.minutes * 60 if args.minutes is not None else None
    result = trainer.fit(time_limit)
    if acc.is_main_process:
        preview = (f" (+ {result.preview_seconds:.0f} s of preview grids)"
                   if result.preview_seconds else "")
        print(f"trained {result.step} steps in {result.seconds:.0f} s{preview}; checkpoint "
              f"{result.checkpoint}", file=sys.stderr)
        if result.stopped in ("interrupted", "time_limit") and result.step < cfg.train.steps:
            print(f"continue with: difflab train --resume {shlex.quote(str(run_dir))}",
                  file=sys.stderr)
    acc.end_training()
    if result.stopped == "interrupted":
        import signal

        return 128 + int(getattr(signal, result.signal, signal.SIGINT))
    return 0


# ----- sample ------------------------------------------------------------------------------------
def register_sample(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sample", help="draw samples from a trained run",
        description="Draw samples from a trained run, or from a diffusers Stable Diffusion "
        "pipeline folder, with any registered sampler and grid. Unset options come from the "
        "run's [sample] config (a pipeline's: from its scheduler config). Sample i depends only "
        "on (seed, i), never on the batch size.",
        epilog="examples:\n  difflab sample runs/digits --sampler ddim --steps 50 --n 64 "
        "--seed 0 --out samples.png\n  difflab sample ~/models/stable-diffusion-v1-5 --prompt "
        "'a red apple' --guidance cfg:7.5 --steps 20 --out apple.png",
        formatter_class=HelpFormatter)
    p.add_argument("run", metavar="RUN", help="the run folder (or a checkpoint folder in it), "
                   "an exported component folder, or a diffusers SD pipeline folder")
    p.add_argument("--sampler", help="a registered sampler (ddpm, ddim, dpmpp_2m, ...; "
                   "`difflab samplers` lists them all with what each needs)")
    p.add_argument("--steps", type=positive_int, help="sampling steps")
    p.add_argument("--n", type=positive_int, help="number of samples")
    p.add_argument("--seed", type=count_from_zero, help="base seed (an integer >= 0)")
    p.add_argument("--grid", help="time grid: auto, uniform, quadratic, log_snr, karras, "
                   "discrete, custom (--grid-option times=[...]), or tuned (the run's own, from "
                   "difflab tune-grid)")
    p.add_argument("--grid-option", dest="grid_options", action="append", default=[],
                   metavar="KEY=VALUE", help="time-grid option, e.g. spacing='trailing'")
    p.add_argument("--option", dest="options", action="append", default=[],
                   metavar="KEY=VALUE", help="sampler option, e.g. eta=0.5 (repeatable)")
    dest = p.add_mutually_exclusive_group(required=True)
    dest.add_argument("--out", metavar="FILE.png", help="write one PNG grid")
    dest.add_argument("--out-dir", metavar="DIR", help="write one PNG per sample")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                   help="use the EMA weights (default) or the raw trained weights")
    p.add_argument("--checkpoint", metavar="step_N", help="which checkpoint (default: latest)")
    p.add_argument("--clip-x0", action=argparse.BooleanOptionalAction, default=None,
                   help="clip clean-data estimates to [-1, 1] (default: the run's "
                   "sample.clip_x0)")
    p.add_argument("--class", "--label", dest="label", type=count_from_zero, action="append",
                   metavar="ID", help="class id for every sample (repeat to cycle through "
                   "several; class-conditional models or classifier guidance; default: cycle "
                   "through all classes)")
    p.add_argument("--prompt", action="append", metavar="TEXT", help="text prompt "
                   "(text-conditional models; repeat to cycle through several; default: "
                   "sample.prompts or dataset captions)")
    p.add_argument("--negative-prompt", metavar="TEXT", help="what classifier-free guidance "
                   "steers away from (default: the empty prompt)")
    p.add_argument("--guidance", metavar="SPEC", help="none | cfg:SCALE[:rescale=R]"
                   "[:interval=LO-HI] | classifier:RUN:SCALE (default: the run's "
                   "sample.guidance)")
    p.add_argument("--init", action="append", metavar="IMAGE", help="image-to-image (SDEdit): "
                   "start from this image file, noised to the time --strength picks (repeat "
                   "for one image per sample; one image is used for all --n samples)")
    p.add_argument("--strength", type=fraction, help="with --init: the fraction of the "
                   "steps to run, in (0, 1] (default 0.8; 1 starts from pure noise)")
    p.add_argument("--depth", action="append", metavar="FILE", help="for a depth-conditioned "
                   "model: a depth map, an image of inverse depth (brighter is nearer) or a .npy "
                   "of depths (repeat for one map per sample)")
    p.add_argument("--batch-size", type=positive_int, help="samples per network batch")
    p.add_argument("--nrow", type=positive_int, help="images per grid row (default: "
                   "ceil(sqrt(n)))")
    p.add_argument("--device", default="cpu", type=device_name, help="torch device: cpu, cuda, "
                   "cuda:N or mps (default: cpu)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: only when stderr is a terminal)")
    p.add_argument("--threads", type=positive_int, help="torch intra-op threads (small models "
                   "on a shared CPU are often fastest with 1)")
    add_single_file_options(p)
    p.set_defaults(func=cmd_sample)


def add_single_file_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Stable Diffusion single files (.safetensors / .ckpt)")
    g.add_argument("--tokenizer", metavar="DIR", type=existing_folder("--tokenizer"),
                   help="CLIP's tokenizer files, which a single file lacks (default: a "
                   "tokenizer/ folder beside the file)")
    g.add_argument("--sd-config", metavar="PATH", help="a diffusers pipeline folder or the "
                   "checkpoint's LDM YAML (default: NAME.yaml beside the file; else SD's own "
                   "settings)")
    g.add_argument("--prediction", choices=("eps", "v"), help="what the U-Net predicts "
                   "(default: the config's; SD 1: eps, SD 2: v)")


def single_file_options(args: argparse.Namespace) -> dict | None:
    opts = {"tokenizer": getattr(args, "tokenizer", None),
            "config": getattr(args, "sd_config", None),
            "prediction": getattr(args, "prediction", None)}
    opts = {k: v for k, v in opts.items() if v is not None}
    return opts or None


def cmd_sample(args: argparse.Namespace) -> int:
    from difflab.data import save_image_grid
    from difflab.sampling import SampleRequest, generate, load_run, not_generative

    out_file = output_file("--out", args.out, (".png",))
    out_dir = output_folder("--out-dir", args.out_dir)
    if args.sampler is not None:
        from difflab.samplers import get_sampler

        get_sampler(args.sampler)
    grid_options = dict(key_value(o, "--grid-option") for o in args.grid_options)
    options = dict(key_value(o) for o in args.options)
    set_threads(args.threads)
    run = load_run(args.run, checkpoint=args.checkpoint, ema=args.ema, device=args.device,
                   single_file=single_file_options(args))
    if not run.generative:
        raise DifflabError(not_generative(run, args.run))
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    request = SampleRequest(
        run, sampler=args.sampler, steps=args.steps, grid=args.grid, grid_options=grid_options,
        options=options, guidance=args.guidance, labels=args.label, prompts=args.prompt,
        negative_prompt=args.negative_prompt, seed=args.seed, n=args.n,
        batch_size=args.batch_size, clip_x0=args.clip_x0, device=args.device,
        progress=progress or None, init=args.init, strength=args.strength, depth=args.depth)
    out = generate(request)
    x, n, st = out.images.clamp(-1, 1), out.images.shape[0], out.metadata
    if out_file is not None:
        where = save_image_grid(x, out_file, nrow=args.nrow or math.ceil(math.sqrt(n)))
    else:
        where = out_dir
        for i in range(n):
            save_image_grid(x[i:i + 1], where / f"sample_{i:05d}.png", padding=0)
    weights = "EMA" if args.ema else "raw"
    if "strength" in st:
        print(f"image-to-image from {len(args.init)} image(s) at strength {st['strength']:g}",
              file=sys.stderr)
    print(f"wrote {n} samples ({st['sampler']}, {st['steps']} steps, {out.nfe} NFE, {weights} "
          f"weights of {run.checkpoint.name}, {out.seconds:.1f} s) to {where}", file=sys.stderr)
    return 0


def register_samplers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "samplers", help="list every sampler: order, stochastic or not, what it needs",
        description="Every registered sampler (difflab sample --sampler NAME, [sample] sampler) "
        "with its order of accuracy, network evaluations per step, whether it draws fresh noise "
        "while sampling, what it needs from the model, and its options (--option KEY=VALUE).",
        formatter_class=HelpFormatter)
    p.set_defaults(func=cmd_samplers)


def cmd_samplers(args: argparse.Namespace) -> int:
    from difflab.samplers import SAMPLERS

    for name, spec in sorted(SAMPLERS.items()):
        needs = ["a learned-variance model"] if spec.needs_learned_variance else []
        needs += [NEEDS.get(e, e) for e in spec.needs_extra]
        doc = " ".join((spec.fn.__doc__ or "").strip().split("\n\n")[0].split())
        opts = [o for o in spec.options() if o not in ("noise", "hooks")]
        print(f"{name}: order {spec.order}, {spec.evals_per_step} NFE per step, "
              f"{spec.describe_noise()}"
              + (f"; needs {' and '.join(needs)}" if needs else ""))
        for text in (doc, "options: " + (", ".join(opts) or "none")):
            print(textwrap.fill(text, 96, initial_indent="    ", subsequent_indent="    "))
    return 0


NEEDS = {"moments": "Gamma_t (estimated from the run's data and cached)",
         "residual": "a trained residual head: --option residual=RUN (configs/npr_mnist.toml)"}


# ----- export / upgrade --------------------------------------------------------------------------
def register_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="write a run's EMA model as a self-describing component folder",
        description="Write the EMA weights of a run's checkpoint as OUT/config.json (family, "
        "layout version, full network config, and the run's config as metadata) + "
        "OUT/model.safetensors. difflab.load(OUT) rebuilds the network without the run; "
        "difflab sample OUT samples it.",
        epilog="example:\n  difflab export runs/digits exported/digits",
        formatter_class=HelpFormatter)
    p.add_argument("run", metavar="RUN", help="the run folder (or a checkpoint folder in it)")
    p.add_argument("out", metavar="OUT", help="the component folder to write")
    p.add_argument("--checkpoint", metavar="step_N", help="which checkpoint (default: latest)")
    p.add_argument("--raw", action="store_true", help="export the raw trained weights, not the "
                   "EMA")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from difflab.components import save
    from difflab.config import config_to_toml
    from difflab.sampling import load_run

    run = load_run(args.run, checkpoint=args.checkpoint, ema=not args.raw)
    if run.checkpoint is not None and not run.checkpoint.name.startswith("step_"):
        raise DifflabError(f"{args.run} is already a component folder")
    meta = {"run_config": config_to_toml(run.config), "step": str(run.step),
            "source": str(run.checkpoint), "weights": "raw" if args.raw else "ema"}
    where = save(run.net, args.out, metadata=meta)
    print(f"wrote {where} (family {run.config.model.arch!r}, step {run.step})", file=sys.stderr)
    return 0


def register_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert", help="convert between difflab, diffusers and SD single-file layouts",
        description="A diffusers UNet2DConditionModel or AutoencoderKL folder (config.json + "
        "diffusion_pytorch_model.safetensors) becomes a difflab component folder; a difflab "
        "component folder or run (its EMA network) becomes a diffusers folder that "
        "from_pretrained reads. The direction follows from IN. Unknown or missing weights and "
        "settings difflab cannot reproduce are named. An SD v1 / v2 single file (.safetensors, "
        ".ckpt) becomes a diffusers pipeline folder, and a pipeline folder a single file.",
        epilog="examples:\n  difflab convert sd/unet unet_difflab\n"
        "  difflab convert exported/unet unet_diffusers\n"
        "  difflab convert v1-5-pruned.safetensors sd15 --tokenizer clip_tokenizer\n"
        "  difflab convert sd15 sd15.safetensors",
        formatter_class=HelpFormatter)
    p.add_argument("source", metavar="IN", help="a diffusers component folder, a difflab "
                   "component folder or a run folder")
    p.add_argument("out", metavar="OUT", help="the folder to write (a .safetensors file: SD's "
                   "original single-file layout, from a pipeline folder)")
    add_single_file_options(p)
    p.set_defaults(func=cmd_convert)


def cmd_convert(args: argparse.Namespace) -> int:
    from pathlib import Path

    from difflab.components import save
    from difflab.interop.diffusers import diffusers_class, load_diffusers, save_diffusers
    from difflab.interop.pipeline import is_pipeline
    from difflab.interop.single_file import (
        is_single_file,
        pipeline_to_single_file,
        single_file_to_pipeline,
    )

    src = Path(args.source)
    if is_pipeline(src) and args.out.lower().endswith(".safetensors"):
        where = pipeline_to_single_file(src, output_file("OUT", args.out, (".safetensors",)))
        print(f"wrote {where} (Stable Diffusion's single-file layout)", file=sys.stderr)
        return 0
    out = output_folder("OUT", args.out)
    if out.exists() and any(out.iterdir()):
        raise DifflabError(f"{out} is not empty: choose a new folder")
    if is_single_file(src):
        where = single_file_to_pipeline(src, out, **(single_file_options(args) or {}))
        print(f"wrote {where} (a diffusers pipeline folder; difflab sample {where} --prompt ...)",
              file=sys.stderr)
        return 0
    if not src.is_dir():
        raise DifflabError(f"{src} is not a folder or an SD single file (expected a diffusers or "
                           "difflab component folder, a pipeline folder, a run, or a "
                           ".safetensors / .ckpt checkpoint)")
    if is_pipeline(src):
        raise DifflabError(f"{src} is a pipeline folder: write it as one file with OUT ending in "
                           ".safetensors, or convert its unet/ or vae/ folder")
    name = diffusers_class(src)
    if name is not None:
        module = load_diffusers(src)
        where = save(module, out, metadata={"source": str(src), "converted_from": name})
        print(f"wrote {where} (difflab {type(module).__name__} from diffusers {name})",
              file=sys.stderr)
        return 0
    from difflab.components import CONFIG_JSON, load
    from difflab.sampling import load_run

    if (src / CONFIG_JSON).is_file():  # a difflab component (difflab.save / export / convert)
        module = load(src)
    else:
        module = load_run(src).net  # the EMA network (an autoencoder run's net is its codec)
    where = save_diffusers(module, out)
    print(f"wrote {where} (diffusers layout)", file=sys.stderr)
    return 0


def register_upgrade(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "upgrade", help="convert a version-1 config file or run folder to the current layout",
        description="Rewrite a config file (or a run folder's config.toml) written before "
        "component families and training tasks into the version-2 layout ([task], "
        "[text_encoder]); the old file is kept beside it as NAME.v1. Run folders also load "
        "without it (converted in memory); weights of older layouts are converted when loaded.",
        epilog="example:\n  difflab upgrade runs/old_run\n  difflab upgrade my.toml --dry-run",
        formatter_class=HelpFormatter)
    p.add_argument("target", metavar="RUN|FILE", help="a run folder or a TOML config")
    p.add_argument("--dry-run", action="store_true", help="print the converted TOML only")
    p.set_defaults(func=cmd_upgrade)


def cmd_upgrade(args: argparse.Namespace) -> int:
    from difflab.config import upgrade_file

    file, text = upgrade_file(args.target, dry_run=args.dry_run)
    if args.dry_run:
        print(text, end="")
    else:
        print(f"converted {file} (the old file is {file.name}.v1)", file=sys.stderr)
    return 0


def register_families(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("families", help="list the registered component families and tasks",
                       description="The component families ([model] arch = NAME) with their "
                       "kind, presets and fields, and the training tasks ([task] kind).")
    p.set_defaults(func=cmd_families)


def cmd_families(args: argparse.Namespace) -> int:
    from difflab.components import families
    from difflab.tasks import TASKS, get_task

    get_task("diffusion")  # loads the built-in tasks
    for name, fam in sorted(families().items()):
        presets = ", ".join(sorted(fam.presets)) or "-"
        print(f"{name}  [{fam.kind}]  {fam.doc}\n  presets: {presets}\n  fields: "
              f"{', '.join(fam.fields())}")
    print("tasks: " + ", ".join(f"{k} ({', '.join(v.family_kinds)})"
                                for k, v in sorted(TASKS.items())))
    return 0


# ----- demo --------------------------------------------------------------------------------------
def register_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="train a small DDPM on 8x8 digits and sample it (a few CPU minutes)",
        description="Train configs/ddpm_digits.toml for a few minutes on the CPU, sample the EMA "
        "model with DDPM (1000 steps) and DDIM (50 and 10 steps), and judge the samples with a "
        "small digit classifier trained on the real digits. Writes labelled grids and "
        "summary.txt / summary.json to --out.", formatter_class=HelpFormatter)
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--minutes", type=positive_float, default=5.0,
                   help="time budget of the training phase (default: 5)")
    p.add_argument("--config", help="config to train (default: configs/ddpm_digits.toml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable)")
    p.add_argument("--n", type=positive_int, default=100, help="samples per sampler (default: "
                   "100)")
    p.add_argument("--threads", type=positive_int, default=1, help="torch intra-op threads "
                   "(default: 1; the demo's small model trains fastest on one thread of a shared "
                   "CPU)")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from difflab.demo import run_demo

    output_folder("--out", args.out)
    set_threads(args.threads)
    run_demo(args.out, args.minutes, args.config, args.overrides, n=args.n)
    return 0


# ----- the parser --------------------------------------------------------------------------------
def register_evaluation(sub: argparse._SubParsersAction) -> None:
    """``eval`` and ``compare`` live with the metrics in :mod:`difflab.evaluation.command`."""
    from difflab.evaluation.command import register

    register(sub)


def register_tune_grid(sub: argparse._SubParsersAction) -> None:
    """``tune-grid`` lives in :mod:`difflab.tune_command`."""
    from difflab.tune_command import register

    register(sub)


def register_edit(sub: argparse._SubParsersAction) -> None:
    """``edit RECIPE`` lives with the recipes in :mod:`difflab.recipes.command`."""
    from difflab.recipes.command import register

    register(sub)


COMMANDS: list[Register] = [register_train, register_sample, register_samplers, register_demo,
                            register_edit, register_evaluation, register_tune_grid,
                            register_export,
                            register_convert, register_upgrade, register_families]


def add_command(register: Register) -> Register:
    """Add a sub-command (usable as a decorator)."""
    if register not in COMMANDS:
        COMMANDS.append(register)
    return register


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="difflab", description="difflab: train, sample and compare diffusion models. "
        "Run `difflab COMMAND --help` for the options of each command.",
        formatter_class=HelpFormatter)
    from difflab import __version__

    parser.add_argument("--version", action="version", version=f"difflab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in COMMANDS:
        register(sub)
    return parser


class _StderrHandler(logging.StreamHandler):
    """A handler writing to whatever ``sys.stderr`` is when a message is logged (a plain
    StreamHandler keeps the stream of its creation, which may since have been closed)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _setup_logging() -> None:
    """difflab's own log messages (resume, fallbacks) as ``difflab: ...`` lines on stderr."""
    log = logging.getLogger("difflab")
    if not log.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("difflab: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``difflab`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging()
    try:
        return int(args.func(args) or 0)
    except DifflabError as e:
        print(f"difflab: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `difflab samplers | head`
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - nothing more can be printed
        return 0
    except OSError as e:  # a path the user named cannot be read or written
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        print(f"difflab: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("difflab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
