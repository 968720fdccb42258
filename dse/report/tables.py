"""The paper's Tables 1-7 beside our experiments: rows matched by configuration, differences ours - paper (sizes
only where the paper's own sizes agree with each other), and the frames as they are printed (Markdown, LaTeX) or
stored (CSV)."""

from __future__ import annotations

import functools
import math

import pandas as pd

from dse.models import ModelConfig, paper_name, parse_name, resolve_config
from dse.paper import load_paper, size_comparable, size_note
from dse.report.frame import CONFIG, StudyData, clean

__all__ = ["PAPER_TABLES", "targets", "compare", "deployments", "formatted", "notes", "title"]

PAPER_TABLES = ("1", "2", "3", "4", "5", "6")  # Table 7 (deployment) comes from dse.deploy's records
KNOB_COLUMNS = {
    None: (),
    "blocks": ("R",),
    "width": ("W",),
    "dropout": ("p",),
    "blocks_width": ("R", "W"),
    "optimizer": ("optimizer",),
}
MATCHED_ON = {
    "1": "the model (family, stage counts R, width)",
    "2": "the model (family, stage counts R, width)",
    "3": "the width W, on R = 1,1,1,1 (see below)",
    "4": "the model and the dropout p",
    "5": "the model (family, stage counts R, width)",
    "6": "the model and the optimizer",
    "7": "the deployed trial's model",
}
DATASETS = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "fashion_mnist": "Fashion-MNIST"}
NAN = math.nan
NOT_COMPARABLE = "not comparable"


def title(table: str) -> str:
    """'Table 1. <the paper's title> (CIFAR-10)'."""
    paper = load_paper()
    name, dataset = paper["tables"][table]["title"], DATASETS[paper["dataset"][table]]
    return f"Table {table}. {name}" + ("" if dataset in name else f" ({dataset})")


@functools.cache
def targets(table: str) -> tuple[tuple | None, ...]:
    """The CONFIG tuple that reproduces each row of a paper table (None where the name fixes no model)."""
    paper = load_paper()
    return tuple(_target(table, row, paper["dataset"][table]) for row in paper["tables"][table]["rows"])


def _target(table: str, row: dict, dataset: str) -> tuple | None:
    if table == "3":  # the paper's Table 3 mixes depths; we run every width on R = 1 1 1 1 (conf/space/width.yaml)
        cfg = ModelConfig(name="shallow_squeezenext", blocks=[1, 1, 1, 1], width=row["width"])
    else:
        try:
            cfg = parse_name(row["model"], blocks=row.get("blocks"))
        except ValueError:  # e.g. Table 7's "Squeezed CNN (SqueezeNet implementation)"
            return None
    if "dropout" in row:
        cfg.dropout = row["dropout"]
    full = resolve_config(cfg)
    return clean(
        (
            full.name,
            full.blocks,
            full.width,
            full.dropout,
            full.activation,
            full.inplace,
            dataset,
            row.get("optimizer", "sgd"),
        )
    )


def _setting(table: str) -> dict[int, object]:
    """The CONFIG positions every row of a table shares (e.g. Table 4: all but the dropout)."""
    wanted = [t for t in targets(table) if t is not None]
    return {i: wanted[0][i] for i in range(len(CONFIG)) if len({t[i] for t in wanted}) == 1}


def _sort_key(group: dict) -> list:
    return [(v is None, v if v is not None else 0) for v in (*group["config"], *group["budget"])]


def _our_name(config: tuple) -> str:
    family, blocks, width = config[:3]
    return paper_name(ModelConfig(name=family, blocks=list(blocks) if blocks else None, width=width))


def compare(table: str, groups: pd.DataFrame, study_tables: dict[str, list[str]]) -> pd.DataFrame:
    """Paper table `table` beside our experiments (`aggregate`'s rows), one line per paper row and matching
    experiment, in the paper's order; a row nobody ran has n = 0 and no figures of ours (NaN, never 0).
    Then the experiments no paper table has that fit this table's setting, from studies whose space lists it."""
    spec = load_paper()["tables"][table]
    records = groups.to_dict("records")
    lines = []
    for number, (row, want) in enumerate(zip(spec["rows"], targets(table)), 1):
        hits = [g for g in records if want is not None and g["config"] == want]
        lines += [_line(table, number, row, g, want) for g in hits] or [_line(table, number, row, None, want)]
    setting = _setting(table)
    known = {t for other in PAPER_TABLES for t in targets(other)}
    extras = [
        g
        for g in records
        if g["config"] not in known
        and any(table in study_tables.get(s, ()) for s in g["studies"])
        and all(g["config"][i] == v for i, v in setting.items())
    ]
    lines += [_line(table, None, {}, g, g["config"]) for g in sorted(extras, key=_sort_key)]
    frame = pd.DataFrame(lines)
    return frame.astype({"row": "Int64", "n": "int64", "epochs": "Int64", "params": "Int64"})


