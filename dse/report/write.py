"""Write a report folder: our own results first (every trial, every configuration), the paper's tables, each in
every format asked for, Figure 9, the Pareto plot, and index.md with the studies' provenance. The same studies
always give the same files (no clock is read)."""

from __future__ import annotations

import json
import re
import shlex
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pandas as pd

from dse.config import TargetConfig
from dse.paper import load_paper
from dse.report.frame import MEASURED_ALONE, StudyData, aggregate, completed
from dse.report.plots import plot_figure9, plot_pareto
from dse.report.results import configs_table, shown_configs, shown_trials, trials_table
from dse.report.tables import DATASETS, PAPER_TABLES, compare, deployments, devices, formatted, notes, title
from dse.study import why_no_front

__all__ = ["FORMATS", "write_report"]

FORMATS = {"markdown": ".md", "csv": ".csv", "latex": ".tex"}


def write_report(
    data: StudyData,
    out: str | Path = "reports",
    formats: Sequence[str] = ("markdown",),
    target: TargetConfig | None = None,
) -> Path:
    """Write `out/<study>/` (studies joined by '+') and return that folder. With a `target` (conf/target/), the
    fronts (★ and the Pareto plot) are those of its objectives instead of each study's own."""
    if target is not None:
        data = replace(data, objectives={name: target.objectives for name in data.objectives})
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ValueError(f"formats={list(formats)}: allowed: {', '.join(FORMATS)}")
    folder = Path(out) / data.name
    folder.mkdir(parents=True, exist_ok=True)
    done = completed(data.trials)
    groups = aggregate(done)
    objectives = list(dict.fromkeys(m for names in data.objectives.values() for m in names))
    ours = {"trials": trials_table(data), "configs": configs_table(groups, objectives)}
    for stem, table, (shown, same) in (
        ("trials", ours["trials"], shown_trials(ours["trials"])),
        ("configs", ours["configs"], shown_configs(ours["configs"])),
    ):
        write_table(
            folder,
            stem,
            OUR_TITLES[stem],
            table,
            shown,
            [_same_line(same), *our_notes(ours["trials"])],
            formats,
            caption=f"{OUR_TITLES[stem]}. {_same_line(same)}",
        )
    study_tables = {s: [str(t) for t in a.get("tables") or []] for s, a in data.attrs.items()}
    tables = {t: compare(t, groups, study_tables) for t in PAPER_TABLES}
    tables["7"] = deployments(data, done)
    for table, lines in tables.items():
        other = _other_dataset(table, done, formats) if table != "7" else ""
        if other:
            write_line(folder, f"table{table}", title(table), other, lines, formats)
        else:
            write_table(
                folder, f"table{table}", title(table), lines, formatted(lines, table), notes(lines, table), formats
            )
    empty = f"no complete trial: {why_no_front(data.trials)}"
    figure9 = plot_figure9(done, groups, folder / "figure9.png", empty=empty)
    front = plot_pareto(groups, folder / "pareto.png", target, empty=empty)
    (folder / "index.md").write_text(index(data, done, ours, tables, formats, figure9, front))
    return folder


OUR_TITLES = {"trials": "Every trial", "configs": "Every configuration (mean ± std over seeds)"}


def our_notes(trials: pd.DataFrame) -> list[str]:
    """The notes under our own tables: units, how latency was measured (and which trials lack the per-architecture
    figure), what ★ marks."""
    return [
        "val %, test %: validation accuracy (the sweep's objective) and test accuracy after the last epoch run; MB: the "
        "fp32 `state_dict` file in 10^6 bytes; int8 MB: an estimate; MMACs: millions of multiply-accumulates per image.",
        "latency ms: batch-1 CPU inference (PyTorch, 1 thread) of the architecture, measured once per architecture (the "
        "median over rounds of each round's fastest run; IQR ms: the spread between rounds)."
        + _measured_alone(trials)
        + " † measured under load (other processes kept more than a quarter of the cores busy): re-measure the front in "
        f"one sitting with `python -m dse.deploy measure --study {_one(trials['study'], 'STUDY')} --front`.",
        "★: on the Pareto front of the study's objectives (validation accuracy up, size and latency down) among the "
        "complete trials; in the configurations table, among the configurations of a dataset (mean validation accuracy).",
        "As deployed (what the board runs; — where a trial recorded none): ONNX/int8 val %, test %: the fp32 and int8 "
        "ONNX files in ONNX Runtime; ONNX KB, int8 KB: those files in 10^3 bytes; ORT ms, ORT int8 ms: their batch-1 "
        "ONNX Runtime latency, one intra-op thread, once per architecture (the deploy docs say more).",
    ]


