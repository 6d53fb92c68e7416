"""The breakthrough report as a reader sees it: the same sections as markdown (report.md) and as rich tables in the
terminal."""

from __future__ import annotations

import math

from rich.console import Console
from rich.table import Table

from latentgate.schema import EvalKey, EvalPath, Probe

# ------------------------------------------------------------------------------------------------------------
# Rendering
# ------------------------------------------------------------------------------------------------------------


def _pct(v, digits: int = 1) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}%}"


def fmt_num(v, fmt: str = ".3f") -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, float)):
        return "nan" if isinstance(v, float) and math.isnan(v) else format(v, fmt)
    return str(v)


def _interval(iv) -> str:
    if not iv or iv[0] is None:
        return ""
    return f" [{_pct(iv[0])}, {_pct(iv[1])}]"


def sections(rep: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """The report as (title, header, rows) tables: shared by markdown and the terminal."""
    out = []
    st_rows = []
    for s in rep["stages"]:
        peak = f"{_pct(s.get('peak_first_acc'))} @ {s.get('peak_step', '—')}{_interval(s.get('peak_interval'))}"
        st_rows.append([s["label"], str(s["steps"]), str(s["probes"]), peak,
                        f"{_pct(s.get('final_first_acc'))} @ {s.get('final_step', '—')}",
                        "—" if "regression_pct" not in s else f"{s['regression_pct']:.1f}%",
                        "—" if "last_n" not in s else
                        f"{_pct(s['last_n']['mean'])} ± {_pct(s['last_n']['std'])} "
                        f"({_pct(s['last_n']['min'])}–{_pct(s['last_n']['max'])})",
                        f"{_pct(s.get('top5_at_peak'))} / {_pct(s.get('top5_final'))}",
                        fmt_num(s.get("probe_f1_max")),
                        "—" if s.get("peak_first_acc_lift") is None else
                        f"{_pct(s['peak_first_acc_lift'])} @ {s['peak_lift_step']} (constant guess "
                        f"{_pct(s.get(Probe.CONST))}, shuffled {_pct(s.get(Probe.SHUFFLED))})"])
    out.append(("First-token learning (held-out probe)",
                ["stage", "steps", "probes", "peak (95% CI)", "final", "regression", f"last {rep['last_n']} probes",
                 "top-5 peak/final", "probe F1 max", "peak lift over controls"], st_rows))
    ev = rep.get("eval")
    if ev:
        rows = []
        for path, m in ev["paths"].items():
            rows.append([path + ("" if path == EvalPath.LATENT else " (control)" if path in EvalPath.CONTROLS
                                 else " (teacher)" if path == EvalPath.TEXT else ""),
                         fmt_num(m.get(EvalKey.F1)), fmt_num(m.get(EvalKey.EM)), _pct(m.get(EvalKey.FIRST_TOP1)),
                         _pct(m.get(EvalKey.FIRST_TOP1_CONST)), _pct(m.get(EvalKey.FIRST_TOP5)),
                         fmt_num(m.get(EvalKey.NLL_PER_TOKEN), ".2f"), _pct(m.get(EvalKey.TOP_PREDICTION_SHARE)),
                         _pct(m.get(EvalKey.REPETITION_RATE)), _pct(m.get(EvalKey.EMPTY_RATE))])
        out.append(("Eval (per path)", ["path", "F1", "EM", "first@1", "first@1 constant guess", "first@5",
                                        "NLL/tok", "top share", "repetition", "empty"], rows))
        bt = ev.get("breakthrough") or {}
        dist = ev.get("f1_distribution") or {}
        ex = bt.get("example")
        brows = [["latent F1 > 0 on any example", fmt_num(bt.get("any_f1_nonzero"))],
                 ["first example with F1 > 0", "none" if bt.get("first_f1_nonzero_idx") is None else
                  f"#{bt['first_f1_nonzero_idx']} ({ex['id']}): {ex['prediction']!r} vs {ex['references']} "
                  f"F1 {ex['f1']:.3f}" if ex else f"#{bt.get('first_f1_nonzero_idx')}"],
                 ["examples with F1 > 0", f"{bt.get('n_f1_nonzero', '—')} / {bt.get('n', '—')}"],
                 ["F1 distribution", ", ".join(f"{k}: {v}" for k, v in dist.items()) or "—"]]
        beats = ev.get("latent_beats_controls") or {}
        if beats:
            brows.append(["latent beats controls", ", ".join(f"{k}: {'yes' if v else 'no'}" for k, v in beats.items())])
        out.append(("F1 breakthrough (latent path only)", ["", ""], brows))
        col = ev.get("collapse") or {}
        if col:
            top = f" ({col['top_prediction']!r} x{col['top_prediction_count']})" if "top_prediction" in col else ""
            reps = f"{col.get('repetition_count', '—')} ({_pct(col.get(EvalKey.REPETITION_RATE))})"
            crow = [["top prediction share", f"{_pct(col.get(EvalKey.TOP_PREDICTION_SHARE))}{top}"],
                    ["repetitive (\"thethethe\")", reps],
                    ["empty", f"{col.get('empty_count', '—')} ({_pct(col.get(EvalKey.EMPTY_RATE))})"],
                    ["distinct first tokens", fmt_num(col.get(EvalKey.DISTINCT_FIRST_TOKENS), "d")]]
            if col.get("error_modes"):
                crow.append(["error modes", ", ".join(f"{k}: {v}" for k, v in col["error_modes"].items())])
            out.append(("Mode collapse (latent path)", ["", ""], crow))
    grows = []
    for label, g in rep["gradients"]["stages"].items():
        for group, f in g["groups"].items():
            grows.append([label, group, fmt_num(f["max"], ".3g"), str(f["max_step"]), fmt_num(f["p50"], ".3g"),
                          fmt_num(f["p90"], ".3g"), fmt_num(f["p99"], ".3g")])
        if g["nan_steps"]:
            grows.append([label, "NaN at steps", ", ".join(map(str, g["nan_steps"][:10])), "", "", "", ""])
    if grows:
        out.append(("Gradient health (pre-clip norms)", ["stage", "group", "max", "at step", "p50", "p90", "p99"],
                    grows))
    rd = rep["readiness"]
    rrows = [[r["name"], "PASS" if r["passed"] else "—" if r["passed"] is None else "FAIL",
              fmt_num(r["observed"], ".4g"), f"{r.get('op') or ''} {fmt_num(r['threshold'], '.4g')}".strip(),
              str(r.get("source") or "") + (f" — {r['detail']}" if r.get("detail") and not r["passed"] else "")]
             for r in rd["rows"]]
    out.append((f"Readiness checklist ({rd['source']})", ["criterion", "result", "observed", "threshold", "source"],
                rrows))
    return out


def to_markdown(rep: dict) -> str:
    run = rep["run"]
    lines = [f"# latentgate breakthrough report: {run['name'] or run['run_id']}", ""]
    lines.append(f"run `{run['run_id']}` · phase {run['phase'] or '—'} · status {run['status']} · preset "
                 f"{run['preset'] or '—'} · commit {run['git_commit'][:10] or '—'}"
                 if run["run_id"] else f"source `{run['source']}`")
    lines.append("")
    for title, header, rows in sections(rep):
        lines += [f"## {title}", ""]
        if any(header):
            lines.append("| " + " | ".join(header) + " |")
        else:
            lines.append("| | |")
        lines.append("|" + "---|" * len(header))
        for r in rows:
            lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |")
        lines.append("")
    rd = rep["readiness"]
    if rd.get("note"):
        lines += [f"_{rd['note']}_", ""]
    if rd.get("missing"):
        lines += [f"Missing evidence: {', '.join(rd['missing'])}", ""]
    lines += [f"Thresholds from: {rd['thresholds_source']}", ""]
    rec = rep.get("recommendation")
    lines.append("## Recommendation")
    lines.append("")
    if rec:
        lines += [f"**{rec['verdict']}**: {rec['reason']}.", "", f"Next: {rec['next_step']}."]
    else:
        lines.append("No recommendation: it needs a stage with probes and an eval run (latent path).")
    return "\n".join(lines) + "\n"


def print_rich(rep: dict, console=None) -> None:
    console = console or Console()
    run = rep["run"]
    console.print(f"[bold]latentgate report[/bold] {run['name'] or ''} {run['run_id'] or run['source']} "
                  f"({run['status']})")
    for title, header, rows in sections(rep):
        table = Table(title=title, title_justify="left", show_header=any(header))
        for h in header:
            table.add_column(h)
        for r in rows:
            styled = list(r)
            if title.startswith("Readiness") and r[1] in ("PASS", "FAIL"):
                styled[1] = f"[green]{r[1]}[/green]" if r[1] == "PASS" else f"[red]{r[1]}[/red]"
            table.add_row(*[str(c) for c in styled])
        console.print(table)
    rd = rep["readiness"]
    if rd.get("note"):
        console.print(f"[dim]{rd['note']}[/dim]")
    rec = rep.get("recommendation")
    if rec:
        colour = {"hero-ready": "green", "phase3": "yellow", "phase2": "red"}[rec["verdict"]]
        console.print(f"Recommendation: [bold {colour}]{rec['verdict']}[/bold {colour}] — {rec['reason']}")
        console.print(f"Next: {rec['next_step']}")
    else:
        console.print("No recommendation (needs a stage with probes and an eval run).")