def _comparable(row: dict) -> bool:
    """Whether our size may be set against the paper row's (`dse.paper.size_comparable`; True off the paper)."""
    return "model" not in row or size_comparable(row["model"])


def _line(table: str, number: int | None, row: dict, group: dict | None, config: tuple) -> dict:
    g = group or {}
    knobs = {"R": ",".join(map(str, config[1] or ())), "W": config[2], "p": config[3], "optimizer": config[7]}
    acc, size, speed = g.get("acc_mean", NAN), g.get("size_mb", NAN), g.get("s_per_epoch_mean", NAN)
    return {
        "table": table,
        "row": number,
        "paper_model": row.get("model"),
        **{k: knobs[k] for k in KNOB_COLUMNS[load_paper()["tables"][table]["knob"]]},
        "our_model": g.get("model") or _our_name(config),
        "n": g.get("n", 0),
        "seeds": " ".join(map(str, g.get("seeds", []))),
        "epochs": g.get("epochs"),
        "train_images": g.get("train_images"),
        "paper_acc": row.get("acc", NAN),
        "acc_mean": acc,
        "acc_std": g.get("acc_std", NAN),
        "acc_diff": acc - row.get("acc", NAN),
        "paper_size_mb": row.get("size_mb", NAN),
        "size_mb": size,
        "size_diff": size - row.get("size_mb", NAN) if _comparable(row) else NAN,
        "size_comparable": _comparable(row),
        "paper_s_per_epoch": row.get("speed_s", NAN),
        "s_per_epoch_mean": speed,
        "s_per_epoch_std": g.get("s_per_epoch_std", NAN),
        "s_per_epoch_diff": speed - row.get("speed_s", NAN),
        "val_acc_mean": g.get("val_mean", NAN),
        "val_acc_std": g.get("val_std", NAN),
        "params": g.get("params"),
        "mmacs": g.get("macs", NAN) / 1e6,
        "latency_ms": g.get("latency_ms", NAN),
        "int8_mb": g.get("int8_mb", NAN),
        "device": g.get("device", ""),
        "studies": " ".join(g.get("studies", [])),
        "note": row.get("note", ""),
    }


def deployments(data: StudyData, done: pd.DataFrame) -> pd.DataFrame:
    """Table 7: the paper's Bluebox2.0 rows beside the bundles `dse.deploy` recorded as study user attributes
    `deploy:<trial>`, matched by the deployed trial's configuration; bundles of other models follow."""
    configs = {(s, int(n)): c for s, n, c in zip(done["study"], done["number"], done["config"])}
    records = sorted(
        (
            {**rec, "study": study, "config": configs.get((study, int(rec["trial"])))}
            for study, attrs in data.attrs.items()
            for key, rec in attrs.items()
            if key.startswith("deploy:") and isinstance(rec, dict)
        ),
        key=lambda r: (r["study"], int(r["trial"])),
    )
    lines, used = [], set()
    for number, (row, want) in enumerate(zip(load_paper()["tables"]["7"]["rows"], targets("7")), 1):
        hits = [r for r in records if want is not None and r["config"] == want]
        used.update((r["study"], r["trial"]) for r in hits)
        lines += [_deploy_line(number, row, r) for r in hits] or [_deploy_line(number, row, None)]
    lines += [_deploy_line(None, {}, r) for r in records if (r["study"], r["trial"]) not in used]
    return pd.DataFrame(lines).astype({"row": "Int64", "trial": "Int64"})


