"""FID of difflab's multistep solvers against diffusers' ``DPMSolverMultistepScheduler`` and
``UniPCMultistepScheduler`` (their default configs) driving the same trained network.

Issue 17: "difflab's samplers at least as good as diffusers' DPMSolverMultistepScheduler and
UniPCMultistepScheduler (with their defaults) driving the same network at 5, 10 and 20 NFE".

**What runs.** For each NFE budget, on the run's EMA weights:

* difflab ``dpmpp_2m`` and ``unipc_bh2`` exactly as ``difflab sample RUN --sampler X --steps
  NFE`` runs them: difflab's default options, the path's default grid (``auto``: on a
  discrete path ``discrete``, leading spacing), the run's ``sample.clip_x0`` (``--clip-x0`` /
  ``--no-clip-x0`` override it), through :func:`difflab.generate`. ``--grids
  auto,log_snr,discrete:spacing=trailing`` adds rows on other difflab grids
  (``NAME[:KEY=VALUE...]``, as ``--grid NAME --grid-option KEY=VALUE``; the first one is the
  headline row).
* diffusers ``DPMSolverMultistepScheduler`` / ``UniPCMultistepScheduler`` built with their
  defaults except ``num_train_timesteps`` and ``trained_betas`` (the run's path's own betas,
  so ``alphas_cumprod`` is the path's) and ``prediction_type`` (the run's prediction), driven
  through their ``set_timesteps`` / ``step`` loop by :func:`difflab.testing.peers.run_diffusers`
  (the scheduler's arithmetic in float64, the network in float32: ``model_dtype``). Their
  defaults do no clipping or thresholding; ``--peer-variants default,thresholding`` (the
  default) adds a row with ``thresholding=True``, which with the default
  ``sample_max_value=1.0`` clamps ``x0`` to [-1, 1]: difflab's ``clip_x0``.

Both libraries start sample ``i`` from the same ``x_T`` (the prior draw of
:func:`difflab.sampling.draw`, seeded from ``(seed, i)``) with the same class label (``i mod
10`` for a class-conditional run) and the same guidance: ``--guidance`` (default ``none``,
i.e. conditional samples without guidance, as the ``cfg_mnist`` FIDs in BENCHMARKS.md; ``cfg:S``
binds both branches in one batched call). NFE are counted network forward calls per sample; a
CFG-guided call evaluates both branches in one batched forward pass and counts as one call of
the guided model.

**Scores.** FID and KID of ``--n`` samples (clamped to [-1, 1]) against the real reference of
``difflab eval RUN --metrics fid,kid --n N --train-extractor`` (the dataset's extractor,
``mnist-lenet``; the dataset split into reference / held-out halves with ``--seed``; the
real-versus-real floor at ``n``). Sanity checks: the mean per-sample RMS distance between the
difflab and diffusers samples of one solver family (different grids and options, so not
small), and, on the first ``--check-n`` samples, difflab's solver configured as each
diffusers row (the options of ``tests/interop/test_peer_samplers.py``, ``clip_x0`` = its
``thresholding``) on diffusers' own grid (``difflab_grid_for``) against that row's samples:
this one is float32 rounding only if both run the same network, noise and labels.

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/peer_fid.py --run /work/runs/cfg_mnist
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/peer_fid.py --run RUN --n 32 --nfe 5 \\
        --out /tmp/peer_fid_smoke.json          # a quick check (FID at n=32 is meaningless)

Writes ``--out`` (default ``benchmarks/results/peer_fid/<run name>.json``) and the same name
with ``.md``: the FID table (rows: sampler, columns: NFE) and the sanity checks.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout too
from difflab.builders import build_dataset  # noqa: E402
from difflab.evaluation.command import _native_data, check_request, load_run  # noqa: E402
from difflab.evaluation.evaluate import RealReference  # noqa: E402
from difflab.evaluation.features import (  # noqa: E402
    dataset_tensors,
    extractor_for_dataset,
    get_extractor,
)
from difflab.paths import DiscreteVP  # noqa: E402
from difflab.samplers import PerSampleNoise  # noqa: E402
from difflab.sampling import (  # noqa: E402
    SampleRequest,
    generate,
    guidance_inputs,
    resolve_settings,
    sample_seeds,
    sampling_grid,
)
from difflab.testing.peers import difflab_grid_for, float64_scheduler, run_diffusers  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
METRICS = ["fid", "kid"]

# difflab sampler -> (diffusers scheduler class, difflab options that make it the diffusers
# default: tests/interop/test_peer_samplers.py, final sigma = 0 with lower_order_final=True)
FAMILIES = {
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"lower_order_final": False}),
    "unipc_bh2": ("UniPCMultistepScheduler", {"order": 2, "corrector": True,
                                              "corrector_order": 2, "lower_order_final": False}),
}
PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


# ----- helpers -----------------------------------------------------------------------------------
def per_sample_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over samples of ``sqrt(mean over pixels of (a - b)^2)``."""
    d = (a.double() - b.double()).flatten(1)
    return float(d.pow(2).mean(1).sqrt().mean())


