"""`python -m dse.deploy list|export|verify|measure|latency-kit|import-latency`: the Pareto front, bundles for the
board, their check, latency kits and their results."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import optuna

from dse.checkpoint import CheckpointError
from dse.config import load_target
from dse.data import DataError
from dse.deploy.export import export_front, export_trial
from dse.deploy.front import PICKS, DeployError, filter_front, front_frame, pick
from dse.deploy.kit import CALIBRATION, import_results, load_space, write_study_kit
from dse.deploy.onnx import ExportSettings, measure_shape
from dse.deploy.verify import verify_bundle
from dse.study import StudyError, default_storage, load_study, trials_frame, why_no_front

FILTERS = ("max_size_kb", "max_latency_ms", "min_accuracy")


def _study(args) -> tuple[optuna.Study, str]:
    storage = args.storage or default_storage(args.study)
    return load_study(args.study, storage), storage


def _filters(args) -> dict:
    return {k: getattr(args, k) for k in FILTERS if getattr(args, k) is not None}


def _objectives(study: optuna.Study, args) -> list[str]:
    """The front's objectives: those of `--target` (conf/target/), else the study's own."""
    target = getattr(args, "target", None)
    return load_target(target).objectives if target else list(study.metric_names or [])


def _front(study: optuna.Study, args):
    """The study's front within the filters; a study without a COMPLETE trial is refused, saying why it has none."""
    front = front_frame(study, _objectives(study, args) or None)
    if front.empty:
        why = why_no_front(trials_frame(study))
        then = "" if why.startswith("all ") else "; run or finish its sweep first"
        raise DeployError(f"study {study.study_name!r} has no COMPLETE trial, so no Pareto front: {why}{then}")
    return filter_front(front, **_filters(args))


def cmd_list(args) -> int:
    study, _ = _study(args)
    front = _front(study, args)
    _print_front(
        study, front, args.format, ", ".join(f"{k}={v:g}" for k, v in _filters(args).items()), _objectives(study, args)
    )
    return 0


def _print_front(
    study: optuna.Study, front, fmt: str = "markdown", limits: str = "", objectives: list[str] | None = None
) -> None:
    """The front as a table, then what to trust of its latencies."""
    percent = [c for c in front.columns if c.startswith(("val_acc", "test_acc"))]
    shown = front.assign(**{c: 100 * front[c] for c in percent}).rename(columns={c: f"{c}_%" for c in percent})
    complete = sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.get_trials(deepcopy=False))
    print(
        f"Pareto front of study {study.study_name!r} ({', '.join(objectives or study.metric_names or [])}): "
        f"{len(front)} model(s) of {complete} COMPLETE trial(s){'; within ' + limits if limits else ''}. size_kb: fp32 "
        "state_dict in 10^3 bytes; latency_ms: PyTorch batch-1 CPU latency of the architecture, latency_iqr_ms its "
        "spread; *_onnx, *_int8, onnx_kb, int8_kb, latency_onnx_ms, latency_int8_ms: the ONNX files that ship, in "
        "ONNX Runtime (what the board runs; docs/deploy.md)."
    )
    print(shown.to_csv(index=False) if fmt == "csv" else shown.to_markdown(index=False, floatfmt=".3f") + "\n", end="")
    for line in latency_warnings(study, front):
        print(line, file=sys.stderr)


def latency_warnings(study: optuna.Study, front) -> list[str]:
    """Lines that say which of the front's latencies not to trust, and how to re-measure them."""
    out = []
    loaded = [int(n) for n in front.loc[front["under_load"], "trial"]]
    if loaded:
        out.append(
            f"warning: the latency of trial(s) {', '.join(map(str, loaded))} was measured under load; re-measure "
            f"the front in one sitting: python -m dse.deploy measure --study {study.study_name} --front"
        )
    for column in [c for c in front.columns if c.endswith("_predicted")]:
        guessed = [int(n) for n in front.loc[front[column].astype(bool), "trial"]]
        if guessed:
            name = column.removesuffix("_predicted")
            out.append(
                f"note: {name} of trial(s) {', '.join(map(str, guessed))} is predicted ({column} True), not measured; "
                f"measure the front there: python -m dse.deploy latency-kit --study {study.study_name} --front, run "
                f"it, then import-latency --target {name.partition('@')[2]}"
            )
    keyed = {t.number for t in study.get_trials(deepcopy=False) if t.user_attrs.get("latency_key")}
    old = [int(n) for n in front["trial"] if int(n) not in keyed]
    if old:
        out.append(
            f"warning: trial(s) {', '.join(map(str, old))} measured their own latency while other workers "
            "trained (a study of an older dse): compare them with care; `export` measures a bundle's latency "
            "in one sitting"
        )
    return out


