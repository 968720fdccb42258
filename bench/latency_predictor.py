"""Benchmark: how well the latency predictor (`dse.predict`) fitted on a kit's calibration set predicts
architectures the kit's runner timed but the predictor never saw, against naive predictors, on this machine.

What it measures, on this machine's CPU standing in for the board:
- the kit: `--calibration` (60) and `--held-out` (30) distinct architectures drawn from the `open` space's model
  knobs (stage counts, width 0.125-2.0 log-uniform, ELU or ReLU) on CIFAR-10's shape (3x32x32, 10 classes), with
  different seeds; its wall time to write (fp32 + int8 ONNX of each, `dse.kit.write_kit`);
- the run: the shipped `latency_runner.py` with its defaults (60 timed runs per graph over 3 interleaved rounds, a
  fresh process per graph per round, one intra-op thread), started with `--python` (e.g. a fresh venv holding only
  numpy and onnxruntime), and its wall time;
- the predictor: fitted on the calibration set per metric (`latency_onnx_ms`: fp32, `latency_int8_ms`: int8), its
  own k-fold held-out error, then the table of predicted vs measured for the held-out architectures; the share
  within +-10 % of the measured figure, the median |error| and Spearman's rank correlation, beside the same fit on
  MACs alone and on params alone (non-negative linear with an intercept);
- the measurement's own repeatability: the same kit run a second time, compared with the first as if it were a
  predictor (no predictor can agree with a measurement better than the measurement agrees with itself), and the
  predictor fitted on and compared with the mean of both runs (half the noise).

    python bench/latency_predictor.py [--calibration 60] [--held-out 30] [--python PY] [--runs 60] [--rounds 3]
                                        [--no-repeat] [--keep DIR]

Found (2026-12-06, AMD EPYC x86, 2 cores shared with another engineer's test suite: load average 2.1-2.9 all
along; ONNX Runtime 1.32, the runner under a fresh venv of numpy + onnxruntime only): the kit of 90 architectures
was written in 112-147 s and run in 155-168 s. Held-out (30 architectures), within +-10 % / median |error| /
Spearman: fp32: dse.predict 37 % / 13.4 % / 0.984, MACs 13 % / 33.6 % / 0.893, params 13 % / 34.6 % / 0.894;
int8: dse.predict 37 % / 11.8 % / 0.933, MACs 7 % / 44.7 % / 0.719, params 7 % / 44.4 % / 0.710. The kit's
second run agreed with its first within +-10 % for only 40 % (fp32) and 50 % (int8) of the held-out graphs
(median |difference| 12.6 % and 11.1 %): on this loaded machine the measurement itself does not repeat to +-10 %,
so the issue's goal (>= 90 % within +-10 %) cannot be judged here; the predictor is as close to a measurement as
a second measurement is, and ranks far better than MACs or params. Rerun it on a quiet machine (or the board).

Found again (2026-12-06, same machine, nothing else running: load average 1.0-1.5 from the bench itself): kit
written in 88 s, run in 130 s. Held-out (30), within +-10 % / median |error| / Spearman: fp32: dse.predict 93 % /
2.9 % / 0.998, MACs 7 % / 32.1 % / 0.898, params 7 % / 34.3 % / 0.890; int8: dse.predict 77 % / 3.7 % / 0.980,
MACs 0 % / 39.0 % / 0.778, params 3 % / 37.9 % / 0.758. The kit's second run agreed with its first within +-10 %
for 67 % (fp32) and 60 % (int8). So the goal holds for fp32 here; int8 misses it (7 of 30 off by more than 10 %,
worst 38.7 %), with the measurement's own repeatability the likely limit.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml
from scipy.stats import spearmanr

from dse.identity import architecture
from dse.kit import sample_architectures, write_kit
from dse.models import ModelConfig, paper_name
from dse.predict import FEATURES, fit, held_out, spec_features, within
from dse.sweep.compose import CONF_DIR
from dse.targets import read_results

METRICS = ("latency_onnx_ms", "latency_int8_ms")
PREDICTORS = {"dse.predict": FEATURES, "MACs": ("macs",), "params": ("params",)}


def _row(metric: str, label: str, table: pd.DataFrame) -> dict:
    """A predictor's figures on a table of measured vs predicted ms."""
    error = (table["predicted"] / table["measured"] - 1).abs()
    return {
        "metric": metric,
        "predictor": label,
        "within ±10 %": f"{100 * within(table):.0f} %",
        "median |error| %": 100 * error.median(),
        "worst |error| %": 100 * error.max(),
        "Spearman": spearmanr(table["measured"], table["predicted"]).statistic,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calibration", type=int, default=60)
    parser.add_argument("--held-out", type=int, default=30)
    parser.add_argument("--python", default=sys.executable, help="the Python that runs the kit's runner")
    parser.add_argument("--runs", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--keep", help="write the kit here and keep it (default: a temporary folder)")
    parser.add_argument(
        "--no-repeat", dest="repeat", action="store_false", help="run the kit once (default: twice, to compare)"
    )
    args = parser.parse_args()
    space = yaml.safe_load((CONF_DIR / "space" / "open.yaml").read_text())
    _, template = architecture(ModelConfig(name="shallow_squeezenext"), (3, 32, 32), 10)
    calibration = sample_architectures(template, space, args.calibration, seed=0)
    test = sample_architectures(template, space, args.held_out, seed=1, exclude=frozenset(calibration))
    with tempfile.TemporaryDirectory() as tmp:
        kit = Path(args.keep or tmp) / "kit"
        began = time.perf_counter()
        write_kit(
            kit, {"calibration": calibration, "held-out": test}, study="bench", definition_sha256=None, force=True
        )
        wrote = time.perf_counter() - began
        command = [args.python, str(kit / "latency_runner.py"), "--runs", str(args.runs), "--rounds", str(args.rounds)]
        began = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        ran = time.perf_counter() - began
        results = read_results(kit / "latency.json", "bench", None)
        if args.repeat:  # the same kit once more: how far the measurement agrees with itself
            subprocess.run([*command, "--out", str(kit / "again.json")], check=True, stdout=subprocess.DEVNULL)
            again = pd.DataFrame(read_results(kit / "again.json", "bench", None)["figures"]).T
    machine = results["machine"]
    print(
        f"kit: {len(calibration)} calibration + {len(test)} held-out architectures of the open space, "
        f"{2 * (len(calibration) + len(test))} graphs: written in {wrote:.0f} s, run in {ran:.0f} s "
        f"({args.runs} runs over {args.rounds} rounds per graph) by {args.python} on {machine['cpu']}, "
        f"{machine['cores']} cores, ONNX Runtime {machine['onnxruntime']}, Python {machine['python']}"
    )
    specs = {**calibration, **test}
    features = pd.DataFrame({k: spec_features(s) for k, s in specs.items()}).T
    measured = pd.DataFrame(results["figures"]).T
    names = {k: paper_name(ModelConfig(**s["model"])) + f" {s['model']['activation']}" for k, s in specs.items()}
    summary, tables = [], {}
    for metric in METRICS:
        for label, columns in PREDICTORS.items():
            fitted = fit(features, measured.loc[list(calibration), metric], metric, columns=columns)
            if label == "dse.predict":
                print(fitted.summary())
            table = held_out(fitted, features, measured.loc[list(test), metric])
            summary.append(_row(metric, label, table))
            tables[metric, label] = table
        if args.repeat:
            first, second = measured[metric].astype(float), again[metric].astype(float)
            table = pd.DataFrame({"measured": first.loc[list(test)], "predicted": second.loc[list(test)]})
            summary.append(_row(metric, "the kit's second run", table))
            both = (first + second) / 2  # half the measurement's noise: what the predictor can be held to
            fitted = fit(features, both.loc[list(calibration)], metric)
            summary.append(
                _row(metric, "dse.predict, vs the mean of both runs", held_out(fitted, features, both.loc[list(test)]))
            )
    rows = pd.DataFrame({"architecture": [names[k] for k in test]}, index=list(test))
    for metric in METRICS:
        mine = tables[metric, "dse.predict"]
        word = metric.removeprefix("latency_").removesuffix("_ms")
        rows[f"{word} measured ms"] = mine["measured"]
        rows[f"{word} predicted ms"] = mine["predicted"]
        rows[f"{word} error %"] = 100 * (mine["predicted"] / mine["measured"] - 1)
    print(f"\nheld-out architectures ({len(test)}), predicted by the fit on the calibration set:")
    print(rows.sort_values(rows.columns[1]).to_markdown(index=False, floatfmt=".3f"))
    print("\nheld-out error by predictor:")
    print(pd.DataFrame(summary).to_markdown(index=False, floatfmt=".3f"))


if __name__ == "__main__":
    main()