class CountCalls:
    """Forward calls of the network (one per evaluation of the, possibly guided, model)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = 0
        self.handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, *_) -> None:
        self.calls += 1

    def close(self) -> None:
        self.handle.remove()


# extra diffusers configurations (--peer-variants): thresholding=True with the default
# sample_max_value=1.0 clamps x0 to [-1, 1] (its quantile s is clamped to [1, 1]), which is
# difflab's clip_x0
PEER_VARIANTS = {"default": {}, "thresholding": {"thresholding": True}}


def make_scheduler(name: str, path: DiscreteVP, prediction_type: str, **overrides):
    """A diffusers scheduler with its default config, except the run's betas and prediction
    (and ``overrides``)."""
    import diffusers

    cls = getattr(diffusers, name)
    return cls(num_train_timesteps=path.N, trained_betas=path.betas.tolist(),
               prediction_type=prediction_type, **overrides)


def scheduler_config(sched) -> dict:
    """The scheduler's config for the report (``trained_betas`` summarised)."""
    out = {}
    for k, v in dict(sched.config).items():
        if k.startswith("_"):
            continue
        if k == "trained_betas" and v is not None:
            v = f"the run's {len(v)} betas ({v[0]:.4g} .. {v[-1]:.4g})"
        elif isinstance(v, float) and not math.isfinite(v):
            v = str(v)
        out[k] = v
    return out


def diffusers_timesteps(sched, steps: int) -> list[int]:
    s = float64_scheduler(sched)
    s.set_timesteps(steps)
    return [int(t) for t in s.timesteps]


def grid_steps(times: torch.Tensor, path: DiscreteVP) -> list:
    """A difflab grid on a discrete path as its step indices (``t = (n + 1) / N``; 0 -> "0")."""
    return [("t=0" if float(t) == 0 else round(float(t) * path.N - 1, 3)) for t in times]


