"""Classify images with this bundle's ONNX model: numpy + onnxruntime (+ pillow to read image files).

    python predict.py IMAGE [IMAGE ...]        # one line per image: file, class id, class name, probability
    python predict.py --int8 --top 3 --json IMAGE ...
    python predict.py --selftest               # the bundled samples/ must get the classes recorded at export

It is also the bundle's runtime library: rtmaps_classifier.py and bench_latency.py import it, so every
way of running the model checks the same sha256 sums and feeds it the same preprocessing. Nothing here
imports torch or dse. Written for Python >= 3.8.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = {"fp32": "model.onnx", "int8": "model.int8.onnx"}
META = "meta.json"
SUMS = "SHA256SUMS"
# ARM "CPU part" numbers of /proc/cpuinfo for the Bluebox 2.0 cores (LS2084A: A72, S32V234: A53).
ARM_PARTS = {"0xd03": "Cortex-A53", "0xd08": "Cortex-A72"}


class BundleError(Exception):
    """The bundle is incomplete, was changed after export, or cannot take this input."""


# ------------------------------------------------------------------------------------------ integrity


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_sums(folder: str) -> dict:
    """SHA256SUMS (the `sha256sum` format): file name -> sha256, meta.json included."""
    path = os.path.join(folder, SUMS)
    if not os.path.isfile(path):
        raise BundleError("%s is not a bundle: it has no %s" % (folder, SUMS))
    sums = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                digest, name = line.rstrip("\n").split(None, 1)
                sums[name.lstrip("*")] = digest
    return sums


def verify(folder: str = HERE) -> dict:
    """Check every file against SHA256SUMS and meta.json before anything is loaded; return the meta."""
    sums = read_sums(folder)
    if META not in sums:
        raise BundleError("%s does not list %s" % (os.path.join(folder, SUMS), META))
    for name in sorted(sums):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise BundleError("bundle file %s is missing from %s" % (name, folder))
        found = sha256(path)
        if found != sums[name]:
            raise BundleError(
                "bundle file %s was changed after export: sha256 %s, %s says %s; copy the bundle again"
                % (name, found[:16], SUMS, sums[name][:16])
            )
    with open(os.path.join(folder, META), encoding="utf-8") as f:
        meta = json.load(f)
    for name, digest in meta["files"].items():
        if sums.get(name) != digest:
            raise BundleError("%s and %s disagree on %s; copy the bundle again" % (META, SUMS, name))
    return meta


# ------------------------------------------------------------------------------------------ preprocessing


def center_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """The largest centred crop of `image` (H x W x C) with the aspect ratio height:width."""
    h, w = image.shape[:2]
    if h * width > w * height:  # too tall
        keep = max(1, int(round(w * height / width)))
        top = (h - keep) // 2
        return image[top : top + keep]
    keep = max(1, int(round(h * width / height)))
    left = (w - keep) // 2
    return image[:, left : left + keep]


def _area_weights(size_in: int, size_out: int) -> np.ndarray:
    """size_out x size_in matrix: each output pixel is the mean of the input it covers (box filter)."""
    edges = np.arange(size_out + 1) * (size_in / size_out)
    lo, hi = edges[:-1, None], edges[1:, None]
    pixels = np.arange(size_in)[None, :]
    overlap = np.clip(np.minimum(hi, pixels + 1) - np.maximum(lo, pixels), 0, None)
    return overlap / overlap.sum(axis=1, keepdims=True)


def resize_area(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Area (box-filter) resampling of H x W x C to height x width, float32 in the input's units."""
    if image.shape[:2] == (height, width):
        return image.astype(np.float32)
    rows = _area_weights(image.shape[0], height)
    cols = _area_weights(image.shape[1], width)
    return np.einsum("yh,hwc,xw->yxc", rows, image.astype(np.float64), cols).astype(np.float32)


def to_channels(image: np.ndarray, channels: int, order: str = "RGB") -> np.ndarray:
    """H x W x C uint8 in `order` (RGB, BGR, RGBA, BGRA or GRAY) to H x W x `channels` in the model's
    order (RGB, or grey by the ITU-R 601 luma weights)."""
    if image.dtype != np.uint8:
        raise BundleError("images must be uint8 (0-255), got %s" % image.dtype)
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise BundleError("an image must be H x W, H x W x 1, x 3 or x 4; got shape %s" % (image.shape,))
    if image.shape[2] == 4:
        image = image[:, :, :3]
    if image.shape[2] == 3 and order.upper().startswith("BGR"):
        image = image[:, :, ::-1]
    if image.shape[2] == channels:
        return image
    if channels == 3:
        return np.repeat(image, 3, axis=2)
    luma = image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return np.clip(np.round(luma), 0, 255).astype(np.uint8)[:, :, None]


