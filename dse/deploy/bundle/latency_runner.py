"""Time every ONNX graph of a latency kit on the machine it runs on (the board) and write one latency.json.

What it measures: milliseconds of one ONNX Runtime `session.run` on a random batch-1 input, CPU execution provider,
`--threads` intra-op threads (default 1), on the wall clock (and, with one thread, on the thread's CPU time: where
the two medians disagree by more than 15 %, other processes took the core, and the CPU figure is kept and said). Each graph is timed in its own fresh Python process (no cache or
allocator state left by another graph), `--warmup` untimed runs first, then its share of `--runs` timed runs; the
graphs take turns over `--rounds` rounds (interleaved: drift and bursts of load spread over all of them). A graph's
figure is the median and interquartile range of all its timed runs. latency.json also records the CPU model, core
count, Python and ONNX Runtime versions and the load average before every round; it is rewritten after every
timing, so a run that is interrupted resumes where it stopped (run the same command again).

    python latency_runner.py [--kit DIR] [--out latency.json] [--runs 60] [--rounds 3] [--warmup 10] [--threads 1]

Needs Python >= 3.8, numpy and onnxruntime: nothing here imports torch or dse.
"""

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)
import predict  # noqa: E402

RESULTS_FORMAT = "dse-latency-results/1"
AGREE = 0.15  # the wall figure stands while it exceeds the CPU-time figure by at most this share


def time_graph(path: str, threads: int, warmup: int, runs: int) -> dict:
    """Milliseconds of `runs` timed runs of one graph on a random batch-1 input (this process's only graph), on the
    wall clock and on this thread's CPU time (with one intra-op thread ONNX Runtime computes on the calling thread,
    so the CPU figure leaves out the time other processes took the core)."""
    import numpy as np

    sess = predict.cpu_session(path, threads)
    shape = [d if isinstance(d, int) and d > 0 else 1 for d in sess.get_inputs()[0].shape]
    feed = {sess.get_inputs()[0].name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
    for _ in range(warmup):
        sess.run(None, feed)
    walls, cpus = [], []
    for _ in range(runs):
        wall, cpu = time.perf_counter(), time.thread_time()
        sess.run(None, feed)
        cpus.append((time.thread_time() - cpu) * 1e3)
        walls.append((time.perf_counter() - wall) * 1e3)
    return {"times_ms": walls, "cpu_times_ms": cpus}


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


def summarize(rounds: list, threads: int) -> dict:
    """A graph's figure from its rounds so far: median and IQR of every timed run on the wall clock, and each
    round's median. With one thread, where the wall median exceeds the CPU-time median by more than AGREE, other
    processes took the core meanwhile: the figure is the CPU time's (`clock` says which; dse.measure's rule)."""
    wall = predict.summarize([t for r in rounds for t in r["times_ms"]])
    cpu = predict.summarize([t for r in rounds for t in r["cpu_times_ms"]])
    agree = threads > 1 or wall[0] <= cpu[0] * (1 + AGREE)
    median, iqr = wall if agree else cpu
    key = "times_ms" if agree else "cpu_times_ms"
    return {
        "ms": median,
        "iqr_ms": iqr,
        "clock": "wall" if agree else "thread cpu time",
        "wall_ms": wall[0],
        "cpu_ms": cpu[0],
        "runs": sum(len(r["times_ms"]) for r in rounds),
        "round_medians_ms": [predict.summarize(r[key])[0] for r in rounds],
    }


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
        "started_at": datetime.datetime.utcnow().isoformat(timespec="seconds") + "Z",
        "complete": False,
        "graphs": {},
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="latency_runner.py", description=__doc__.split("\n")[0])
    parser.add_argument("--kit", default=HERE, help="kit folder (default: this file's folder)")
    parser.add_argument("--out", help="results file (default KIT/latency.json)")
    parser.add_argument("--runs", type=int, default=60, help="timed runs per graph, over all rounds (default 60)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed runs in each graph's process (default 10)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    parser.add_argument("--graph", help=argparse.SUPPRESS)  # internal: time this one file, print the times
    args = parser.parse_args(argv)
    if args.runs < 1 or args.rounds < 1 or args.warmup < 0 or args.threads < 1:
        parser.error("--runs, --rounds and --threads must be >= 1 and --warmup >= 0")
    per_round = int(math.ceil(args.runs / float(args.rounds)))
    if args.graph:
        print(json.dumps(time_graph(args.graph, args.threads, args.warmup, per_round)))
        return 0
    with open(os.path.join(args.kit, "kit.json"), encoding="utf-8") as f:
        kit = json.load(f)
    out = args.out or os.path.join(args.kit, "latency.json")
    settings = {"runs_per_round": per_round, "rounds": args.rounds, "warmup": args.warmup, "threads": args.threads}
    results = start(kit, out, settings)
    graphs = kit["graphs"]
    for g in graphs:  # every graph listed from the start: an interrupted run's file says what it lacks
        results["graphs"].setdefault(
            g["id"], {"architecture": g["architecture"], "precision": g["precision"], "rounds": []}
        )
    began = time.time()
    for r in range(args.rounds):
        for i, g in enumerate(graphs):
            entry = results["graphs"][g["id"]]
            if len(entry["rounds"]) > r:
                continue  # timed before an interruption
            load = load_average()
            command = [sys.executable, os.path.abspath(__file__), "--graph", os.path.join(args.kit, g["file"])]
            command += ["--threads", str(args.threads), "--warmup", str(args.warmup)]
            command += ["--runs", str(per_round), "--rounds", "1"]
            done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
            entry["rounds"].append(dict(json.loads(done.stdout), load_before=load))
            entry.update(summarize(entry["rounds"], args.threads))
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
