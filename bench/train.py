"""The Model Maker flow on 1,000 photos: time, memory, accuracy (a benchmark: prints, never fails).

    .venv/bin/python bench/train.py [--samples ../shared/imagenet-samples] [--base lite0]

The 1,000 ImageNet sample photos are grouped into five classes (bird, reptile, dog, food,
other; tools/sample_datasets.py) and ``edgefleet models train`` runs on them, each
in its own process so that its peak memory is its own (four runs):

- cold: an empty cache, so the backbone is converted and every feature computed;
- warm: the same cache again (what re-training with other epochs or splits costs);
- augment: ``--augment`` on the warm cache (two random crops per training image are new);
- fine-tune: ``--fine-tune`` (5 epochs of the last block and head conv) on the warm cache.

Each run prints its stages' seconds, peak RSS, test top-1 of the fp32 and int8 files (run as
the agent runs them), int8-vs-fp32 top-1 agreement and the int8/fp32 file size ratio.

    .venv/bin/python bench/train.py --domains [--per-class 40]

trains on five domains unlike ImageNet instead, each beside a logistic-regression reference
on the same features (bench/train_domains.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import sample_datasets

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_domains

TARGET_SECONDS = 180.0


def run(
    data: Path, out: Path, cache: Path, extra: list[str]
) -> tuple[dict[str, Any], float, float]:
    """One ``models train`` in a child process: (report, wall seconds, peak RSS in MiB)."""
    command = [
        sys.executable,
        "-m",
        "edgefleet",
        "models",
        "train",
        str(data),
        "-o",
        str(out),
        "--cache",
        str(cache),
        "--json",
        *extra,
    ]
    started = time.perf_counter()
    with tempfile.TemporaryFile() as stdout, tempfile.TemporaryFile() as stderr:
        child = subprocess.Popen(command, stdout=stdout, stderr=stderr)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - started
        if child.returncode != 0:
            stderr.seek(0)
            raise SystemExit(
                f"training failed ({child.returncode}): {stderr.read().decode()[-2000:]}"
            )
        stdout.seek(0)
        report: dict[str, Any] = json.loads(stdout.read())
    return report, wall, usage.ru_maxrss / 1024


def show(name: str, report: dict[str, Any], wall: float, rss: float) -> None:
    test = report["test"]
    files = report["files"]
    seconds = ", ".join(f"{k} {v:.1f}" for k, v in report["seconds"].items())
    splits = {part: sum(counts.values()) for part, counts in report["splits"].items()}
    print(f"\n[{name}] wall {wall:.1f} s (target < {TARGET_SECONDS:.0f} s), peak RSS {rss:.0f} MiB")
    print(f"  images: {splits} skipped {len(report['skipped'])}")
    print(f"  seconds: {seconds}")
    print(
        f"  test top-1: fp32 {test['fp32']['accuracy']:.1%}, int8 {test['int8']['accuracy']:.1%}"
        f" (of {test['fp32']['images']}); int8 agrees with fp32 on {test['int8_agreement']:.1%}"
        " (target >= 98%)"
    )
    print(f"  head kept: {report['head']['variant']} ({report['head']['why']})")
    ratio = files["int8"]["size"] / files["fp32"]["size"]
    print(
        f"  files: int8 {files['int8']['size']:,} B, fp32 {files['fp32']['size']:,} B,"
        f" ratio {ratio:.1%} (target <= 30%)"
    )
    per_class = ", ".join(
        f"{r['label']} P{r['precision']:.0%}/R{r['recall']:.0%}" for r in test["int8"]["per_class"]
    )
    print(f"  int8 per class: {per_class}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=Path, default=sample_datasets.IMAGENET_SAMPLES)
    parser.add_argument("--base", default="lite0", choices=["lite0", "lite1", "lite2"])
    parser.add_argument("--test-split", default="0.2", help="share held out for the test figures")
    parser.add_argument("--domains", action="store_true", help="the domains unlike ImageNet")
    parser.add_argument("--per-class", type=int, default=40, help="--domains: images per class")
    args = parser.parse_args(argv)
    cpu = platform.processor() or platform.machine()
    print(
        f"machine: {platform.node()} {os.cpu_count()} cores, {cpu}, "
        f"Python {platform.python_version()}; {time.strftime('%Y-%m-%d')}"
    )
    if args.domains:
        with tempfile.TemporaryDirectory(prefix="edgefleet-bench-domains-") as tmp:
            rows = train_domains.run_domains(
                Path(tmp), args.per_class, args.base, args.test_split, run
            )
        train_domains.summary(rows)
        return 0
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-train-") as tmp:
        root = Path(tmp)
        data = sample_datasets.imagenet_groups(root / "groups", samples=args.samples)
        counts = {p.name: len(list(p.iterdir())) for p in sorted(data.iterdir())}
        print(f"data: {sum(counts.values())} photos, {counts}; base {args.base}")
        common = ["--base", args.base, "--test-split", args.test_split]
        runs: tuple[tuple[str, list[str]], ...] = (
            ("cold", []),
            ("warm", []),
            ("augment", ["--augment"]),
            ("fine-tune", ["--fine-tune"]),
        )
        for name, extra in runs:
            report, wall, rss = run(data, root / name, root / "cache", [*common, *extra])
            show(name, report, wall, rss)
    print(
        f"\n(children's peak RSS as the kernel counts it; this process: "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