def normalize(batch: np.ndarray, mean, std) -> np.ndarray:
    """N x C x H x W pixels in 0-255 to float32 (x/255 - mean)/std, mean and std in [0, 1] units: the
    training pipeline's normalisation (dse.data.normalize)."""
    mean = np.asarray(mean, dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(std, dtype=np.float32).reshape(1, -1, 1, 1)
    scale = np.float32(1) / (np.float32(255) * std)
    return (batch.astype(np.float32) * scale + (-mean / std)).astype(np.float32)


def to_model_input(image: np.ndarray, meta: dict, order: str = "RGB") -> np.ndarray:
    """One image (H x W [x C] uint8) to the model's 1 x C x H x W float32 input: channels, centred crop
    to the model's aspect ratio, area resize to its size, normalisation."""
    _, channels, height, width = meta["input"]["shape"]
    image = to_channels(image, channels, order)
    if image.shape[:2] != (height, width):
        image = resize_area(center_crop(image, height, width), height, width)
    chw = np.ascontiguousarray(np.transpose(image, (2, 0, 1))[None])
    return normalize(chw, meta["input"]["mean"], meta["input"]["std"])


def load_image(path: str) -> np.ndarray:
    """An image file as H x W x 3 RGB (or H x W grey) uint8; needs pillow."""
    try:
        from PIL import Image
    except ImportError:
        raise BundleError("reading image files needs pillow: pip install pillow") from None
    try:
        with Image.open(path) as img:
            img = img.convert("L" if img.mode in ("1", "L", "I", "I;16", "F") else "RGB")
            return np.asarray(img, dtype=np.uint8)
    except OSError as e:
        raise BundleError("cannot read image %s: %s" % (path, e)) from None


# ------------------------------------------------------------------------------------------ inference


def cpu_session(path: str, threads: int = 1):
    """An ONNX Runtime session on the CPU with `threads` intra-op threads (all graph optimisations on)."""
    import onnxruntime as ort

    if threads < 1:
        raise BundleError("threads=%d must be >= 1" % threads)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def open_session(folder: str = HERE, precision: str = "fp32", threads: int = 1, *, meta: dict = None):
    """A session on the bundle's fp32 or int8 model; checks the sha256 sums first unless given the
    `meta` a `verify` call returned."""
    if precision not in MODELS:
        raise BundleError("precision %r is unknown; allowed: %s" % (precision, ", ".join(MODELS)))
    if meta is None:
        verify(folder)
    return cpu_session(os.path.join(folder, MODELS[precision]), threads)


def run(sess, batch: np.ndarray) -> np.ndarray:
    """Logits of a N x C x H x W float32 batch."""
    return sess.run(None, {sess.get_inputs()[0].name: batch})[0]


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def time_session(sess, batch: np.ndarray, *, warmup: int = 20, runs: int = 200) -> list:
    """Wall-clock milliseconds of `runs` session runs on `batch` after `warmup` untimed ones."""
    if runs < 1 or warmup < 0:
        raise BundleError("runs=%d must be >= 1 and warmup=%d >= 0" % (runs, warmup))
    feed = {sess.get_inputs()[0].name: batch}
    times = []
    for i in range(warmup + runs):
        start = time.perf_counter()
        sess.run(None, feed)
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    return times


def summarize(times: list) -> tuple:
    """(median, interquartile range) of timings."""
    if len(times) < 2:
        return times[0], 0.0
    q1, _, q3 = statistics.quantiles(times, n=4)
    return statistics.median(times), q3 - q1


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it (ARM cores by part number), else the platform's word."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            info = f.read()
    except OSError:
        info = ""
    for line in info.splitlines():
        if line.lower().startswith("model name"):
            return line.split(":", 1)[1].strip()
    parts = sorted({line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("CPU part")})
    if parts:
        return " + ".join(ARM_PARTS.get(p, "ARM part " + p) for p in parts)
    return platform.processor() or platform.machine()


# ------------------------------------------------------------------------------------------ command line


def selftest(folder: str, threads: int) -> int:
    """Classify the bundled samples with both models; fp32 must give the export's classes."""
    meta = verify(folder)
    failed = 0
    for precision in MODELS:
        sess = open_session(folder, precision, threads, meta=meta)
        same = 0
        for sample in meta["samples"]:
            image = load_image(os.path.join(folder, sample["file"]))
            same += int(run(sess, to_model_input(image, meta)).argmax()) == sample[precision + "_class"]
        total = len(meta["samples"])
        print("%s: %d/%d sample classes match the export" % (precision, same, total))
        if precision == "fp32" and same != total:
            failed = 1
        elif same != total:
            print("  int8 kernels differ between CPUs; a near tie may flip, check the accuracy with your data")
    return failed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="predict.py", description=__doc__.split("\n")[0])
    parser.add_argument("images", nargs="*", help="image files (PNG, JPEG, ...)")
    parser.add_argument("--int8", action="store_true", help="use model.int8.onnx (default model.onnx, fp32)")
    parser.add_argument("--top", type=int, default=1, help="classes per image (default 1)")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (default 1)")
    parser.add_argument("--json", action="store_true", help="print one JSON list instead of lines")
    parser.add_argument("--bundle", default=HERE, help="bundle folder (default: this file's folder)")
    parser.add_argument("--selftest", action="store_true", help="check the bundled samples/ and exit")
    args = parser.parse_args(argv)
    try:
        if args.selftest:
            return selftest(args.bundle, args.threads)
        if not args.images:
            parser.error("give image files, or --selftest")
        meta = verify(args.bundle)
        sess = open_session(args.bundle, "int8" if args.int8 else "fp32", args.threads, meta=meta)
        results = []
        for path in args.images:
            probs = softmax(run(sess, to_model_input(load_image(path), meta)))[0]
            top = np.argsort(-probs, kind="stable")[: max(1, args.top)]
            results.append(
                {
                    "file": path,
                    "top": [{"class": int(k), "name": meta["classes"][k], "probability": float(probs[k])} for k in top],
                }
            )
    except (BundleError, OSError, ValueError, KeyError) as e:
        print("predict.py: error: %s" % e, file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    for r in results:
        print("\t".join([r["file"]] + ["%d\t%s\t%.4f" % (t["class"], t["name"], t["probability"]) for t in r["top"]]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