def _one(values: pd.Series, placeholder: str) -> str:
    """The one value of `values`, else `placeholder` (a command line's argument to fill in)."""
    found = set(values.dropna())
    return str(found.pop()) if len(found) == 1 else placeholder


def _measured_alone(trials: pd.DataFrame) -> str:
    """' N trial(s) of study S have no figure of their architecture ...' (why, and what they show instead), or ''."""
    alone = trials[trials["latency_how"] == MEASURED_ALONE]
    if alone.empty:
        return ""
    studies = ", ".join(sorted(set(alone["study"])))
    return (
        f" {len(alone)} trial(s) of {studies} have no figure of their architecture: their study stores none (no "
        "study attribute `latency:<architecture>`; it was swept by a dse that did not measure architectures "
        "once), so they show the latency each trial measured itself, the median and IQR of its own runs, taken "
        "while other workers trained and so less comparable."
    )


def _same_line(same: list[str]) -> str:
    return f"Same in every row: {', '.join(same)}." if same else "Every column varies."


def _other_dataset(table: str, done: pd.DataFrame, formats: Sequence[str]) -> str:
    """One line when none of the report's trials ran on the dataset of the paper's table."""
    dataset = load_paper()["dataset"][table]
    ran = sorted(set(done["dataset"].dropna()))
    if done.empty or dataset in ran:
        return ""
    return (
        f"None of these studies ran on {DATASETS[dataset]} (they ran on {', '.join(DATASETS.get(d, d) for d in ran)}), "
        f"so no result of ours belongs beside this table's rows: ours are in the table of every trial "
        f"({', '.join(f'trials{FORMATS[f]}' for f in formats)}); for the paper's figures see its Table {table} "
        "(or `dse/paper.yaml`)."
    )


def write_line(folder: Path, stem: str, heading: str, line: str, data: pd.DataFrame, formats: Sequence[str]) -> None:
    """A paper table on a dataset none of the studies ran: `line` in place of its rows in <stem>.md and <stem>.tex;
    <stem>.csv keeps the paper's figures (n = 0, every figure of ours empty)."""
    if "markdown" in formats:
        (folder / f"{stem}.md").write_text(f"# {heading}\n\n{line}\n")
    if "csv" in formats:
        data.to_csv(folder / f"{stem}.csv", index=False)
    if "latex" in formats:
        (folder / f"{stem}.tex").write_text(f"% {heading}\n{_latex_text(line)}\n")


def _latex_text(text: str) -> str:
    """Plain text as LaTeX: its special characters escaped, `code` in \\texttt."""
    for plain, latex in (
        ("\\", r"\textbackslash{}"),
        ("_", r"\_"),
        ("%", r"\%"),
        ("&", r"\&"),
        ("#", r"\#"),
        ("$", r"\$"),
    ):
        text = text.replace(plain, latex)
    return re.sub(r"`([^`]*)`", r"\\texttt{\1}", text)


def write_table(
    folder: Path,
    stem: str,
    heading: str,
    data: pd.DataFrame,
    shown: pd.DataFrame,
    bullets: list[str],
    formats: Sequence[str],
    *,
    caption: str | None = None,
) -> None:
    """<stem>.md (heading, the shown table, notes), <stem>.csv (`data`: every number, unrounded; NaN = missing)
    and <stem>.tex (the shown table, captioned `caption` or the heading)."""
    if "markdown" in formats:
        text = shown.to_markdown(index=False, disable_numparse=True) if not shown.empty else "(no rows)"
        items = "\n".join(f"- {n}" for n in bullets)
        (folder / f"{stem}.md").write_text(f"# {heading}\n\n{text}\n\n{items}\n")
    if "csv" in formats:
        data.to_csv(folder / f"{stem}.csv", index=False)
    if "latex" in formats:
        tex = shown.to_latex(index=False, escape=True, caption=caption or heading, label=f"tab:{stem}")
        for plain, latex in (("±", r"$\pm$"), ("Δ", r"$\Delta$"), ("—", "--"), ("★", r"$\star$"), ("†", r"$\dagger$")):
            tex = tex.replace(plain, latex)
        (folder / f"{stem}.tex").write_text(tex)