@torch.no_grad()
def run_peer(loaded, sched, n: int, seed: int, batch_size: int, guidance: str | None,
             steps: int) -> tuple[torch.Tensor, float]:
    """``n`` samples of a diffusers scheduler on the run's (guided) denoiser, each from the
    x_T and label :func:`difflab.sampling.draw` gives sample ``i``; returns (samples, NFE)."""
    den = loaded.denoiser
    cond, null, guide = guidance_inputs(loaded, n, guidance)
    seeds = sample_seeds(seed, n)
    counter = CountCalls(den.net)
    out = []
    try:
        for lo in range(0, n, batch_size):
            hi = min(n, lo + batch_size)
            x = den.path.prior_sample((hi - lo, *loaded.sample_shape),
                                      noise=PerSampleNoise(seeds[lo:hi]))
            c = None if cond is None else cond[lo:hi]
            nc = None if null is None else null[lo:hi]
            d = guide(den, c, nc) if guide is not None else den if c is None else den.bind(c)
            out.append(run_diffusers(sched, d, x, steps, model_dtype=torch.float32).float())
    finally:
        counter.close()
    return torch.cat(out), counter.calls / -(-n // batch_size)


def run_difflab(loaded, sampler: str, steps: int, n: int, seed: int, batch_size: int,
                guidance: str | None, clip_x0: bool | None, grid: str | None = None,
                grid_options: dict | None = None, options: dict | None = None):
    """``difflab sample RUN --sampler S --steps N [--grid G]``'s samples (unclamped) and the
    request's resolved settings."""
    req = SampleRequest(loaded, sampler=sampler, steps=steps, grid=grid,
                        grid_options=grid_options, options=options,
                        guidance=guidance or "none", n=n, seed=seed, batch_size=batch_size,
                        clip_x0=clip_x0)
    out = generate(req)
    return out.images.float(), out.nfe, resolve_settings(loaded, req)


def parse_grid(text: str) -> tuple[str, dict]:
    """``"discrete:spacing=trailing"`` -> ``("discrete", {"spacing": "trailing"})`` (values:
    int, float or string)."""
    name, *items = text.split(":")
    opts: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--grids: {text!r}: options are KEY=VALUE")
        for conv in (int, float):
            try:
                opts[key] = conv(value)
                break
            except ValueError:
                continue
        else:
            opts[key] = value
    return name, opts


def score(ref: RealReference, x: torch.Tensor, metrics: list[str], kid_subsets: int) -> dict:
    bad = int((~torch.isfinite(x.flatten(1))).any(1).sum())
    if bad:
        return {"nonfinite_samples": bad, "fid": None, "kid": None}
    s = ref.evaluate(x.clamp(-1, 1), metrics, kid_subsets=kid_subsets)
    return {"nonfinite_samples": 0, "fid": None, **{k: v.to_dict() for k, v in s.items()}}


# ----- the report --------------------------------------------------------------------------------
def fmt_cell(res: dict | None) -> str:
    if res is None:
        return "-"
    sc = res["scores"]
    if sc["nonfinite_samples"]:
        return f"NaN ({sc['nonfinite_samples']} non-finite)"
    fid = "n/a" if sc.get("fid") is None else f"{sc['fid']['value']:.1f}"
    cell = f"{fid} ({sc['kid']['value']:.2f})"
    if res["nfe"] != res["nfe_budget"]:
        cell += f" [NFE {res['nfe']}]"
    return cell


def markdown(report: dict) -> str:
    nfes = report["nfe"]
    rows = report["rows"]
    by = {(r["label"], r["nfe_budget"]): r for r in rows}
    labels = list(dict.fromkeys(r["label"] for r in rows))
    fl = {k: report["floor"].get(k, {"value": float("nan")}) for k in METRICS}
    lines = [f"# difflab vs diffusers samplers: FID on `{report['run']}` (step {report['step']})",
             "",
             f"n = {report['n']} samples per cell against {report['n_reference']} reference "
             f"images, extractor `{report['extractor']}`; guidance `{report['guidance']}`; "
             f"difflab clip_x0 = {report['clip_x0']} (diffusers' defaults: no clipping). "
             f"Real-versus-real floor at this n: FID {fl['fid']['value']:.2f} "
             f"(KID {fl['kid']['value']:.2f}). Cells: FID (KID, as `difflab eval` reports it).",
             "",
             "| sampler | " + " | ".join(f"NFE {k}" for k in nfes) + " |",
             "| --- | " + " | ".join("---" for _ in nfes) + " |"]
    for lab in labels:
        lines.append(f"| {lab} | " + " | ".join(fmt_cell(by.get((lab, k))) for k in nfes) + " |")
    lines += ["", "Mean per-sample RMS distance (unclamped samples; images in [-1, 1]) from each "
              "diffusers row to difflab's headline row of the same family / to difflab "
              "configured as that diffusers config on diffusers' grid (first "
              f"{report['check_n']} samples; clip_x0 = thresholding):", "",
              "| diffusers row | " + " | ".join(f"NFE {k}" for k in nfes) + " |",
              "| --- | " + " | ".join("---" for _ in nfes) + " |"]
    for fam, chk in report["checks"].items():
        cells = []
        for k in nfes:
            c = chk.get(str(k))
            if c is None:
                cells.append("-")
                continue
            m = c.get("matched_rms")
            cells.append(f"{c['default_rms']:.3f} / " + ("-" if m is None else f"{m:.1e}"))
        lines.append(f"| {fam} | " + " | ".join(cells) + " |")
    lines += ["", "Grids (step indices, t = (n + 1) / N; diffusers: its timesteps, then "
              "sigma = 0):", ""]
    for k in nfes:
        g = report["grids"][str(k)]
        lines.append(f"- NFE {k}: " + "; ".join(f"{name}: {v}" for name, v in g.items()))
    lines += ["", f"Wall time: {report['seconds']:.0f} s ({report['threads']} thread(s), "
              f"{report['machine']})."]
    return "\n".join(lines) + "\n"


# ----- main --------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0].replace("\n", " "),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/peer_fid.py "
               "--run /work/runs/cfg_mnist --n 500")
    ap.add_argument("--run", required=True, help="the run folder (EMA weights are used)")
    ap.add_argument("--checkpoint", default=None, help="step_N (default: the latest)")
    ap.add_argument("--n", type=int, default=500, help="samples per setting (default 500)")
    ap.add_argument("--nfe", default="5,10,20", help="comma list of NFE budgets")
    ap.add_argument("--guidance", default="none",
                    help="none (default: conditional samples without guidance, as the cfg_mnist "
                         "FIDs in BENCHMARKS.md) or cfg:SCALE; ignored for unconditional runs")
    ap.add_argument("--clip-x0", action=argparse.BooleanOptionalAction, default=None,
                    help="difflab's clip_x0 (default: the run's sample.clip_x0, as difflab "
                         "sample)")
    ap.add_argument("--grids", default="auto",
                    help="difflab grids, comma list of NAME[:KEY=VALUE...]; the first is the "
                         "headline row (default auto: the path's own); e.g. "
                         "auto,log_snr,discrete:spacing=trailing")
    ap.add_argument("--peer-variants", default="default,thresholding",
                    help="diffusers configurations, comma list of default (the headline row) "
                         "and thresholding (thresholding=True: x0 clamped to [-1, 1], difflab's "
                         "clip_x0)")
    ap.add_argument("--check-n", type=int, default=64,
                    help="samples of the matched-configuration check (0: skip)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=250)
    ap.add_argument("--kid-subsets", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON file (default benchmarks/results/peer_fid/<run name>.json); the "
                         "markdown table goes beside it (.md)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    nfes = [int(s) for s in args.nfe.split(",") if s.strip()]
    grids = [g.strip() for g in args.grids.split(",") if g.strip()]
    if not grids:
        raise SystemExit("--grids: give at least one grid (auto: the path's own)")
    start = time.perf_counter()

    run = load_run(args.run, args.checkpoint)
    loaded = run.loaded
    path = loaded.denoiser.path
    if not isinstance(path, DiscreteVP):
        raise SystemExit(f"{args.run}: the diffusers schedulers need a discrete path with betas; "
                         f"this run's path is {path!r}")
    prediction = run.config.task.prediction
    ptype = PREDICTION_TYPES.get(prediction, "epsilon")
    guidance = None if loaded.conditioner.kind == "none" else (
        None if args.guidance in ("", "none") else args.guidance)
    clip = run.config.sample.clip_x0 if args.clip_x0 is None else args.clip_x0
    out = args.out or REPO / "benchmarks" / "results" / "peer_fid" / f"{Path(args.run).name}.json"

    # the real reference of difflab eval RUN --metrics fid,kid --n N --train-extractor
    cfg = run.config
    data = build_dataset(cfg)
    real, _ = dataset_tensors(data)
    name = extractor_for_dataset(cfg.data.name)
    native = _native_data(name, cfg, data)
    ext = get_extractor(name, native, train=True)
    ext.resize_inputs = native is not data
    ref = RealReference(ext, real, torch.Generator().manual_seed(args.seed))
    metrics = METRICS if args.n > ext.dim else ["kid"]  # FID needs n > the feature dimension
    check_request(metrics, args.n, ext)
    floor = {k: v.to_dict() for k, v in ref.floor(args.n, metrics,
                                                  kid_subsets=args.kid_subsets).items()}
    print(f"{args.run} step {run.step}: path {path!r}, prediction {prediction} ({ptype}), "
          f"guidance {guidance or 'none'}, clip_x0 {clip}; floor "
          + ", ".join(f"{k} {v['value']:.3g}" for k, v in floor.items()) + f" at n={args.n}"
          + ("" if "fid" in metrics else f" (no FID: n <= {ext.dim} feature dimensions)"),
          flush=True)

    report = {"run": str(args.run), "step": run.step, "n": args.n, "nfe": nfes,
              "n_reference": int(ref.reference.shape[0]), "extractor": ext.name,
              "extractor_meta": ext.meta, "guidance": guidance or "none", "clip_x0": clip,
              "seed": args.seed, "prediction_type": ptype, "floor": floor, "rows": [],
              "checks": {}, "grids": {}, "schedulers": {}, "check_n": args.check_n,
              "threads": args.threads,
              "machine": f"{platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}",
              "notes": [
                  "NFE: counted network forward calls per sample; a cfg-guided call evaluates "
                  "both branches in one batched pass and counts once",
                  "diffusers: default configs with num_train_timesteps / trained_betas = the "
                  "run's path and prediction_type = the run's prediction; scheduler arithmetic "
                  "in float64 (run_diffusers), the network in float32",
                  "difflab: default options and grid, as difflab sample RUN --sampler X --steps "
                  "NFE; clip_x0 as the run's sample.clip_x0 unless --clip-x0 says otherwise"]}
    import diffusers

    report["diffusers_version"] = diffusers.__version__
    variants = [v.strip() for v in args.peer_variants.split(",") if v.strip()]
    for v in variants:
        if v not in PEER_VARIANTS:
            raise SystemExit(f"--peer-variants: {v!r} is not one of {', '.join(PEER_VARIANTS)}")
    scheds = {(fam, v): make_scheduler(cls, path, ptype, **PEER_VARIANTS[v])
              for fam, (cls, _) in FAMILIES.items() for v in variants}
    for (fam, v), s in scheds.items():
        report["schedulers"][f"{FAMILIES[fam][0]} {v}"] = scheduler_config(s)

    def record(label, lib, sampler, nfe, x, nfe_counted, seconds, extra):
        if nfe_counted is not None and float(nfe_counted).is_integer():
            nfe_counted = int(nfe_counted)
        res = {"label": label, "library": lib, "sampler": sampler, "nfe_budget": nfe,
               "nfe": nfe_counted, "seconds": seconds,
               "scores": score(ref, x, metrics, args.kid_subsets), **extra}
        report["rows"].append(res)
        print(f"  {label:<44} NFE {nfe:>3} (counted {nfe_counted}): {fmt_cell(res)}  "
              f"[{seconds:.0f} s]", flush=True)
        return res

    for nfe in nfes:
        report["grids"][str(nfe)] = {}
        for fam, (cls_name, matched) in FAMILIES.items():
            samples = {}
            for gi, grid in enumerate(grids):
                t0 = time.perf_counter()
                gname, gopts = parse_grid(grid)
                x, counted, st = run_difflab(loaded, fam, nfe, args.n, args.seed,
                                             args.batch_size, guidance, clip,
                                             grid=None if gname == "auto" else gname,
                                             grid_options=gopts)
                secs = time.perf_counter() - t0
                times = sampling_grid(path, nfe, st["grid"], st["grid_options"])
                label = f"difflab {fam}" + ("" if gi == 0 else f" [{grid}]")
                record(label, "difflab", fam, nfe, x, counted, secs,
                       {"grid": st["grid"], "grid_options": st["grid_options"],
                        "options": st["options"], "clip_x0": st["clip_x0"],
                        "times": [float(t) for t in times]})
                report["grids"][str(nfe)][label] = grid_steps(times, path)
                samples[grid] = x
            for v in variants:
                sched = scheds[(fam, v)]
                t0 = time.perf_counter()
                y, counted = run_peer(loaded, sched, args.n, args.seed, args.batch_size,
                                      guidance, nfe)
                secs = time.perf_counter() - t0
                label = f"diffusers {cls_name}" + ("" if v == "default" else
                                                   f" ({v}=True)")
                steps = diffusers_timesteps(sched, nfe)
                record(label, "diffusers", cls_name, nfe, y, counted, secs,
                       {"variant": v, "overrides": PEER_VARIANTS[v], "timesteps": steps})
                if v == variants[0]:
                    report["grids"][str(nfe)][f"diffusers {cls_name}"] = steps + ["sigma=0"]
                chk = {"default_rms": per_sample_rms(samples[grids[0]], y),
                       "default_rms_clamped": per_sample_rms(samples[grids[0]].clamp(-1, 1),
                                                             y.clamp(-1, 1))}
                if args.check_n > 0:  # difflab as this diffusers config, on its grid
                    m = min(args.check_n, args.n)
                    times = difflab_grid_for(sched, path, nfe)
                    xm, _, _ = run_difflab(loaded, fam, nfe, m, args.seed, args.batch_size,
                                           guidance, bool(PEER_VARIANTS[v]), grid="custom",
                                           grid_options={"times": [float(t) for t in times]},
                                           options=matched)
                    diff = (xm.double() - y[:m].double()).abs()
                    chk.update({"matched_rms": per_sample_rms(xm, y[:m]),
                                "matched_max_abs": float(diff.max()),
                                "matched_options": matched,
                                "matched_clip_x0": bool(PEER_VARIANTS[v]), "matched_n": m})
                report["checks"].setdefault(label, {})[str(nfe)] = chk
                print(f"  {fam} vs {label} NFE {nfe}: RMS to difflab's default "
                      f"{chk['default_rms']:.4f}, difflab as this config "
                      f"{chk.get('matched_rms', float('nan')):.2e}", flush=True)

    report["seconds"] = time.perf_counter() - start
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=str))
    md = out.with_suffix(".md")
    md.write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {out} and {md} ({report['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
