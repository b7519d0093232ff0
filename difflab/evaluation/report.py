"""Evaluation reports: ``report.json`` (everything), ``report.md`` (a table) and plots.

A report is a plain dict (what ``report.json`` holds)::

    {"run": str, "step": int | None, "extractor": {"name": ..., "score": ..., ...},
     "n": int, "floor": {metric: Score dict}, "settings": [
        {"sampler": "ddim", "steps": 10, "nfe": 10, "guidance": "cfg:3", "scale": 3.0,
         "n": 5000, "scores": {metric: Score dict}, "samples": "samples/ddim-10_cfg-3.npy",
         "grid": "grids/ddim-10_cfg-3.png", "seconds": 12.3}, ...]}

Score dicts are :meth:`~difflab.evaluation.metrics.Score.to_dict` (value, n_fake, n_real,
std, stderr); metrics are ``fid``, ``kid``, ``precision``, ``recall``, ``is``. The model's
likelihood of real data (not a property of a sampler) is the optional top-level
``"likelihood": {"name": "NLL (...)", "value": bits/dim, "stderr", "n_real"}``, or
``{"value": None, "note": why}`` when unavailable. Every FID in the table is printed
with the real-versus-real floor and the sample counts beside it. Plots use matplotlib's Agg
backend (no display needed).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

from difflab.errors import DifflabError, bad_value
from difflab.fileio import write_text_atomic

KID_UNITS = "raw MMD^2, not x10^3"
COLUMNS = (("fid", "FID"), ("kid", f"KID ({KID_UNITS})"), ("precision", "precision"),
           ("recall", "recall"), ("is", "IS"))
PLOT_METRICS = tuple(k for k, _ in COLUMNS)
"""The metrics a report's table and plots know (``difflab compare --metric``)."""
KID_NOTE = ("KID is the unbiased squared MMD with the cubic polynomial kernel (Binkowski et al. "
            "2018, eq. 2) of the features, printed raw: not multiplied by 10^3 as some papers "
            "print it.")


def check_plot_metric(metric: str, option: str = "metric") -> str:
    """``metric`` lower-cased, or a one-line error naming the accepted ones."""
    m = str(metric).strip().lower()
    if m not in PLOT_METRICS:
        raise bad_value(option, metric, "one of " + ", ".join(PLOT_METRICS))
    return m


def _value(d: dict | None) -> float | None:
    v = None if d is None else d.get("value")
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def fmt_score(d: dict | None, floor: dict | None = None, with_n: bool = True) -> str:
    """One table cell: ``value ± s.e. (floor F) [n=..]``; ``n/a (why)`` when unavailable."""
    if d is None:
        return ""
    v = _value(d)
    if v is None:
        return f"n/a ({d.get('note', 'unavailable')})"
    err = d.get("stderr") if d.get("stderr") is not None else d.get("std")
    text = f"{v:.4g}" + (f" ± {err:.2g}" if err else "")
    fv = _value(floor)
    if fv is not None:
        text += f" (floor {fv:.4g})"
    n_fake, n_real = d.get("n_fake"), d.get("n_real")
    if n_fake and with_n:
        text += f" [n={n_fake}" + (f" vs {n_real}" if n_real else "") + "]"
    return text


def setting_label(s: dict) -> str:
    """``sampler:steps`` plus the guidance when there is one (``ddim:10 cfg:3``)."""
    g = s.get("guidance") or "none"
    return f"{s['sampler']}:{s['steps']}" + ("" if g == "none" else f" {g}")


def table_metrics(reports: Sequence[dict]) -> list[tuple[str, str]]:
    """``(key, header)`` of every metric some setting of ``reports`` has, in table order."""
    return [(k, h) for k, h in COLUMNS
            if any(k in s["scores"] for r in reports for s in r.get("settings", []))]