def _counted(values, render=str) -> str:
    counts = Counter(values)
    return "; ".join(f"{render(v)} ({n} trial{'s' if n > 1 else ''})" for v, n in sorted(counts.items())) or "—"


def _versions(text: str) -> str:
    return ", ".join(f"{k} {v}" for k, v in json.loads(text).items())


def _split(text: str) -> str:
    s = json.loads(text)
    return (
        f"{s.get('dataset')}: {s.get('train')} train / {s.get('val')} validation / {s.get('test')} test images, "
        f"split seed {s.get('seed')}, indices sha256 {s.get('indices_sha256')}"
    )


def _studies_table(data: StudyData) -> str:
    rows = []
    for name, url in data.storages.items():
        attrs = data.attrs[name]
        states = Counter(data.trials.loc[data.trials["study"] == name, "state"])
        command = attrs.get("command_line")
        rows.append(
            {
                "study": name,
                "storage": f"`{url}`",
                "space": (attrs.get("space") or {}).get("name", "—"),
                "paper tables": ", ".join(map(str, attrs.get("tables") or [])) or "—",
                "trials": str(sum(states.values())),
                "complete": str(states["COMPLETE"]),
                "pruned": str(states["PRUNED"]),
                "failed": str(states["FAIL"]),
                "running or queued": str(states["RUNNING"] + states["WAITING"]),
                "command line": f"`python -m dse.sweep {shlex.join(command)}`" if isinstance(command, list) else "—",
                "created by": attrs.get("created_by", "—"),
            }
        )
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


def _links(stem: str, formats: Sequence[str]) -> str:
    return ", ".join(f"[{f}]({stem}{FORMATS[f]})" for f in formats)


def _ours(data: StudyData, ours: dict[str, pd.DataFrame], formats: Sequence[str]) -> list[str]:
    """The results section: every trial (inline), then every configuration when some ran with several seeds."""
    trials, configs = ours["trials"], ours["configs"]
    shown, same = shown_trials(trials)
    out = [
        "## Our results",
        "",
        f"### {OUR_TITLES['trials']} ({len(trials)}; {_links('trials', formats)})",
        "",
        _same_line(same),
        "",
        shown.to_markdown(index=False, disable_numparse=True) if len(trials) else "(none yet)",
        "",
    ]
    if (configs["n"] > 1).any():
        shown, same = shown_configs(configs)
        out += [
            f"### {OUR_TITLES['configs']} ({len(configs)}; {_links('configs', formats)})",
            "",
            _same_line(same),
            "",
            shown.to_markdown(index=False, disable_numparse=True),
            "",
        ]
    elif len(configs):
        out += [
            "Every configuration ran with one seed, so this is also the table of configurations "
            f"({_links('configs', formats)}).",
            "",
        ]
    queued = int((data.trials["state"] == "WAITING").sum())
    under = int(trials["latency_under_load"].eq(True).sum())
    out += [f"- {n}" for n in our_notes(trials)]
    out += [f"- How the latencies were measured: {_counted(h for h in trials['latency_how'] if isinstance(h, str))}."]
    out += [f"- {queued} queued trial(s) not started yet are not listed."] if queued else []
    out += [f"- {under} trial(s) have a latency measured under load (†)."] if under else []
    return out + [""]


