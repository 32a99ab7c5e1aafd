"""``edgefleet models``: train a classifier from a folder, score a model, describe one.

``train`` and ``evaluate`` need the ``[train]`` extra for training only; ``evaluate`` and
``info`` run on the plain runtime (a device can score a candidate on its own photos).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import edgefleet.cli.args as argtypes
from edgefleet.protocol import ID_PATTERN

GATES_REFUSED = 3  # `models train`: written and reported, but not offered for deployment

if TYPE_CHECKING:
    from argparse import _SubParsersAction as Subparsers

    from rich.console import Console

Stage = Callable[[str, int, int], None]


@contextmanager
def _progress(console: Console) -> Iterator[Stage]:
    """One rich progress bar per stage name, created the first time the stage reports; the
    display starts with the first report, so an early error prints nothing but itself."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    columns = ("{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    progress = Progress(*columns, console=console)
    tasks: dict[str, Any] = {}

    def stage(name: str, done: int, total: int) -> None:
        if not tasks:
            progress.start()
        if name not in tasks:
            tasks[name] = progress.add_task(name, total=total)
        progress.update(tasks[name], completed=done, total=total)

    try:
        yield stage
    except BaseException:
        # A failure is one line: the bars of a run that did not finish go with it.
        progress.live.transient = True
        raise
    finally:
        if tasks:
            progress.stop()


def _default_name(data: Path) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", data.resolve().name).strip("-.")[:64]
    return name if re.match(ID_PATTERN, name) else "model"


def cmd_train(args: argparse.Namespace) -> int:
    from rich.console import Console

    from edgefleet.training.workflow import Plan, run

    console = Console(stderr=True)
    data = Path(args.data)
    plan = Plan(
        data=data,
        out=Path(args.out),
        name=args.name or _default_name(data),
        base=args.base,
        version=args.version,
        validation_split=args.validation_split,
        test_split=args.test_split,
        augment=args.augment,
        fine_tune=args.fine_tune,
        seed=args.seed,
        cache=Path(args.cache) if args.cache else None,
        min_accuracy=args.min_accuracy,
        force=args.force,
        calibration=args.calibration,
    )
    if args.epochs is not None:
        console.print("note: --epochs is not used any more: the head trains until it converges")
    with _progress(console) as stage:
        report = run(plan, stage)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_training(report, Console())
    if report["deploy"] is None:
        # One line, never wrapped: scripts read it.
        print(
            "models train: not offered for deployment: "
            + "; ".join(report["gates"]["refused"])
            + " (--force to offer it anyway)",
            file=sys.stderr,
        )
        return GATES_REFUSED
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from rich.console import Console

    from edgefleet.training.dataset import image_folder
    from edgefleet.training.evaluate import predict_file, score

    data = image_folder(args.data)
    with _progress(Console(stderr=True)) as stage:
        found = predict_file(
            Path(args.model), data, args.threads, lambda d, t: stage("classify", d, t)
        )
    scores = score(data.labels, found.truth, found.predicted)
    result = {
        "model": args.model,
        "data": args.data,
        **scores.as_dict(),
        "skipped": [{"path": str(p), "reason": r} for p, r in found.skipped],
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        console = Console()
        console.print(_scores_table("test", result))
        console.print(_confusion_table(list(data.labels), result["confusion"]))
        _print_confused(console, result["confused"])
        _print_skipped(console, result["skipped"])
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from edgefleet.inference.inspection import describe

    info = describe(Path(args.model))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    table = Table(show_header=False, box=None, title=info["path"], title_justify="left")
    rows = [
        ("name", f"{info['name']} v{info['version']} ({info['variant'] or 'no variant'})"),
        ("file", f"{info['size']:,} bytes, sha256 {info['sha256'][:16]}..."),
        *((f"input {i}", _tensor_text(t)) for i, t in enumerate(info["inputs"])),
        *((f"output {i}", _tensor_text(t)) for i, t in enumerate(info["outputs"])),
        (
            "preprocessing",
            "mean {mean}, std {std}, centre crop {crop_fraction} ({from})".format(
                **info["preprocessing"]
            ),
        ),
        ("labels", _labels_text(info["labels"])),
        ("ops", " ".join(f"{k}x{v}" for k, v in info["ops"].items())),
        (
            "EdgeTPU",
            "yes: compiled for the EdgeTPU (needs libedgetpu)" if info["edgetpu"] else "no",
        ),
        *((f"source {k}", v) for k, v in info["source"].items()),
    ]
    for key, value in rows:
        table.add_row(key, str(value))
    Console().print(table)
    return 0


def _tensor_text(tensor: dict[str, Any]) -> str:
    quant = tensor["quantization"]
    scale = f", scale {quant['scale']:.6g} zero point {quant['zero_point']}" if quant else ""
    return f"{tensor['shape']} {tensor['dtype']}{scale}"


def _labels_text(labels: list[str]) -> str:
    if not labels:
        return "none (class indices are reported)"
    shown = ", ".join(labels[:10])
    return f"{len(labels)}: {shown}{', ...' if len(labels) > 10 else ''}"


def _scores_table(title: str, scores: dict[str, Any]) -> Any:
    from rich.table import Table

    table = Table(title=f"{title}: top-1 {scores['accuracy']:.1%} of {scores['images']} images")
    for column in ("class", "precision", "recall", "images"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for row in scores["per_class"]:
        table.add_row(
            row["label"], f"{row['precision']:.1%}", f"{row['recall']:.1%}", str(row["support"])
        )
    return table


def _confusion_table(labels: list[str], confusion: list[list[int]]) -> Any:
    from rich.table import Table

    table = Table(title="confusion (rows: true class, columns: predicted)")
    table.add_column("")
    columns = labels + (["other"] if confusion and len(confusion[0]) > len(labels) else [])
    for name in columns:
        table.add_column(name, justify="right")
    for label, row in zip(labels, confusion, strict=True):
        table.add_row(label, *(str(n) for n in row))
    return table


def _print_confused(console: Console, confused: list[dict[str, Any]]) -> None:
    if confused:
        pairs = ", ".join(f"{p['true']} as {p['predicted']} ({p['images']})" for p in confused)
        console.print(f"most confused (true as predicted): {pairs}", markup=False)


def _print_head(console: Console, head: dict[str, Any]) -> None:
    weights = head["class_weights"]
    spread = f"{min(weights.values()):.2f}-{max(weights.values()):.2f}"
    console.print(
        f"head: L2 {head['l2']:g} chosen on {head['chosen_on']}, fitted on "
        f"{head['fitted_on']} photos in {head['iterations']} iterations, {head['stopped']}; "
        f"class weights {spread} (1.00 when balanced)",
        markup=False,
    )
    if "variant" in head:
        console.print(f"head kept: {head['variant']}: {head['why']}", markup=False)


def _print_duplicates(console: Console, duplicates: dict[str, Any]) -> None:
    if not duplicates["groups"]:
        return
    console.print(
        f"{duplicates['files']} photos are copies of each other (in {duplicates['groups']} "
        f"group{'s' if duplicates['groups'] != 1 else ''}): each group kept in one split, "
        "so none is both learned from and tested on",
        markup=False,
    )
    for group in duplicates["across_classes"][:5]:
        where = ", ".join(f"{item['path']} ({item['class']})" for item in group)
        console.print(f"  the same photo in two classes: {where}", markup=False)


def _print_gates(console: Console, report: dict[str, Any]) -> None:
    gates = report["gates"]
    for check in gates["checks"]:
        console.print(f"gate {'passed' if check['passed'] else 'FAILED'}: {check['says']}")
    if not gates["checks"]:
        console.print(f"gate FAILED: {gates['refused'][0]}")
    if gates.get("fp32_instead"):
        test = report["test"]["fp32"]
        console.print(
            f"the fp32 file ({report['files']['fp32']['path']}) scored {test['accuracy']:.1%} on "
            "the same photos: it runs on CPU and GPU delegates (an EdgeTPU needs int8)",
            markup=False,
        )


def _print_skipped(console: Console, skipped: list[dict[str, str]]) -> None:
    if skipped:
        console.print(f"skipped {len(skipped)} unreadable image(s):")
        for item in skipped[:10]:
            console.print(f"  {item['path']}: {item['reason']}", markup=False)


def _print_training(report: dict[str, Any], console: Console) -> None:
    from rich.table import Table

    splits = Table(
        title=f"{report['name']} v{report['version']}: {report['base']}, "
        f"{len(report['labels'])} classes"
    )
    splits.add_column("class")
    for part in ("train", "validation", "test"):
        splits.add_column(part, justify="right")
    for label in report["labels"]:
        splits.add_row(
            label,
            *(str(report["splits"][p].get(label, 0)) for p in ("train", "validation", "test")),
        )
    console.print(splits)
    _print_head(console, report["head"])
    _print_duplicates(console, report["duplicates"])
    test = report.get("test")
    if test:
        console.print(_scores_table("test, int8", test["int8"]))
        console.print(_confusion_table(report["labels"], test["int8"]["confusion"]))
        _print_confused(console, test["int8"]["confused"])
        console.print(
            f"test top-1: fp32 {test['fp32']['accuracy']:.1%}, int8 {test['int8']['accuracy']:.1%};"
            f" int8 agrees with fp32 on {test['int8_agreement']:.1%}; fp32 keeps "
            f"{test['fp32_noise_agreement']:.1%} of its answers with +-1 grey level of noise"
        )
    _print_gates(console, report)
    _print_skipped(console, report["skipped"])
    files = report["files"]
    for kind in ("int8", "fp32"):
        console.print(
            f"{kind}: {files[kind]['path']} ({files[kind]['size']:,} bytes)", markup=False
        )
    seconds = report["seconds"]
    console.print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()))
    if report["deploy"] is None:
        return
    console.print("deploy with:" if not report["forced"] else "deploy (forced past its gates):")
    console.print(f"  {report['deploy']}", markup=False, soft_wrap=True)


def add_models_commands(sub: Subparsers[argparse.ArgumentParser]) -> None:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    models = sub.add_parser("models", help="train your own classifier, score or describe a model")
    msub = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")

    train = msub.add_parser(
        "train",
        help="train a classifier from DATA_DIR/<class>/<photo> (needs the [train] extra)",
        formatter_class=fmt,
    )
    train.add_argument("data", metavar="DATA_DIR", help="one subfolder of photos per class")
    train.add_argument("-o", "--out", required=True, help="folder for the models and report")
    train.add_argument("--base", default="lite0", choices=["lite0", "lite1", "lite2"])
    train.add_argument("--name", type=argtypes.name, help="model name (default: DATA_DIR's name)")
    train.add_argument("--version", type=argtypes.version, default=1, help="model version")
    # The head now trains until it converges; an old command line with --epochs still runs.
    train.add_argument("--epochs", type=argtypes.int_between(1, 1000), help=argparse.SUPPRESS)
    train.add_argument(
        "--min-accuracy",
        type=argtypes.unit_fraction,
        default=None,
        help="least test top-1 of the int8 model (0-1) to offer it for deployment",
    )
    train.add_argument(
        "--force",
        action="store_true",
        help="offer the model for deployment even when a gate refused it",
    )
    train.add_argument("--validation-split", type=argtypes.split_fraction, default=0.1)
    train.add_argument("--test-split", type=argtypes.split_fraction, default=0.1)
    train.add_argument(
        "--augment", action="store_true", help="add 2 random crops/flips per training image"
    )
    train.add_argument(
        "--fine-tune",
        type=argtypes.int_between(1, 100),
        nargs="?",
        const=5,
        default=0,
        metavar="EPOCHS",
        help="then train the last block and head conv too, for EPOCHS (5 when not given)",
    )
    train.add_argument(
        "--calibration",
        choices=("data", "base"),
        default="data",
        help="int8 ranges from the training photos, or from the base model's photos "
        "(retrains then keep equal backbone bytes: small delta rollouts, docs/rollouts.md)",
    )
    train.add_argument("--seed", type=argtypes.int_between(0), default=0)
    train.add_argument("--cache", help="backbone and feature cache (default ~/.cache/edgefleet)")
    train.add_argument("--json", action="store_true", help="print the report as JSON")
    train.set_defaults(func=cmd_train)

    evaluate = msub.add_parser(
        "evaluate", help="score a model on DATA_DIR/<class>/<photo>", formatter_class=fmt
    )
    evaluate.add_argument("model", help="the .tflite file")
    evaluate.add_argument("data", metavar="DATA_DIR", help="folder names must be model labels")
    evaluate.add_argument("--threads", type=argtypes.int_between(1, 256), default=None)
    evaluate.add_argument("--json", action="store_true")
    evaluate.set_defaults(func=cmd_evaluate)

    info = msub.add_parser("info", help="input spec, quantization, labels, ops, EdgeTPU or not")
    info.add_argument("model", help="the .tflite file")
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=cmd_info)