def _settings(args) -> ExportSettings:
    return ExportSettings(
        threads=args.threads,
        warmup=args.warmup,
        runs=args.runs,
        atol=args.atol,
        calibration_images=args.calibration_images,
        check_images=args.check_images,
    )


def _report(record: dict) -> None:
    meta = json.loads((Path(record["bundle"]) / "meta.json").read_text())
    m = meta["metrics"]
    print(
        f"trial {record['trial']} {record['paper_name']} -> {record['bundle']} (+ .tar.gz)\n"
        f"  ONNX Runtime vs PyTorch: max |logit diff| {m['onnx_max_abs_diff']:.2e} on {m['onnx_check_images']} test images\n"
        f"  test accuracy: fp32 {100 * m['fp32_acc']:.2f} %, int8 {100 * m['int8_acc']:.2f} % "
        f"(int8 top-1 agrees with fp32 on {100 * m['int8_agreement']:.2f} % of {m['test_images']} images)\n"
        f"  ONNX size: fp32 {m['onnx_fp32_bytes']:,} bytes, int8 {m['onnx_int8_bytes']:,} bytes\n"
        f"  latency: fp32 {m['latency_fp32_ms']:.3f} ms, int8 {m['latency_int8_ms']:.3f} ms ({m['latency_how']})"
    )


def cmd_export(args) -> int:
    if args.trial is not None and _filters(args):
        flags = ", ".join("--" + k.replace("_", "-") for k in _filters(args))
        raise DeployError(
            f"{flags} only filter the front for --pick and --front; --trial {args.trial} exports "
            f"trial {args.trial} as it is"
        )
    study, storage = _study(args)
    kwargs = dict(
        storage=storage, workdir=args.workdir, data_root=args.data_root, settings=_settings(args), force=args.force
    )
    if args.front:
        numbers = [int(n) for n in _front(study, args)["trial"]]
        records = export_front(study, numbers, args.out, **kwargs)
        for record in records:
            _report(record)
        print(f"index: {Path(records[0]['bundle']).parent / 'index.md'}")
        return 0
    number = args.trial
    if args.pick:
        front = _front(study, args)
        number = pick(front, args.pick)
        print(f"picked trial {number}: the {args.pick} of {len(front)} Pareto-front model(s) within the filters")
    _report(export_trial(study, number, args.out, **kwargs))
    return 0


def cmd_verify(args) -> int:
    meta = verify_bundle(args.folder)
    print(
        f"{args.folder}: {len(meta['files']) + 1} files match SHA256SUMS and meta.json "
        f"({meta['paper_name']}, trial {meta['trial']} of study {meta['study']!r})"
    )
    return 0


def cmd_measure(args) -> int:
    if args.study:
        return measure_front(args)
    if not args.names:
        raise DeployError("measure takes model NAMES, or --study S --front")
    import pandas as pd

    settings = ExportSettings(threads=args.threads, warmup=args.warmup, runs=args.runs)
    rows = [
        measure_shape(
            name, num_classes=args.num_classes, in_channels=args.in_channels, size=args.size, settings=settings
        )
        for name in args.names
    ]
    how = rows[0].pop("latency_how")
    for row in rows[1:]:
        row.pop("latency_how")
    print(
        f"Freshly initialised models (seed 0, untrained: no accuracy), {args.in_channels}x{args.size}x{args.size} "
        f"input, {args.num_classes} classes. *_bytes: ONNX file; *_weight_bytes: its initializers; latency {how}."
    )
    print(pd.DataFrame(rows).to_markdown(index=False, floatfmt=".3f"))
    return 0


