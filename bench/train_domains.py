"""``models train`` on data unlike ImageNet, beside a logistic-regression reference.

    .venv/bin/python bench/train.py --domains [--per-class 40] [--base lite0]

Five domains from tools/synthetic_domains.py (glyphs, textures, shapes, thermal, cells),
each trained by ``edgefleet models train`` in its own process (its peak RSS its own). Then,
on the very same split and the very same backbone features (the run's feature cache), a
reference: scikit-learn's multinomial ``LogisticRegressionCV`` on standardised features,
its regularisation chosen by 5-fold cross-validation on the images the head learned from
(train plus validation), scored on the test split. Per domain: test top-1 of the fp32 and
int8 files (run as the agent runs them), their agreement, the reference, the gates' verdict,
how the head stopped, seconds and peak RSS.
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import synthetic_domains


def reference(data: Path, report: dict[str, Any], cache: Path) -> float:
    """Test top-1 of the logistic-regression reference (see the module docstring)."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from edgefleet.training.dataset import image_folder
    from edgefleet.training.features import Extractor, parse_base
    from edgefleet.training.workflow import Plan, split

    plan = Plan(
        data=data,
        out=Path(),
        name="reference",
        validation_split=report["validation_split"],
        test_split=report["test_split"],
        seed=report["seed"],
    )
    train, validation, test = split(image_folder(data), plan)
    if test is None:
        raise SystemExit("the reference needs a test split")
    extractor = Extractor(parse_base(report["base"]), cache)
    learn = list(train.items) + (list(validation.items) if validation else [])
    fit = extractor.extract(learn)
    held = extractor.extract(list(test.items))
    model = make_pipeline(
        StandardScaler(), LogisticRegressionCV(Cs=10, cv=5, max_iter=5000, n_jobs=1)
    )
    with warnings.catch_warnings():  # scikit-learn's notices of its next defaults
        warnings.simplefilter("ignore", FutureWarning)
        model.fit(fit.features, fit.targets)
    return float(np.mean(model.predict(held.features) == held.targets))


def run_domains(
    root: Path, per_class: int, base: str, test_split: str, train_run: Any
) -> list[dict[str, Any]]:
    """Each domain made, trained (``train_run``: bench/train.py's child-process runner),
    then scored beside the reference; one row per domain, printed as it comes."""
    rows = []
    for domain in sorted(synthetic_domains.DOMAINS):
        data = synthetic_domains.make(domain, root / "data", per_class, seed=7)
        cache = root / "cache"
        extra = ["--base", base, "--test-split", test_split, "--force"]
        report, wall, rss = train_run(data, root / domain, cache, extra)
        started = time.perf_counter()
        ref = reference(data, report, cache)
        test = report["test"]
        row = {
            "domain": domain,
            "classes": len(report["labels"]),
            "images": sum(sum(c.values()) for c in report["splits"].values()),
            "test_images": test["fp32"]["images"],
            "fp32": test["fp32"]["accuracy"],
            "int8": test["int8"]["accuracy"],
            "agreement": test["int8_agreement"],
            "firm": test["fp32_noise_agreement"],
            "variant": report["head"]["variant"],
            "reference": ref,
            "gates": "pass" if report["gates"]["passed"] else "refused",
            "refused": report["gates"]["refused"],
            "head": report["head"],
            "wall": wall,
            "reference_s": time.perf_counter() - started,
            "rss": rss,
        }
        show_row(row)
        rows.append(row)
    return rows


def show_row(row: dict[str, Any]) -> None:
    head = row["head"]
    print(
        f"\n[{row['domain']}] {row['classes']} classes, {row['images']} images "
        f"({row['test_images']} test): fp32 {row['fp32']:.1%}, int8 {row['int8']:.1%}, "
        f"agreement {row['agreement']:.1%}; reference {row['reference']:.1%} "
        f"(fp32 - reference {100 * (row['fp32'] - row['reference']):+.1f} points, "
        f"int8 - fp32 {100 * (row['int8'] - row['fp32']):+.1f})"
    )
    print(
        f"  head kept: {row['variant']} ({row['head']['why']}); fp32 keeps {row['firm']:.1%} "
        "of its answers with +-1 grey level of noise"
    )
    print(f"  gates: {row['gates']}{': ' + '; '.join(row['refused']) if row['refused'] else ''}")
    print(
        f"  head: L2 {head['l2']:g} chosen on {head['chosen_on']}, {head['iterations']} "
        f"iterations, {head['stopped']}"
    )
    print(
        f"  wall {row['wall']:.1f} s (+ reference {row['reference_s']:.1f} s), "
        f"peak RSS {row['rss']:.0f} MiB"
    )


def summary(rows: list[dict[str, Any]]) -> None:
    print(
        "\n| domain | classes | test images | fp32 | int8 | agreement | fp32 firm | reference "
        "| head | gates |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['domain']} | {r['classes']} | {r['test_images']} | {r['fp32']:.1%} | "
            f"{r['int8']:.1%} | {r['agreement']:.1%} | {r['firm']:.1%} | {r['reference']:.1%} "
            f"| {r['variant']} | {r['gates']} |"
        )
