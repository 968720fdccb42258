"""Write a report folder: every table in each format asked for, Figure 9, the Pareto plot, and index.md
with the studies' provenance. The same studies always give the same files (no clock is read)."""

from __future__ import annotations

import json
import shlex
from collections import Counter
from pathlib import Path
from typing import Sequence

import pandas as pd

from dse.report.frame import StudyData, aggregate, completed
from dse.report.plots import plot_figure9, plot_pareto
from dse.report.tables import PAPER_TABLES, compare, deployments, devices, formatted, notes, title

__all__ = ["FORMATS", "write_report"]

FORMATS = {"markdown": ".md", "csv": ".csv", "latex": ".tex"}


def write_report(data: StudyData, out: str | Path = "reports", formats: Sequence[str] = ("markdown",)) -> Path:
    """Write `out/<study>/` (studies joined by '+') and return that folder."""
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ValueError(f"formats={list(formats)}: allowed: {', '.join(FORMATS)}")
    folder = Path(out) / data.name
    folder.mkdir(parents=True, exist_ok=True)
    done = completed(data.trials)
    groups = aggregate(done)
    study_tables = {s: [str(t) for t in a.get("tables") or []] for s, a in data.attrs.items()}
    tables = {t: compare(t, groups, study_tables) for t in PAPER_TABLES}
    tables["7"] = deployments(data, done)
    for table, lines in tables.items():
        write_table(folder, table, lines, formats)
    figure9 = plot_figure9(done, groups, folder / "figure9.png")
    front = plot_pareto(groups, folder / "pareto.png")
    (folder / "index.md").write_text(index(data, done, tables, formats, figure9, front))
    return folder


def write_table(folder: Path, table: str, lines: pd.DataFrame, formats: Sequence[str]) -> None:
    """tableN.md (title, table, notes), tableN.csv (every number, unrounded; NaN = not run) and tableN.tex."""
    shown = formatted(lines, table)
    if "markdown" in formats:
        text = shown.to_markdown(index=False, disable_numparse=True)
        bullets = "\n".join(f"- {n}" for n in notes(lines, table))
        (folder / f"table{table}.md").write_text(f"# {title(table)}\n\n{text}\n\n{bullets}\n")
    if "csv" in formats:
        lines.to_csv(folder / f"table{table}.csv", index=False)
    if "latex" in formats:
        tex = shown.to_latex(index=False, escape=True, caption=title(table), label=f"tab:table{table}")
        for plain, latex in (("±", r"$\pm$"), ("Δ", r"$\Delta$"), ("—", "--")):
            tex = tex.replace(plain, latex)
        (folder / f"table{table}.tex").write_text(tex)


def _counted(values, render=str) -> str:
    counts = Counter(values)
    return "; ".join(f"{render(v)} ({n} trial{'s' if n > 1 else ''})" for v, n in sorted(counts.items())) or "—"


def _versions(text: str) -> str:
    return ", ".join(f"{k} {v}" for k, v in json.loads(text).items())


def _split(text: str) -> str:
    s = json.loads(text)
    return (f"{s.get('dataset')}: {s.get('train')} train / {s.get('val')} validation / {s.get('test')} test images, "
            f"split seed {s.get('seed')}, indices sha256 {s.get('indices_sha256')}")


def _studies_table(data: StudyData) -> str:
    rows = []
    for name, url in data.storages.items():
        attrs = data.attrs[name]
        states = Counter(data.trials.loc[data.trials["study"] == name, "state"])
        command = attrs.get("command_line")
        rows.append({
            "study": name, "storage": f"`{url}`", "space": (attrs.get("space") or {}).get("name", "—"),
            "paper tables": ", ".join(map(str, attrs.get("tables") or [])) or "—", "trials": str(sum(states.values())),
            "complete": str(states["COMPLETE"]), "pruned": str(states["PRUNED"]), "failed": str(states["FAIL"]),
            "running or queued": str(states["RUNNING"] + states["WAITING"]),
            "command line": f"`python -m dse.sweep {shlex.join(command)}`" if isinstance(command, list) else "—",
            "created by": attrs.get("created_by", "—"),
        })
    return pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True)


