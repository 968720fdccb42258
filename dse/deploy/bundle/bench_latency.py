"""Batch-1 inference latency of this bundle's models, measured on the machine it runs on (the board).

What it measures: wall-clock milliseconds of one ONNX Runtime `session.run` on one preprocessed image
(1 x C x H x W float32, a bundled sample), CPU execution provider, `--threads` intra-op threads, after
`--warmup` untimed runs; it prints the median and interquartile range of `--runs` timed runs for the
fp32 and the int8 model, with the CPU, ONNX Runtime version and load average, beside the figures
meta.json recorded at export (on the export machine). Preprocessing is not timed. Run it on a quiet
machine: every figure is a wall-clock time.

    python bench_latency.py [--threads 1] [--runs 200] [--warmup 20] [--precision fp32 int8]
"""

import argparse
import os
import platform
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)
import predict  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bench_latency.py", description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    parser.add_argument("--runs", type=int, default=200, help="timed runs per model (default 200)")
    parser.add_argument("--warmup", type=int, default=20, help="untimed runs first (default 20)")
    parser.add_argument("--precision", nargs="+", default=list(predict.MODELS), choices=list(predict.MODELS))
    parser.add_argument("--bundle", default=HERE, help="bundle folder (default: this file's folder)")
    args = parser.parse_args(argv)
    import onnxruntime

    try:
        meta = predict.verify(args.bundle)
        image = predict.load_image(os.path.join(args.bundle, meta["samples"][0]["file"]))
        x = predict.to_model_input(image, meta)
        load = os.getloadavg() if hasattr(os, "getloadavg") else ()
        print(
            "%s: batch 1, %d thread(s), median and IQR of %d runs after %d warm-up"
            % (meta["paper_name"], args.threads, args.runs, args.warmup)
        )
        print(
            "machine: %s, %s, Python %s, ONNX Runtime %s, load average %s"
            % (
                predict.cpu_name(),
                platform.machine(),
                platform.python_version(),
                onnxruntime.__version__,
                " ".join("%.2f" % v for v in load) or "n/a",
            )
        )
        for precision in args.precision:
            sess = predict.open_session(args.bundle, precision, args.threads, meta=meta)
            median, iqr = predict.summarize(predict.time_session(sess, x, warmup=args.warmup, runs=args.runs))
            size = os.path.getsize(os.path.join(args.bundle, predict.MODELS[precision]))
            print(
                "%-5s %9.3f ms  (IQR %.3f ms)  %8d bytes   at export: %.3f ms"
                % (precision, median, iqr, size, meta["metrics"]["latency_%s_ms" % precision])
            )
        print("export figures were measured %s" % meta["metrics"]["latency_how"])
    except predict.BundleError as e:
        print("bench_latency.py: error: %s" % e, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