def measure_front(args) -> int:
    """Re-measure the PyTorch batch-1 latency of the front's architectures in one sitting, store it on the study
    (every trial of an architecture reads it), and print the front again."""
    if not args.front or args.names:
        raise DeployError(
            "with --study, measure takes --front (and no model names): it re-measures the front's architectures"
        )
    from dse.latency import build, ensure

    study, _ = _study(args)
    front = _front(study, args)
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    keys = {trials[int(n)].user_attrs.get("latency_key") for n in front["trial"]}
    if None in keys:
        raise DeployError(
            f"study {study.study_name!r} predates latency per architecture (its trials carry no "
            "latency_key), so its figures cannot be re-measured; `export` measures a bundle's latency"
        )
    specs = {k: json.loads(k) for k in keys}
    figures = ensure(
        study,
        {k: (lambda spec=spec: build(spec)) for k, spec in specs.items()},
        "python -m dse.deploy measure --front: one sitting, training on this machine paused",
        remeasure=True,
        ort=True,
        threads=args.threads,
    )
    loaded = sum(f["under_load"] for f in figures.values())
    print(
        f"re-measured {len(figures)} architecture(s) of the front in one sitting"
        + (f"; {loaded} under load (other processes kept the cores busy): rerun on a quiet machine" if loaded else "")
    )
    _print_front(study, _front(study, args))
    return 0


def cmd_latency_kit(args) -> int:
    study, _ = _study(args)
    out = Path(args.out or f"kits/{study.study_name}{'-front' if args.front else ''}")
    which = {"calibration": args.calibration}
    if args.space:
        which["space"] = load_space(args.space)
    if args.front:
        which = {"front": [int(n) for n in _front(study, args)["trial"]]}
    manifest = write_study_kit(study, out, force=args.force, **which)
    sets: dict[str, set] = {}
    for g in manifest["graphs"]:
        sets.setdefault(g["set"], set()).add(g["architecture"])
    print(
        f"wrote {out}: {len(manifest['graphs'])} ONNX graphs (fp32 and int8) of "
        + ", ".join(f"{len(v)} {k}" for k, v in sets.items())
        + f" architecture(s); on the board: python3 latency_runner.py (see {out / 'README.md'})"
    )
    return 0


def cmd_import_latency(args) -> int:
    study, _ = _study(args)
    results, fits = import_results(study, Path(args.file), args.target)
    m = results["machine"]
    print(
        f"stored the latency of {len(results['figures'])} architecture(s) on study {study.study_name!r} for target "
        f"{args.target!r} (measured on {m.get('cpu')}, {m.get('cores')} cores, ONNX Runtime {m.get('onnxruntime')})"
    )
    if results["missing"]:
        shown = ", ".join(results["missing"][:10]) + (" ..." if len(results["missing"]) > 10 else "")
        print(f"missing: {len(results['missing'])} graph(s) not (fully) timed: {shown}; run the kit again to finish")
    for fitted in fits:
        print(f"fitted the {args.target} predictor of the architectures no kit timed; {fitted.summary()}")
    return 0