def _deploy_line(number: int | None, row: dict, rec: dict | None) -> dict:
    r = rec or {}
    pct = lambda key: 100 * r[key] if r.get(key) is not None else NAN  # noqa: E731  (fractions -> %)
    mb = lambda key: r[key] / 1e6 if r.get(key) is not None else NAN  # noqa: E731
    return {
        "table": "7",
        "row": number,
        "paper_model": row.get("model"),
        "paper_acc": row.get("acc", NAN),
        "paper_size_mb": row.get("size_mb", NAN),
        "paper_s_per_epoch": row.get("speed_s", NAN),
        "study": r.get("study", ""),
        "trial": r.get("trial"),
        "our_model": r.get("paper_name", ""),
        "fp32_acc": pct("fp32_acc"),
        "int8_acc": pct("int8_acc"),
        "acc_diff": pct("fp32_acc") - row.get("acc", NAN),
        "onnx_fp32_mb": mb("onnx_fp32_bytes"),
        "onnx_int8_mb": mb("onnx_int8_bytes"),
        "size_diff": mb("onnx_fp32_bytes") - row.get("size_mb", NAN) if _comparable(row) else NAN,
        "size_comparable": _comparable(row),
        "latency_fp32_ms": r.get("latency_fp32_ms", NAN),
        "latency_int8_ms": r.get("latency_int8_ms", NAN),
        "latency_how": r.get("latency_how", ""),
        "bundle": r.get("bundle", ""),
        "note": row.get("note", ""),
    }


# ---------------------------------------------------------------- printing


def _fmt(value, spec: str) -> str:
    return (
        "—"
        if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))
        else format(value, spec)
    )


def _text(value, default: str = "—") -> str:
    return default if value is None or value == "" or (isinstance(value, float) and math.isnan(value)) else str(value)


def _pm(mean: float, std: float, digits: int) -> str:
    """'82.47 ± 0.31' ('82.47' for one run)."""
    return _fmt(mean, f".{digits}f") + ("" if math.isnan(std) else f" ± {std:.{digits}f}")


def _budget(lines: pd.DataFrame) -> str:
    """'column epochs; 2,000 training images per epoch' (those of the rows we ran)."""
    counts = sorted({int(n) for n in lines["train_images"].dropna()})
    return "column epochs" + (f"; {' or '.join(f'{n:,}' for n in counts)} training images per epoch" if counts else "")


def devices(lines: pd.DataFrame) -> str:
    """The devices our s/epoch was measured on, e.g. 'cpu'."""
    return ", ".join(sorted({d for d in lines.get("device", []) if d})) or "our device"


def formatted(lines: pd.DataFrame, table: str) -> pd.DataFrame:
    """The printed table: paper and ours side by side, ours as mean ± std, a row not run as 'not run'."""
    if table == "7":
        return _formatted_deploy(lines)
    knobs = KNOB_COLUMNS[load_paper()["tables"][table]["knob"]]
    out = []
    for r in lines.to_dict("records"):
        ran = r["n"] > 0
        out.append(
            {
                "paper model": _text(r["paper_model"], "(not in the paper)"),
                **{k: _fmt(r[k], "g") if k in ("W", "p") else r[k] for k in knobs},
                "our model": r["our_model"],
                "n": str(r["n"]),
                "epochs": _fmt(r["epochs"], "d"),
                "acc % paper": _fmt(r["paper_acc"], "g"),
                "acc % ours": _pm(r["acc_mean"], r["acc_std"], 2) if ran else "not run",
                "Δ acc": _fmt(r["acc_diff"], "+.2f"),
                "MB paper": _fmt(r["paper_size_mb"], "g"),
                "MB ours": _fmt(r["size_mb"], ".3f"),
                "Δ MB": _fmt(r["size_diff"], "+.3f") if r["size_comparable"] else NOT_COMPARABLE,
                "s/epoch paper (RTX 2080 Ti)": _fmt(r["paper_s_per_epoch"], "g"),
                f"s/epoch ours ({devices(lines)})": _pm(r["s_per_epoch_mean"], r["s_per_epoch_std"], 2) if ran else "—",
                "Δ s/epoch": _fmt(r["s_per_epoch_diff"], "+.2f"),
                "params": _fmt(r["params"], ","),
                "MMACs": _fmt(r["mmacs"], ".1f"),
                "latency ms": _fmt(r["latency_ms"], ".2f"),
                "int8 MB": _fmt(r["int8_mb"], ".3f"),
            }
        )
    return pd.DataFrame(out)