def _table_line(table: str, lines: pd.DataFrame, formats: Sequence[str]) -> str:
    others = ", ".join(f"[{f}](table{table}{FORMATS[f]})" for f in formats if f != "markdown")
    link = f"[{title(table)}](table{table}.md)" if "markdown" in formats else title(table)
    if table == "7":
        ran = lines["trial"].notna().sum()
        what = f"{ran} bundle(s)" if ran else "not yet run (no deployment bundles recorded)"
    else:
        paper_rows = lines["row"].dropna().nunique()
        run = lines.loc[(lines["n"] > 0) & lines["row"].notna(), "row"].nunique()
        what = f"{run} of {paper_rows} paper rows run, {lines['row'].isna().sum()} row(s) the paper lacks"
    return f"- {link}: {what}" + (f" ({others})" if others else "")


def _pruned(trials: pd.DataFrame) -> list[str]:
    pruned = trials[trials["state"] == "PRUNED"]
    if pruned.empty:
        return ["No pruned trials."]
    run = [len(c) if isinstance(c, list) else 0 for c in pruned["curves"]]
    planned = pd.to_numeric(pruned["epochs_planned"], errors="coerce")
    saved = int((planned - run).sum(skipna=True))
    reasons = [str(r).split(":")[0] if isinstance(r, str) else "no reason recorded" for r in pruned["pruned_reason"]]
    return [
        f"{len(pruned)} pruned trial(s); epochs saved (planned − run): {saved} of {int(planned.sum(skipna=True))} planned.",
        f"Reasons: {_counted(reasons)}.",
    ]


def index(data: StudyData, done: pd.DataFrame, tables: dict[str, pd.DataFrame], formats: Sequence[str],
          figure9: list[str], front: list[str]) -> str:
    """index.md: the studies, links to every table and figure, pruning, how to read it, provenance."""
    prov = [p for p in data.trials["provenance"] if isinstance(p, dict)]
    out = [f"# Report: {data.name}", "",
           "Regenerated from the study DB(s) alone by `python -m dse.report`; the same DBs give the same report.", ""]
    if done.empty:
        out += ["**No finished trials yet**: the tables list the paper's rows with none of ours ('not run') and the "
                "figures are empty. Run (or finish) the sweep, then regenerate.", ""]
    out += ["## Studies", "", _studies_table(data), "", "## Tables", ""]
    out += [_table_line(t, lines, formats) for t, lines in tables.items()]
    out += ["", "## Figures", "", "[Figure 9](figure9.png): training and validation accuracy per epoch, from the curves "
            "the trials stored.", ""]
    out += [f"- {line}" for line in figure9]
    out += ["", "![Figure 9](figure9.png)", "", "[Pareto plot](pareto.png): validation accuracy (the sweep's objective) "
            "vs fp32 model size, colour = batch-1 CPU latency; the paper's published (test) accuracies overlaid.", ""]
    out += [f"- on the front: {line}" for line in front] or ["- no experiments yet"]
    out += ["", "![Pareto plot](pareto.png)", "", "## Pruned trials", ""] + _pruned(data.trials)
    out += ["", "## How to read the tables", "",
            "- acc %: test-split accuracy of ours, mean ± sample std (ddof = 1) over the n seeds; the paper reports the "
            "mean of 3 runs. Validation accuracy (the sweep's objective) is in the CSV files.",
            "- A paper row we have not run shows 'not run' (empty in the CSV, n = 0), never 0. Rows after the paper's "
            "are experiments of ours the paper does not report.",
            "- MB: the fp32 `state_dict` file in 10^6 bytes, the paper's 'model size'. Model speed: the paper's is "
            f"seconds per training epoch on an RTX 2080 Ti; ours is seconds per training epoch on {devices(done)}.",
            "- Δ = ours − paper.", "", "## Provenance", "",
            f"- git commits: {_counted(p.get('git_commit') or 'unknown' for p in prov)}",
            f"- versions: {_counted((json.dumps(p.get('versions', {})) for p in prov), _versions)}",
            f"- hosts: {_counted(p.get('host') or 'unknown' for p in prov)}",
            f"- devices: {_counted(str(d) for d in done['device'])}",
            f"- data splits: {_counted((json.dumps(s) for s in done['split'] if isinstance(s, dict)), _split)}",
            f"- training budgets (epochs): {_counted(int(e) for e in done['epochs'] if pd.notna(e))}", ""]
    return "\n".join(out)
