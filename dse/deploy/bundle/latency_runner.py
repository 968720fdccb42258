"""Time every ONNX graph of a latency kit on the machine it runs on (the board) and write one latency.json.

What it measures: milliseconds of one ONNX Runtime `session.run` on a random batch-1 input, CPU execution provider,
`--threads` intra-op threads (default 1). Each graph is timed in its own fresh Python process (no cache or allocator
state left by another graph), `--warmup` untimed runs first, then its share of `--runs` timed runs; the graphs take
turns over `--rounds` rounds, in another shuffled order each round (drift spreads over all of them). Every timed run
of a graph is followed by one of the kit's reference graph of the same precision (`kit.json` names it), in the same
process: a machine whose speed drifts (a shared or throttling CPU) slows both alike, so their ratio holds where
either time alone does not. A graph's figure `ms` is the median of its runs' ratios times the reference's median
over the whole run (its latency at the run's typical speed), `iqr_ms` likewise; the plain wall-clock median and IQR
(`wall_ms`, `wall_iqr_ms`) and the thread's CPU time are kept beside them. latency.json also records the CPU model,
core count, Python and ONNX Runtime versions and the load average before every round; it is rewritten after every
timing, so a run that is interrupted resumes where it stopped (run the same command again).

    python latency_runner.py [--kit DIR] [--out latency.json] [--runs 60] [--rounds 6] [--warmup 10] [--threads 1]

Needs Python >= 3.8, numpy and onnxruntime: nothing here imports torch or dse.
"""

import argparse
import datetime
import json
import math
import os
import platform
import random
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)
import predict  # noqa: E402

RESULTS_FORMAT = "dse-latency-results/2"  # /2: figures relative to the kit's reference graph


def _session(path: str, threads: int):
    """A session on one graph and a random batch-1 feed for it."""
    import numpy as np

    sess = predict.cpu_session(path, threads)
    shape = [d if isinstance(d, int) and d > 0 else 1 for d in sess.get_inputs()[0].shape]
    return sess, {sess.get_inputs()[0].name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}


def time_graph(path: str, reference: str, threads: int, warmup: int, runs: int) -> dict:
    """Milliseconds of `runs` timed runs of one graph, each followed by a timed run of the `reference` graph (this
    process's only two graphs); the graph's on the wall clock and on this thread's CPU time too (with one intra-op
    thread ONNX Runtime computes on the calling thread)."""
    (sess, feed), (ref, ref_feed) = _session(path, threads), _session(reference, threads)
    for _ in range(warmup):
        sess.run(None, feed)
        ref.run(None, ref_feed)
    walls, cpus, refs = [], [], []
    for _ in range(runs):
        wall, cpu = time.perf_counter(), time.thread_time()
        sess.run(None, feed)
        cpus.append((time.thread_time() - cpu) * 1e3)
        walls.append((time.perf_counter() - wall) * 1e3)
        wall = time.perf_counter()
        ref.run(None, ref_feed)
        refs.append((time.perf_counter() - wall) * 1e3)
    return {"times_ms": walls, "cpu_times_ms": cpus, "reference_times_ms": refs}


