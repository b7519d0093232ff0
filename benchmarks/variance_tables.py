"""The variance papers on trained MNIST models: improved DDPM, Analytic-DPM and SN-/NPR-DPM.

Each table is what `difflab eval` reports, at several step counts, for one trained network
with several reverse variances:

* **iDDPM** (Nichol & Dhariwal 2021, Sec. 3.1 and Fig. 8): a run trained with learned variances
  and L_hybrid (``--iddpm``, configs/iddpm_mnist.toml) against a run with fixed variances and
  L_simple (``--ddpm``, configs/ddpm_mnist.toml), both with the same U-Net and budget: the full
  VLB (bits/dim) with each variance, and FID of ancestral sampling at K respaced steps.
* **Analytic-DPM** (Bao et al. 2022a, Tables 1-2) and **SN-/NPR-DPM** (Bao et al. 2022b,
  Tables 1-2): on the ``--ddpm`` run, the VLB at K steps and FID of K-step sampling with
  DDPM's beta_tilde (``small``) and beta (``large``), Analytic-DPM's optimal variance
  (``analytic``, Gamma_t estimated from the training data) and the per-element variances of
  the residual heads (``--npr``, ``--sn``: residual runs of configs/npr_mnist.toml).

Samples go through ``difflab eval`` (cached in ``OUT/NAME/samples``; a rerun with the same
settings reuses them), FID and KID against the run's held-out digits with the ``mnist-lenet``
features::

    .venv/bin/python benchmarks/variance_tables.py --ddpm runs/ddpm --iddpm runs/iddpm \\
        --npr runs/npr --sn runs/sn [--only bao|iddpm|tables] [--n 500] [--steps 10,25,50]

Writes ``OUT/bao.json``, ``OUT/iddpm.json`` and ``OUT/tables.md`` (default OUT:
benchmarks/results/variance). The fixed-variance run's FIDs of the iDDPM table are the
Analytic-DPM table's ``small`` / ``large`` rows (the same samples).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parent / "results" / "variance"


def _eval(run: str, samplers: str, out: Path, n: int, options: list[str]) -> dict:
    """``difflab eval RUN --samplers ... --metrics fid,kid`` into ``out``; the report."""
    from difflab import cli

    args = ["eval", run, "--samplers", samplers, "--metrics", "fid,kid", "--n", str(n),
            "--out", str(out), "--train-extractor", "--kid-subsets", "50"]
    for o in options:
        args += ["--option", o]
    start = time.perf_counter()
    if cli.main(args) != 0:
        raise SystemExit(f"difflab {' '.join(args)} failed")
    report = json.loads((out / "report.json").read_text())
    report["seconds"] = time.perf_counter() - start
    return report


def _fid_row(report: dict) -> dict[int, dict]:
    out = {}
    for s in report["settings"]:
        m = s["scores"]
        out[int(s["steps"])] = {"fid": m["fid"]["value"], "fid_stderr": m["fid"].get("stderr"),
                                "kid": m["kid"]["value"], "nfe": s.get("nfe")}
    return out


def _nll(run: str, steps: int | None, variance: str, n: int, residual: str | None) -> dict:
    from difflab.builders import build_dataset, build_held_out
    from difflab.evaluation.command import likelihood, load_run
    from difflab.evaluation.features import dataset_tensors

    r = load_run(run)
    held = build_held_out(r.config)
    data = dataset_tensors(held if held is not None else build_dataset(r.config))[0]
    start = time.perf_counter()
    res = likelihood(r, data, n, steps, variance, residual=residual)
    return {"bpd": res["value"], "stderr": res["stderr"], "n": res["n_real"],
            "seconds": time.perf_counter() - start}


def _cell(x: dict | None, key: str, fmt: str = "{:.2f}") -> str:
    if not x or x.get(key) is None:
        return "-"
    return fmt.format(x[key])


def _bao(args, steps: list[int]) -> dict:
    """Analytic-DPM / SN- / NPR-DPM on the fixed-variance run."""
    variances = {"small": ("ddpm", ["variance=small"], None),
                 "large": ("ddpm", ["variance=large"], None),
                 "analytic": ("analytic_ddpm", [], None)}
    if args.npr:
        variances["npr"] = ("npr_ddpm", [f"residual={args.npr}"], args.npr)
    if args.sn:
        variances["sn"] = ("sn_ddpm", [f"residual={args.sn}"], args.sn)
    bao: dict = {}
    for name, (sampler, options, residual) in variances.items():
        spec = ",".join(f"{sampler}:{k}" for k in steps)
        rep = _eval(args.ddpm, spec, args.out / f"ddpm_{name}", args.n, options)
        bao[name] = {"fid": _fid_row(rep), "seconds": rep["seconds"], "nll": {},
                     "floor": rep.get("floor")}
        if not args.skip_nll:
            for k in steps:
                bao[name]["nll"][k] = _nll(args.ddpm, k, name, args.nll_n, residual)
        print(name, json.dumps(bao[name]), flush=True)
    return bao


def _nichol(args, steps: list[int]) -> dict:
    """improved DDPM: the learned-variance run's samples with each variance, and the full VLB
    of both runs (the fixed-variance run's samples are the Analytic-DPM table's rows)."""
    nichol: dict = {}
    for name in ("learned", "small", "large"):
        spec = ",".join(f"ddpm:{k}" for k in steps)
        rep = _eval(args.iddpm, spec, args.out / f"iddpm_{name}", args.n, [f"variance={name}"])
        row = {"fid": _fid_row(rep)}
        if not args.skip_nll:
            row["nll_full"] = _nll(args.iddpm, None, name, args.full_nll_n, None)
        nichol[f"iddpm:{name}"] = row
        print("iddpm", name, json.dumps(row), flush=True)
    if not args.skip_nll:
        for name in ("small", "large"):
            nichol[f"ddpm:{name}"] = {"nll_full": _nll(args.ddpm, None, name, args.full_nll_n,
                                                       None)}
            print("ddpm", name, json.dumps(nichol[f"ddpm:{name}"]), flush=True)
    return nichol


def _tables(out: Path) -> str:
    lines = []
    bao_file, nichol_file = out / "bao.json", out / "iddpm.json"
    if bao_file.is_file():
        b = json.loads(bao_file.read_text())
        steps = b["steps"]
        lines += [f"Analytic-DPM / SN- / NPR-DPM on `{b['runs']['ddpm']}`: FID of {b['n']} "
                  f"samples, VLB (bits/dim) on {b['nll_n']} held-out digits.", "",
                  "| variance | " + " | ".join(f"FID {k}" for k in steps) + " | "
                  + " | ".join(f"NLL {k}" for k in steps) + " |",
                  "| --- |" + " --- |" * (2 * len(steps))]
        for name, row in b["rows"].items():
            lines.append(f"| {name} | "
                         + " | ".join(_cell(row["fid"].get(str(k)), "fid") for k in steps)
                         + " | " + " | ".join(_cell(row["nll"].get(str(k)), "bpd", "{:.3f}")
                                              for k in steps) + " |")
    if nichol_file.is_file():
        d = json.loads(nichol_file.read_text())
        steps = d["steps"]
        bao = json.loads(bao_file.read_text())["rows"] if bao_file.is_file() else {}
        lines += ["", f"improved DDPM: `{d['runs']['iddpm']}` (learned variances, L_hybrid) "
                  f"against `{d['runs']['ddpm']}` (fixed, L_simple); FID of {d['n']} samples, "
                  f"VLB over all steps on {d['full_nll_n']} held-out digits.", "",
                  "| run: variance | " + " | ".join(f"FID {k}" for k in steps)
                  + " | NLL (all steps) |", "| --- |" + " --- |" * (len(steps) + 1)]
        for name, row in d["rows"].items():
            fid = row.get("fid") or bao.get(name.split(":")[1], {}).get("fid", {})
            lines.append(f"| {name} | " + " | ".join(_cell(fid.get(str(k)), "fid")
                                                     for k in steps)
                         + f" | {_cell(row.get('nll_full'), 'bpd', '{:.3f}')} |")
    text = "\n".join(lines) + "\n"
    (out / "tables.md").write_text(text)
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ddpm", help="fixed-variance run (L_simple)")
    p.add_argument("--iddpm", help="learned-variance run (L_hybrid)")
    p.add_argument("--npr", help="NPR residual run of --ddpm")
    p.add_argument("--sn", help="SN residual run of --ddpm")
    p.add_argument("--only", choices=["bao", "iddpm", "tables"], default=None,
                   help="one table (bao: Analytic / SN / NPR; iddpm) or just rebuild tables.md "
                   "from the JSON files (default: both tables)")
    p.add_argument("--n", type=int, default=500, help="samples per FID setting (default 500)")
    p.add_argument("--steps", default="10,25,50", help="step counts of the Analytic-DPM table")
    p.add_argument("--iddpm-steps", default="25,50",
                   help="step counts of the iDDPM table")
    p.add_argument("--nll-n", type=int, default=100, help="held-out images for the K-step VLB")
    p.add_argument("--full-nll-n", type=int, default=40,
                   help="held-out images for the all-step VLB of the iDDPM table")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip-nll", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    runs = {"ddpm": args.ddpm, "iddpm": args.iddpm, "npr": args.npr, "sn": args.sn}
    if args.only in (None, "bao"):
        if not args.ddpm:
            p.error("--ddpm RUN is needed for the Analytic-DPM table")
        steps = [int(s) for s in args.steps.split(",")]
        rows = _bao(args, steps)
        (args.out / "bao.json").write_text(json.dumps(
            {"n": args.n, "nll_n": args.nll_n, "steps": steps, "runs": runs, "rows": rows},
            indent=1))
    if args.only in (None, "iddpm"):
        if not (args.ddpm and args.iddpm):
            p.error("--ddpm RUN and --iddpm RUN are needed for the iDDPM table")
        steps = [int(s) for s in args.iddpm_steps.split(",")]
        rows = _nichol(args, steps)
        (args.out / "iddpm.json").write_text(json.dumps(
            {"n": args.n, "full_nll_n": args.full_nll_n, "steps": steps, "runs": runs,
             "rows": rows}, indent=1))
    print(_tables(args.out))


if __name__ == "__main__":
    main()
