"""`python -m dse.report --study NAME`: write the paper's tables, Figure 9 and the Pareto plot of studies."""

from __future__ import annotations

import argparse
import sys

from dse.config import load_target
from dse.report.frame import load_studies
from dse.report.write import FORMATS, write_report
from dse.study import StudyError, why_no_front


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m dse.report",
        description="Regenerate the tables of every trial and configuration, the paper's Tables 1-7, Figure 9 and a "
        "Pareto plot from study DBs into OUT/<study>/ "
        "(several studies are combined into OUT/<a>+<b>/).",
    )
    parser.add_argument("--study", nargs="+", required=True, metavar="NAME", help="the study (or studies) to report")
    parser.add_argument(
        "--storage",
        nargs="+",
        default=[],
        metavar="URL",
        help="storage URL: one for all studies or one per study (default: sqlite:///studies/<name>.db)",
    )
    parser.add_argument("--out", default="reports", help="the folder the report folder goes in (default: reports)")
    parser.add_argument(
        "--format",
        nargs="+",
        default=["markdown"],
        choices=list(FORMATS),
        dest="formats",
        help="table formats to write (default: markdown); index.md and the PNGs are always written",
    )
    parser.add_argument(
        "--target",
        help="mark and plot the front of this target's objectives (conf/target/: paper, "
        "onnx, int8) instead of each study's own",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        target = load_target(args.target) if args.target else None
        data = load_studies(args.study, args.storage)
        folder = write_report(data, args.out, args.formats, target)
    except (StudyError, ValueError, OSError) as e:
        print(f"dse.report: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    complete = int((data.trials["state"] == "COMPLETE").sum()) if len(data.trials) else 0
    print(
        f"report of {data.name} ({complete} complete of {len(data.trials)} trials) in {folder}/: "
        f"index.md (every trial first), trials, configs and table1-7 ({', '.join(args.formats)}), figure9.png, pareto.png"
    )
    if not complete:
        print(f"no complete trial: {why_no_front(data.trials)}")


if __name__ == "__main__":
    main()