def _add_study(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--study", required=required, help="study name")
    p.add_argument("--storage", help="study storage URL (default sqlite:///studies/<study>.db)")


def _add_filters(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-size-kb", type=float, help="largest fp32 state_dict size, in 10^3 bytes")
    p.add_argument("--max-latency-ms", type=float, help="largest batch-1 CPU latency the sweep measured")
    p.add_argument("--min-accuracy", type=float, help="smallest validation accuracy, a fraction (0.8 = 80 %%)")
    p.add_argument(
        "--target",
        help="draw the front of this target's objectives (conf/target/: paper, onnx, int8); default the study's own",
    )


def _add_timing(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads for latency (default 1)")
    p.add_argument("--runs", type=int, default=200, help="timed batch-1 runs per model (default 200)")
    p.add_argument("--warmup", type=int, default=20, help="untimed runs first (default 20)")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="python -m dse.deploy",
        description="The study's Pareto front, deployment "
        "bundles for Bluebox 2.0 / RTMaps (ONNX fp32 + int8), their check, model-shape sizes.",
    )
    sub = top.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help="print the study's Pareto front")
    _add_study(p)
    _add_filters(p)
    p.add_argument("--format", choices=("markdown", "csv"), default="markdown")
    p = sub.add_parser("export", help="write a bundle (folder + .tar.gz) per chosen trial")
    _add_study(p)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--trial", type=int, help="trial number")
    which.add_argument("--pick", choices=list(PICKS), help="one model of the (filtered) front")
    which.add_argument("--front", action="store_true", help="every model of the (filtered) front, with index.md")
    _add_filters(p)
    p.add_argument("--out", help="bundle folder (with --front: the folder of bundles); default bundles/<study>/...")
    p.add_argument("--workdir", help="the study's workdir, if not beside its SQLite DB (holds artifacts/)")
    p.add_argument("--data-root", help="where the trial's dataset lives, if not where it was trained")
    _add_timing(p)
    p.add_argument("--calibration-images", type=int, default=256, help="training images for the int8 ranges")
    p.add_argument("--check-images", type=int, default=256, help="test images for the ONNX-vs-PyTorch check")
    p.add_argument("--atol", type=float, default=1e-4, help="largest allowed ONNX-vs-PyTorch logit difference")
    p.add_argument("--force", action="store_true", help="replace an existing bundle folder and .tar.gz")
    p = sub.add_parser("verify", help="check a bundle's files against their sha256 sums")
    p.add_argument("folder", metavar="BUNDLE", help="a bundle folder, or the .tar.gz of it that export wrote")
    p = sub.add_parser(
        "measure",
        help="ONNX sizes and latencies of untrained model shapes, fp32 and int8; or, "
        "with --study S --front, re-measure the front's PyTorch latencies in one sitting",
    )
    p.add_argument("names", nargs="*", help="registry or paper names, e.g. 'Shallow SqueezeNext-06-0.4x'")
    _add_study(p, required=False)
    p.add_argument(
        "--front",
        action="store_true",
        help="with --study: re-measure the latency of the front's "
        "architectures in one sitting and store it on the study",
    )
    _add_filters(p)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--in-channels", type=int, default=3)
    p.add_argument("--size", type=int, default=32, help="input height and width")
    _add_timing(p)
    p = sub.add_parser("latency-kit", help="write a folder of ONNX graphs and a runner that times them on the board")
    _add_study(p)
    p.add_argument("--space", help="a grid or sampled space of conf/space/ (default: the study's own)")
    p.add_argument(
        "--calibration",
        type=int,
        default=CALIBRATION,
        help=f"sampled spaces: architectures drawn for the predictor to fit on ({CALIBRATION})",
    )
    p.add_argument("--front", action="store_true", help="only the (filtered) front's architectures")
    _add_filters(p)
    p.add_argument("--out", help="kit folder (default kits/<study>[-front])")
    p.add_argument("--force", action="store_true", help="replace an existing kit folder")
    p = sub.add_parser("import-latency", help="store a kit's latency.json on the study, for one target machine")
    p.add_argument("file", metavar="LATENCY_JSON", help="the latency.json the kit's runner wrote")
    p.add_argument("--study", required=True, help="study name")
    p.add_argument("--storage", help="study storage URL (default sqlite:///studies/<study>.db)")
    p.add_argument("--target", required=True, help="the machine the kit ran on: host or bluebox")
    return top


COMMANDS = {
    "list": cmd_list,
    "export": cmd_export,
    "verify": cmd_verify,
    "measure": cmd_measure,
    "latency-kit": cmd_latency_kit,
    "import-latency": cmd_import_latency,
}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return COMMANDS[args.command](args)
    except (DeployError, StudyError, DataError, CheckpointError, ValueError) as e:
        print(f"dse.deploy: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