def _formatted_deploy(lines: pd.DataFrame) -> pd.DataFrame:
    out = []
    for r in lines.to_dict("records"):
        ran = r["trial"] is not pd.NA and r["trial"] is not None
        out.append(
            {
                "paper model": _text(r["paper_model"], "(not in the paper)"),
                "acc % paper": _fmt(r["paper_acc"], "g"),
                "MB paper": _fmt(r["paper_size_mb"], "g"),
                "s/epoch paper": _fmt(r["paper_s_per_epoch"], "g"),
                "our trial": f"{r['study']} #{r['trial']}" if ran else "—",
                "our model": _text(r["our_model"]),
                "fp32 acc %": _fmt(r["fp32_acc"], ".2f") if ran else "not run",
                "int8 acc %": _fmt(r["int8_acc"], ".2f"),
                "Δ acc (fp32)": _fmt(r["acc_diff"], "+.2f"),
                "ONNX fp32 MB": _fmt(r["onnx_fp32_mb"], ".3f"),
                "ONNX int8 MB": _fmt(r["onnx_int8_mb"], ".3f"),
                "Δ MB (ONNX fp32 − paper checkpoint)": _fmt(r["size_diff"], "+.3f")
                if r["size_comparable"]
                else NOT_COMPARABLE,
                "fp32 ms": _fmt(r["latency_fp32_ms"], ".2f"),
                "int8 ms": _fmt(r["latency_int8_ms"], ".2f"),
                "latency measured": _text(r["latency_how"]),
                "bundle": _text(r["bundle"]),
            }
        )
    return pd.DataFrame(out)


def notes(lines: pd.DataFrame, table: str) -> list[str]:
    """What the reader needs to read the table: units, how rows were matched, what is missing."""
    paper_rows = lines["row"].dropna().nunique()
    if table == "7":
        ran = lines["trial"].notna()
        out = [
            "Ours: the bundles `dse.deploy` exported (study user attributes `deploy:<trial>`), matched to the paper's "
            "rows by the deployed trial's model; accuracy on the test split, sizes of the ONNX files in MB (10^6 bytes), "
            "latency as recorded (column 'latency measured'). The paper's figures are from the NXP Bluebox2.0; its "
            "'model speed' is seconds per training epoch on an RTX 2080 Ti, not an inference latency.",
            "Δ = ours (fp32) − paper.",
        ]
        if not ran.any():
            out.insert(
                0, "**Not yet run**: no deployment bundle is recorded on these studies (run `python -m dse.deploy`)."
            )
        out.append(
            "The paper does not say which SqueezeNet its 'Squeezed CNN' is, so no trial of ours matches that row."
        )
    else:
        ran = lines["n"] > 0
        dataset = DATASETS[load_paper()["dataset"][table]]
        out = [
            f"Rows are matched to our trials by {MATCHED_ON[table]}, everything else at the paper's setting "
            f"({dataset}, dropout 0.3, ELU in place, SGD with Nesterov momentum unless the table varies it).",
            "acc %: our test-split accuracy, mean ± sample standard deviation (ddof = 1) over the n seeds (the paper: "
            "mean of 3 runs); MB: fp32 `state_dict` file in 10^6 bytes; Δ = ours − paper.",
            f"s/epoch: the paper's is seconds per training epoch on an RTX 2080 Ti with full CIFAR; ours is seconds per "
            f"training epoch on {devices(lines)} at our budget ({_budget(lines)}), so Δ s/epoch "
            "compares different machines and possibly different epoch sizes.",
            "Our extra columns: params, MMACs (millions of multiply-accumulates per image), batch-1 CPU latency "
            "(ms, mean over seeds), int8 MB (an estimate).",
        ]
        if table == "3":
            out.insert(
                1,
                "The paper's Table 3 mixes depths (12-0.4x, 14-0.5x, 07-0.7x, 12-1.0x sit among 06 models) and "
                "does not give their R. We run every width on R = 1,1,1,1 (`conf/space/width.yaml`) and set each "
                "paper row beside our R = 1,1,1,1 model of the same width: compare 'paper model' with 'our model'.",
            )
    run_rows = lines.loc[ran & lines["row"].notna(), "row"].nunique()
    out.append(f"Paper rows with figures of ours: {run_rows} of {paper_rows}; the others show 'not run' (never 0).")
    extra = lines["row"].isna().sum()
    if extra:
        out.append(f"{extra} line(s) after the paper's rows: experiments of ours the paper does not report.")
    if not lines["size_comparable"].all():
        out.append(size_note([table]))
    out += sorted({f"Paper row {r['row']}: {r['note']}." for r in lines.to_dict("records") if r["note"]})
    return out