def _paper_tables(tables: dict[str, pd.DataFrame], done: pd.DataFrame, formats: Sequence[str]) -> list[str]:
    """Links to the paper's tables; one line for the tables on datasets these studies did not run."""
    other = [t for t in PAPER_TABLES if _other_dataset(t, done, formats)]
    lines = [_table_line(t, lines, formats) for t, lines in tables.items() if t not in other]
    if other:
        ran = ", ".join(DATASETS.get(d, d) for d in sorted(set(done["dataset"].dropna())))
        links = ", ".join(f"[Table {t}](table{t}.md)" if "markdown" in formats else f"Table {t}" for t in other)
        names = sorted({DATASETS[load_paper()["dataset"][t]] for t in other})
        lines.insert(
            0,
            f"- {links}: the paper ran these on {' and '.join(names)}; these studies ran on {ran}, so "
            "there is nothing of ours to set beside them (each says so in one line).",
        )
    return lines


def index(
    data: StudyData,
    done: pd.DataFrame,
    ours: dict[str, pd.DataFrame],
    tables: dict[str, pd.DataFrame],
    formats: Sequence[str],
    figure9: list[str],
    front: list[str],
) -> str:
    """index.md: our results first, then the studies, the paper's tables, the figures, pruning, how to read the
    paper's tables, provenance."""
    prov = [p for p in data.trials["provenance"] if isinstance(p, dict)]
    out = [
        f"# Report: {data.name}",
        "",
        "Regenerated from the study DB(s) alone by `python -m dse.report`; the same DBs give the same report.",
        "",
    ]
    if done.empty:
        why = why_no_front(data.trials)
        then = (
            "the pruned trials and why are listed below"
            if why.startswith("all ")
            else "run (or finish) the sweep, then regenerate"
        )
        out += [
            f"**No complete trial**: {why}. The tables list the paper's rows with none of ours ('not run') and the "
            f"figures say so; {then}.",
            "",
        ]
    out += _ours(data, ours, formats)
    out += ["## Studies", "", _studies_table(data), "", "## The paper's tables", ""]
    out += _paper_tables(tables, done, formats)
    out += [
        "",
        "## Figures",
        "",
        "[Figure 9](figure9.png): training and validation accuracy per epoch, from the curves the trials stored.",
        "",
    ]
    out += [f"- {line}" for line in figure9] or ["- no finished trials yet"]
    out += [
        "",
        "![Figure 9](figure9.png)",
        "",
        "[Pareto plot](pareto.png): validation accuracy (the sweep's objective) "
        "vs fp32 model size (or vs the swept knob where every model has one size), colour = batch-1 CPU latency; "
        "the paper's published (test) accuracies overlaid where it has figures for the dataset.",
        "",
    ]
    out += [f"- on the front: {line}" for line in front] or ["- no experiments yet"]
    out += ["", "![Pareto plot](pareto.png)", "", "## Pruned trials", ""] + _pruned(data.trials)
    out += [
        "",
        "## How to read the paper's tables",
        "",
        "- acc %: test-split accuracy of ours, mean ± sample std (ddof = 1) over the n seeds; the paper reports the "
        "mean of 3 runs. Validation accuracy (the sweep's objective) is column val % of our results above"
        + (" and val_acc_mean of the paper tables' CSV files." if "csv" in formats else "."),
        "- A paper row we have not run shows 'not run'"
        + (" (empty in the CSV files, n = 0)" if "csv" in formats else " (n = 0)")
        + ", never 0. Rows after the paper's are experiments of ours the paper does not report.",
        "- MB: the fp32 `state_dict` file in 10^6 bytes, the paper's 'model size'. Model speed: the paper's is "
        f"seconds per training epoch on an RTX 2080 Ti; ours is seconds per training epoch on {devices(done)}.",
        "- Δ = ours − paper.",
        "",
        "## Provenance",
        "",
        f"- git commits: {_counted(p.get('git_commit') or 'unknown' for p in prov)}",
        f"- versions: {_counted((json.dumps(p.get('versions', {})) for p in prov), _versions)}",
        f"- hosts: {_counted(p.get('host') or 'unknown' for p in prov)}",
        f"- devices: {_counted(str(d) for d in done['device'])}",
        f"- data splits: {_counted((json.dumps(s) for s in done['split'] if isinstance(s, dict)), _split)}",
        f"- training budgets (epochs): {_counted(int(e) for e in done['epochs'] if pd.notna(e))}",
        "",
    ]
    return "\n".join(out)