def markdown_table(report: dict, run_column: bool = False,
                   metrics: Sequence[tuple[str, str]] | None = None) -> str:
    """The settings of a report as a Markdown table (floor beside every FID); ``metrics``
    (default: the report's own) fixes the columns, so tables of several reports line up."""
    metrics = table_metrics([report]) if metrics is None else list(metrics)
    head = (["run"] if run_column else []) + ["sampler", "steps", "NFE", "guidance", "n"]
    head += [h for _, h in metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    floor = report.get("floor", {})
    for s in report.get("settings", []):
        row = ([report.get("run", "")] if run_column else [])
        row += [s["sampler"], str(s["steps"]), str(s["nfe"]), s.get("guidance") or "none",
                str(s["n"])]
        row += [fmt_score(s["scores"].get(k), floor.get(k), with_n=True) if k == "fid"
                else fmt_score(s["scores"].get(k), with_n=False) for k, _ in metrics]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |")
    return "\n".join(lines)


def floor_lines(report: dict) -> list[str]:
    """The real-versus-real floor, one bullet per metric, with its sample counts."""
    out = []
    for k, h in COLUMNS:
        d = report.get("floor", {}).get(k)
        if d is not None and _value(d) is not None:
            out.append(f"- {h}: {fmt_score(d)}")
    return out


def likelihood_lines(lik: dict | None) -> list[str]:
    """The likelihood bullet and, when known, what kind of number it is (a bound, its steps
    and variance)."""
    if not lik:
        return []
    value = (f"{_value(lik):.4g} ± {lik.get('stderr') or 0:.2g} bits/dim on "
             f"{lik.get('n_real')} {lik.get('data', 'real images')}"
             if _value(lik) is not None else f"n/a ({lik.get('note', 'unavailable')})")
    out = [f"- {lik.get('name', 'NLL')}: {value}"]
    if _value(lik) is not None and lik.get("note"):
        out.append(f"- This is {lik['note']}.")
    if lik.get("moments"):
        out.append(f"- Analytic-DPM moments: `{lik['moments']}`.")
    return out


def render_markdown(report: dict, plots: Sequence[str] = ()) -> str:
    """The whole ``report.md`` text (sections without content are left out)."""
    step = report.get("step")
    lines = [f"# Evaluation of {report.get('run', '?')}" + (f" (step {step})" if step else ""),
             ""]
    settings = report.get("settings") or []
    ext = report.get("extractor")
    if ext:
        quality = ""
        if ext.get("score") is not None:
            kind = ext.get("score_kind", "score")
            val = ext["score"]
            quality = (f", held-out accuracy {100 * val:.2f}%" if kind == "accuracy"
                       else f", held-out {kind} {val:.3g}")
        lines += [f"Features: `{ext.get('name', '?')}`{quality}. Every generated set is "
                  f"compared with the same {report.get('n_reference', '?')} real reference "
                  "images; the floor compares as many *other* real images with that reference "
                  "(what a perfect model would score at this n).", ""]
    floor = floor_lines(report)
    if floor:
        lines += ["## Real-versus-real floor", "", *floor, ""]
    if settings:
        lines += ["## Results", "", markdown_table(report), ""]
        if any("kid" in s["scores"] for s in settings):
            lines += [KID_NOTE, ""]
    lik = likelihood_lines(report.get("likelihood"))
    if lik:
        lines += ["## Likelihood", "", *lik, ""]
    notes = report.get("notes") or []
    if notes:
        lines += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    if plots:
        lines += ["## Plots", "", *[f"![{Path(p).stem}]({p})" for p in plots], ""]
    grids = [(setting_label(s), s["grid"]) for s in settings if s.get("grid")]
    if grids:
        lines += ["## Samples", "", *[f"**{label}**\n\n![{label}]({g})\n" for label, g in grids]]
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_metric_vs_nfe(report: dict, path: str | os.PathLike, metric: str = "fid") -> Path | None:
    """``metric`` against NFE, one line per sampler and guidance, the floor dashed. None when
    no setting has the metric."""
    series: dict[str, list[tuple[int, float]]] = {}
    for s in report.get("settings", []):
        v = _value(s["scores"].get(metric))
        if v is not None:
            g = s.get("guidance") or "none"
            key = s["sampler"] + ("" if g == "none" else f" {g}")
            series.setdefault(key, []).append((s["nfe"], v))
    if not series:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=key)
    fv = _value(report.get("floor", {}).get(metric))
    if fv is not None:
        ax.axhline(fv, color="gray", linestyle="--", label="real vs real floor")
    ax.set_xscale("log")
    ax.set_xlabel("NFE (network evaluations per sample)")
    unit = f", {KID_UNITS}" if metric == "kid" else ""
    ax.set_ylabel(metric.upper() + f" (n={report.get('n', '?')}{unit})")
    ax.set_title(f"{metric.upper()} vs NFE: {report.get('run', '')}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_precision_recall(report: dict, path: str | os.PathLike) -> Path | None:
    """Precision against recall, one curve per sampler across guidance settings (annotated),
    the floor as a star. None when the report has no precision / recall."""
    series: dict[str, list[tuple[float, float, str]]] = {}
    for s in report.get("settings", []):
        p, r = _value(s["scores"].get("precision")), _value(s["scores"].get("recall"))
        if p is not None and r is not None:
            key = f"{s['sampler']}:{s['steps']}"
            series.setdefault(key, []).append((r, p, s.get("guidance") or "none"))
    if not series:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    for key, pts in sorted(series.items()):
        ax.plot([q[0] for q in pts], [q[1] for q in pts], marker="o", label=key)
        for r, p, g in pts:
            ax.annotate(g, (r, p), fontsize=7, xytext=(3, 3), textcoords="offset points")
    fl = report.get("floor", {})
    fp, fr = _value(fl.get("precision")), _value(fl.get("recall"))
    if fp is not None and fr is not None:
        ax.plot([fr], [fp], marker="*", markersize=12, color="gray", linestyle="",
                label="real vs real floor")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title(f"precision vs recall (n={report.get('n', '?')})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def write_report(report: dict, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``report.json``, the plots and ``report.md`` into ``out_dir``.

    Returns:
        ``{"json": ..., "markdown": ..., "plots": [...]}`` paths.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = []
    for metric in ("fid", "kid"):
        p = plot_metric_vs_nfe(report, out / f"{metric}_vs_nfe.png", metric)
        if p is not None:
            plots.append(p.name)
    p = plot_precision_recall(report, out / "precision_recall.png")
    if p is not None:
        plots.append(p.name)
    report = {**report, "plots": plots}
    write_text_atomic(out / "report.json", json.dumps(report, indent=2, default=str))
    write_text_atomic(out / "report.md", render_markdown(report, plots))
    return {"json": out / "report.json", "markdown": out / "report.md",
            "plots": [out / q for q in plots]}


def read_report(path: str | os.PathLike) -> dict:
    """A ``report.json`` (or the ``eval`` folder / run folder holding ``eval/report.json``)."""
    p = Path(path)
    for cand in (p, p / "report.json", p / "eval" / "report.json"):
        if cand.is_file():
            try:
                report = json.loads(cand.read_text())
            except ValueError as e:
                raise DifflabError(f"{cand} is not a difflab report (invalid JSON: {e})") from None
            if not isinstance(report, dict) or "run" not in report:
                raise DifflabError(f"{cand} is not a report written by difflab eval")
            return report
    raise DifflabError(f"no report.json at {p} (nor {p / 'eval' / 'report.json'}): run "
                       f"`difflab eval {p}` first")


def write_comparison(reports: Sequence[dict], out_dir: str | os.PathLike,
                     metric: str = "fid") -> dict[str, Path]:
    """One table (``compare.md`` / ``compare.json``) and one plot (``compare.png``: ``metric``
    against NFE, a line per run and setting family) across runs. The table has a column for
    every metric any report has (a cell stays empty where a report lacks it); ``plot`` is None
    when no report has ``metric``."""
    metric = check_plot_metric(metric)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = table_metrics(reports)
    merged: dict = {"run": "comparison", "floor": {}, "settings": []}
    body: list[str] = []
    for rep in reports:
        body += markdown_table(rep, run_column=True, metrics=metrics).splitlines()[2:]
        for s in rep.get("settings", []):
            merged["settings"].append({**s, "sampler": f"{rep.get('run')}: {s['sampler']}"})
    head = markdown_table({"settings": []}, run_column=True, metrics=metrics).splitlines()
    floors = [f"- {rep.get('run')}: " + "; ".join(lines).replace("- ", "")
              for rep in reports if (lines := floor_lines(rep))]
    ns = sorted({rep.get("n") for rep in reports if rep.get("n") is not None}, key=str)
    text = ["# Comparison", ""]
    if body:
        text += [f"Sample sizes: {ns} (compare FIDs only at equal n and with the same "
                 "extractor).", ""]
    if floors:
        text += ["## Floors (real vs real)", "", *floors, ""]
    if body:
        text += ["## Results", "", *head, *body, ""]
        if any(k == "kid" for k, _ in metrics):
            text += [KID_NOTE, ""]
    liks = [f"- {rep.get('run')}: " + " ".join(likelihood_lines(rep["likelihood"])[:1])[2:]
            for rep in reports if rep.get("likelihood")]
    if liks:
        text += ["## Likelihood", "", *liks, ""]
    plot = None
    merged["n"] = ",".join(str(n) for n in ns)
    if plot_metric_vs_nfe(merged, out / "compare.png", metric) is not None:
        plot = out / "compare.png"
        text += ["![comparison](compare.png)", ""]
    write_text_atomic(out / "compare.md", "\n".join(text))
    write_text_atomic(out / "compare.json", json.dumps({"runs": list(reports)}, indent=2,
                                                  default=str))
    return {"markdown": out / "compare.md", "json": out / "compare.json", "plot": plot}
