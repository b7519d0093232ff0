"""The ``difflab tune-grid`` command (the work is in :mod:`difflab.grid_tuning`)."""

from __future__ import annotations

import argparse
import sys

from difflab.argtypes import (
    HelpFormatter,
    count_from_zero,
    device_name,
    key_value,
    positive_int,
    set_threads,
)
from difflab.errors import DifflabError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tune-grid", help="tune a sampler's time grid to a trained run and budget",
        description="Search the time grid on which SAMPLER with a given budget lands closest "
        "to the exact probability-flow ODE solution of this run's model, starting from the best "
        "fixed grid (uniform, quadratic, log-SNR, Karras, DDPM's trailing steps). The "
        "reference solves the ODE from the same noises with --ref-sampler at --ref-steps. "
        "Saves the grid in RUN/tuned_grids.json; sample with it with --grid tuned (difflab "
        "sample, difflab eval --samplers NAME:STEPS:tuned). Errors are reported on held-out "
        "noises. Ctrl-C stops the search and saves the best grid found so far.",
        epilog="examples:\n  difflab tune-grid runs/mnist --sampler dpmpp_2m --nfe 10\n"
        "  difflab sample runs/mnist --sampler dpmpp_2m --steps 10 --grid tuned --out s.png",
        formatter_class=HelpFormatter)
    p.add_argument("run", metavar="RUN", help="the run folder (or a checkpoint folder in it)")
    p.add_argument("--sampler", required=True, help="a deterministic registered sampler")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--nfe", type=positive_int, help="network calls per sample (the "
                        "sampler's steps: as many as fit)")
    budget.add_argument("--steps", type=positive_int, help="sampler steps")
    p.add_argument("--option", dest="options", action="append", default=[],
                   metavar="KEY=VALUE", help="sampler option, e.g. lower_order_final=false")
    p.add_argument("--guidance", metavar="SPEC", help="guidance to tune under (default: the "
                   "run's sample.guidance)")
    p.add_argument("--n", type=positive_int, default=64, help="tuning noises (default 64)")
    p.add_argument("--val-n", type=positive_int, default=64, help="held-out noises the "
                   "errors are reported on (default 64)")
    p.add_argument("--seed", type=count_from_zero, default=0, help="seed of the tuning noises "
                   "(the held-out ones use seed + 1)")
    p.add_argument("--ref-sampler", default="dpmpp_3m", help="the reference ODE solver "
                   "(default dpmpp_3m)")
    p.add_argument("--ref-steps", type=positive_int, default=200, help="reference steps on "
                   "the log-SNR grid (default 200; it is also run at half to check it)")
    p.add_argument("--sweeps", type=positive_int, default=5, help="passes over the grid's "
                   "times (default 5)")
    p.add_argument("--batch-size", type=positive_int, help="samples per network batch")
    p.add_argument("--checkpoint", metavar="step_N", help="which checkpoint (default: latest)")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                   help="tune for the EMA weights (default) or the raw ones")
    p.add_argument("--device", default="cpu", type=device_name, help="torch device")
    p.add_argument("--threads", type=positive_int, help="torch intra-op threads")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: only when stderr is a terminal)")
    p.set_defaults(func=cmd_tune_grid)


def cmd_tune_grid(args: argparse.Namespace) -> int:
    from difflab.grid_tuning import save_tuned, steps_for_nfe, tune_run, tuned_file
    from difflab.samplers import get_sampler
    from difflab.sampling import load_run, not_generative

    get_sampler(args.sampler)
    get_sampler(args.ref_sampler)
    options = dict(key_value(o) for o in args.options) or None
    steps = args.steps if args.steps is not None else steps_for_nfe(args.sampler, args.nfe)
    set_threads(args.threads)
    run = load_run(args.run, checkpoint=args.checkpoint, ema=args.ema, device=args.device)
    if not run.generative:
        raise DifflabError(not_generative(run, args.run))
    file = tuned_file(run)
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    entry = tune_run(run, args.sampler, steps, n=args.n, val_n=args.val_n, seed=args.seed,
                     ref_sampler=args.ref_sampler, ref_steps=args.ref_steps,
                     guidance=args.guidance, options=options, batch_size=args.batch_size,
                     sweeps=args.sweeps, progress=progress)
    save_tuned(file, entry)
    err = entry["error"]
    held = err["held_out"]
    print(f"{args.sampler}, {steps} steps ({entry['nfe']} NFE): error against the reference "
          f"on {args.val_n} held-out noises (per-sample RMS, mean; and RMS over the batch)",
          file=sys.stderr)
    for name, e in sorted(held.items(), key=lambda kv: kv[1]["error"]):
        mark = "  <- best fixed" if name == err["best_fixed"] else ""
        print(f"  {name:20s} {e['error']:.4e}  {e['rms']:.4e}{mark}", file=sys.stderr)
    print(f"tuned is {err['gain']:.2f}x lower than {err['best_fixed']}; the reference's own "
          f"error {err['reference']:.1e}; {entry['search']['solves']} solves, "
          f"{entry['seconds']['total']:.0f} s", file=sys.stderr)
    if err["gain"] <= 1.0:
        print(f"warning: on the held-out noises the tuned grid is no better than "
              f"{err['best_fixed']}: sample with that grid instead (or tune on more noises, "
              f"--n)", file=sys.stderr)
    if entry["search"]["interrupted"]:
        print("interrupted: saved the best grid found so far", file=sys.stderr)
    print(f"saved to {file}; sample with --sampler {args.sampler} --steps {steps} --grid tuned",
          file=sys.stderr)
    return 0