def machine() -> dict:
    import onnxruntime

    return {
        "cpu": predict.cpu_name(),
        "cores": os.cpu_count(),
        "arch": platform.machine(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "hostname": platform.node(),
    }


def load_average() -> list:
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else []


def summarize(rounds: list, reference_ms: float) -> dict:
    """A graph's figures from its rounds so far: the median and IQR of its runs' ratios to the reference's runs,
    in ms at the reference's median `reference_ms`; the plain wall and CPU-time medians; each round's median."""
    ratios = [t / r for x in rounds for t, r in zip(x["times_ms"], x["reference_times_ms"])]
    ratio, ratio_iqr = predict.summarize(ratios)
    wall, wall_iqr = predict.summarize([t for r in rounds for t in r["times_ms"]])
    return {
        "ms": ratio * reference_ms,
        "iqr_ms": ratio_iqr * reference_ms,
        "ratio": ratio,
        "clock": "wall, relative to the reference",
        "wall_ms": wall,
        "wall_iqr_ms": wall_iqr,
        "cpu_ms": predict.summarize([t for r in rounds for t in r["cpu_times_ms"]])[0],
        "runs": len(ratios),
        "round_medians_ms": [predict.summarize(r["times_ms"])[0] for r in rounds],
    }


def update(results: dict) -> None:
    """Recompute every graph's figures: the reference's median per precision moves with each timing."""
    for precision, ref in results["reference"].items():
        graphs = [g for g in results["graphs"].values() if g["precision"] == precision and g["rounds"]]
        times = [t for g in graphs for r in g["rounds"] for t in r["reference_times_ms"]]
        if times:
            ref["ms"], ref["iqr_ms"] = predict.summarize(times)
            for g in graphs:
                g.update(summarize(g["rounds"], ref["ms"]))


def write_atomic(path: str, data: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def start(kit: dict, out: str, settings: dict) -> dict:
    """The results so far: latency.json of an interrupted run of this kit with these settings, else a new one."""
    if os.path.isfile(out):
        with open(out, encoding="utf-8") as f:
            try:
                old = json.load(f)
            except ValueError:
                old = None
        if old and old.get("kit", {}).get("kit") == kit["kit"] and old.get("settings") == settings:
            return old
        if old and not old.get("complete"):
            print("%s is another kit's or settings' partial run: starting afresh" % out, file=sys.stderr)
    return {
        "format": RESULTS_FORMAT,
        "kit": {k: kit[k] for k in ("kit", "study", "definition_sha256", "format")},
        "machine": machine(),
        "settings": settings,
        "reference": {p: {"graph": g} for p, g in sorted(kit["reference"].items())},
        "started_at": datetime.datetime.utcnow().isoformat(timespec="seconds") + "Z",
        "complete": False,
        "graphs": {},
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="latency_runner.py", description=__doc__.split("\n")[0])
    parser.add_argument("--kit", default=HERE, help="kit folder (default: this file's folder)")
    parser.add_argument("--out", help="results file (default KIT/latency.json)")
    parser.add_argument("--runs", type=int, default=60, help="timed runs per graph, over all rounds (default 60)")
    parser.add_argument("--rounds", type=int, default=6, help="interleaved rounds, each a fresh process (default 6)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed runs in each graph's process (default 10)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    parser.add_argument("--graph", help=argparse.SUPPRESS)  # internal: time this one file, print the times
    parser.add_argument("--reference", help=argparse.SUPPRESS)  # internal: the graph each run of --graph is paired with
    args = parser.parse_args(argv)
    if args.runs < 1 or args.rounds < 1 or args.warmup < 0 or args.threads < 1:
        parser.error("--runs, --rounds and --threads must be >= 1 and --warmup >= 0")
    per_round = int(math.ceil(args.runs / float(args.rounds)))
    if args.graph:
        print(json.dumps(time_graph(args.graph, args.reference, args.threads, args.warmup, per_round)))
        return 0
    with open(os.path.join(args.kit, "kit.json"), encoding="utf-8") as f:
        kit = json.load(f)
    out = args.out or os.path.join(args.kit, "latency.json")
    settings = {"runs_per_round": per_round, "rounds": args.rounds, "warmup": args.warmup, "threads": args.threads}
    results = start(kit, out, settings)
    graphs = kit["graphs"]
    files = {g["id"]: os.path.join(args.kit, g["file"]) for g in graphs}
    for g in graphs:  # every graph listed from the start: an interrupted run's file says what it lacks
        results["graphs"].setdefault(
            g["id"], {"architecture": g["architecture"], "precision": g["precision"], "rounds": []}
        )
    began = time.time()
    for r in range(args.rounds):
        # a seeded shuffle per round: no graph is always timed beside the same others, and a resumed run keeps it
        for i, g in enumerate(random.Random(r).sample(graphs, len(graphs))):
            entry = results["graphs"][g["id"]]
            if len(entry["rounds"]) > r:
                continue  # timed before an interruption
            load = load_average()
            reference = files[kit["reference"][g["precision"]]]
            command = [sys.executable, os.path.abspath(__file__), "--graph", files[g["id"]], "--reference", reference]
            command += ["--threads", str(args.threads), "--warmup", str(args.warmup)]
            command += ["--runs", str(per_round), "--rounds", "1"]
            done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
            entry["rounds"].append(dict(json.loads(done.stdout), load_before=load))
            update(results)
            write_atomic(out, results)
            print(
                "round %d/%d graph %d/%d %-12s %9.3f ms  (%.0f s)"
                % (r + 1, args.rounds, i + 1, len(graphs), g["id"], entry["ms"], time.time() - began),
                flush=True,
            )
    results["complete"] = True
    results["finished_at"] = datetime.datetime.utcnow().isoformat(timespec="seconds") + "Z"
    results["load_after"] = load_average()
    write_atomic(out, results)
    print("wrote %s: %d graphs x %d rounds" % (out, len(graphs), args.rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
