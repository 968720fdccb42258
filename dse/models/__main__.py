"""`python -m dse.models`: a table of models with every measurement, beside the paper's published sizes (compared
only where the paper's sizes of a family agree with each other, with one line saying why not elsewhere)."""

from __future__ import annotations

import argparse
import sys

import pandas as pd
from tqdm import tqdm

from dse.measure import profile
from dse.models import build_model, list_models, paper_name, parse_name, resolve_config
from dse.models.names import candidate_blocks, config_from_name
from dse.paper import TABLES, paper_table, size_comparable, size_note

CLASSES = {"cifar10": 10, "cifar100": 100}
NOT_COMPARABLE = "not comparable"


def paper_rows(tables: list[str]) -> list[dict]:
    """The model rows of the paper's tables, each with the config it parses to (or why it cannot)."""
    rows = []
    for table in tables:
        for _, row in paper_table(table).iterrows():
            base = {
                "table": table,
                "model": row["model"],
                "paper_mb": row["size_mb"],
                "num_classes": CLASSES[row["dataset"]],
            }
            blocks = row.get("blocks") if isinstance(row.get("blocks"), list) else None
            try:
                cfg = parse_name(row["model"], blocks=blocks)
            except ValueError as error:
                rows += _candidates(base, row["model"], error)
                continue
            if isinstance(row.get("dropout"), float):
                cfg.dropout = row["dropout"]
            rows.append({**base, "cfg": cfg})
    return rows


def _candidates(base: dict, name: str, error: ValueError) -> list[dict]:
    """An ambiguous paper name: one row per stage counts the paper uses for that depth, else a note."""
    options = candidate_blocks(name)
    if not options:
        return [{**base, "note": str(error)}]
    note = "R not stated for this row: one of the paper's R for this depth"
    return [{**base, "cfg": parse_name(name, blocks=b), "note": note} for b in options]


def _diff(ours_mb: float, paper_mb: float, model: str) -> float | str:
    """Ours vs the paper in %, or 'not comparable' where the paper's sizes of the model's family contradict
    each other (`dse.paper.size_note` says how)."""
    return round(100 * (ours_mb / paper_mb - 1), 1) if size_comparable(model) else NOT_COMPARABLE


def measure_rows(rows: list[dict], *, in_channels: int, size: int, threads: int, repeats: int) -> pd.DataFrame:
    out = []
    for row in tqdm(rows, desc="measuring", unit="model", disable=not sys.stderr.isatty()):
        cfg = row.get("cfg")
        record = {k: v for k, v in row.items() if k not in ("cfg", "num_classes")}
        if cfg is not None:
            full = resolve_config(cfg)
            model = build_model(cfg, num_classes=row["num_classes"], in_channels=in_channels)
            p = profile(model, (in_channels, size, size), threads=threads, repeats=repeats)
            record.update(
                ours=paper_name(cfg),
                R=" ".join(map(str, full.blocks)) if full.blocks else "",
                classes=row["num_classes"],
                params=p.params,
                size_mb=round(p.size_mb, 3),
                int8_mb=round(p.int8_mb, 3),
                mmacs=round(p.macs / 1e6, 2),
                latency_ms=round(p.latency_ms, 2),
                latency_iqr_ms=round(p.latency_iqr_ms, 2),
                threads=p.threads,
            )
            if "paper_mb" in row:
                record["diff_%"] = _diff(p.size_mb, row["paper_mb"], row["model"])
        out.append(record)
    frame = pd.DataFrame(out).convert_dtypes()
    if "note" in frame:
        frame["note"] = frame["note"].fillna("")
    first = [c for c in ("table", "model", "ours", "R", "classes", "paper_mb", "size_mb", "diff_%") if c in frame]
    return frame[first + [c for c in frame.columns if c not in first]]


def parser() -> argparse.ArgumentParser:
    """The command line's options."""
    parser = argparse.ArgumentParser(
        prog="python -m dse.models",
        description="Measure models (params, fp32 state_dict size in MB = 10^6 bytes, int8 estimate, MACs, "
        "batch-1 CPU latency). With no names: the paper's Table 1 beside its published sizes.",
    )
    parser.add_argument("names", nargs="*", help="registry names or paper names, e.g. 'Shallow SqueezeNext-06-0.4x'")
    parser.add_argument(
        "--tables",
        nargs="+",
        default=None,
        choices=TABLES,
        metavar="N",
        help="paper tables whose rows to measure (default 1)",
    )
    parser.add_argument("--list", action="store_true", help="list the registered models and exit")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--in-channels", type=int, default=3)
    parser.add_argument("--size", type=int, default=32, help="input height and width")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for the latency runs")
    parser.add_argument("--repeats", type=int, default=50, help="timed latency runs per model")
    parser.add_argument("--format", choices=("markdown", "csv"), default="markdown")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.list:
        print("\n".join(list_models()))
        return 0
    tables = args.tables or ([] if args.names else ["1"])
    try:
        rows = [{"model": n, "cfg": config_from_name(n), "num_classes": args.num_classes} for n in args.names]
        rows += paper_rows(tables)
        frame = measure_rows(
            rows, in_channels=args.in_channels, size=args.size, threads=args.threads, repeats=args.repeats
        )
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(frame.to_markdown(index=False) if args.format == "markdown" else frame.to_csv(index=False), end="\n")
    if "diff_%" in frame and frame["diff_%"].eq(NOT_COMPARABLE).any():  # under a CSV, on stderr: stdout stays CSV
        print(size_note(tables), file=sys.stdout if args.format == "markdown" else sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
