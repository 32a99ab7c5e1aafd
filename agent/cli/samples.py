"""``edgefleet samples``: the frames devices kept, from the collector's store to training.

``classes`` registers a model's classes (what a label may be), ``list`` shows what is
stored, ``label`` gives one sample its class, ``export`` writes the labelled ones as the
``DIR/<class>/`` folder ``models train`` reads.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from edgefleet.errors import UserError

if TYPE_CHECKING:
    from edgefleet.collector import SampleCatalog

DEFAULT_DB = "sqlite:///edgefleet-collector.db"


def _catalog(args: argparse.Namespace) -> SampleCatalog:
    from edgefleet.collector import SampleCatalog

    return SampleCatalog(args.db, Path(args.samples))


def cmd_classes(args: argparse.Namespace) -> int:
    from edgefleet.inference.classifier import read_labels_file, read_model_info

    path = Path(args.model)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    if path.suffix == ".txt":
        if not args.name:
            raise UserError("a labels file needs --name MODEL (the name devices report)")
        labels, name = read_labels_file(path), args.name
    else:
        info = read_model_info(path)
        if not info.labels:
            raise UserError(f"{path}: no embedded labels (give its labels .txt with --name)")
        labels, name = list(info.labels), args.name or info.name
    catalog = _catalog(args)
    try:
        catalog.set_classes(name, labels)
    finally:
        catalog.close()
    print(f"model {name}: {len(labels)} classes registered")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    catalog = _catalog(args)
    try:
        found = catalog.find(
            state=args.state,
            device=args.device,
            trigger=args.trigger,
            model=args.model,
            limit=args.limit,
        )
        facets = catalog.facets()
    except ValueError as exc:
        raise UserError(str(exc)) from None
    finally:
        catalog.close()
    for sample in found:
        print(json.dumps(sample, separators=(",", ":")))
    print(
        f"# {len(found)} shown; {facets['unlabelled']} unlabelled of {facets['total']}; "
        f"refused {facets['refused'] or 'none'}"
    )
    return 0


def cmd_label(args: argparse.Namespace) -> int:
    catalog = _catalog(args)
    try:
        done = catalog.label(args.sample, None if args.skip else args.label, args.by)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    finally:
        catalog.close()
    print(json.dumps(done))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    out = Path(args.out)
    catalog = _catalog(args)
    try:
        written = catalog.export(out, model=args.model, base=Path(args.base) if args.base else None)
    finally:
        catalog.close()
    if not written:
        raise UserError("no labelled samples to export (label some on the /samples page)")
    for name, count in sorted(written.items()):
        print(f"{out / name}: {count}")
    print(f"next: edgefleet models train {out} --out MODEL.tflite")
    return 0


def add_samples_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    samples = sub.add_parser("samples", help="frames devices kept: classes, list, label, export")
    actions = samples.add_subparsers(dest="samples_command", required=True, metavar="ACTION")

    def common(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--db", default=DEFAULT_DB, help="the collector's database")
        parser.add_argument("--samples", default="edgefleet-samples", help="its samples folder")

    classes = actions.add_parser("classes", help="register a model's classes (what labels may be)")
    classes.add_argument("model", help="a model file with embedded labels, or a labels .txt")
    classes.add_argument("--name", help="the model's name as devices report it")
    common(classes)
    classes.set_defaults(func=cmd_classes)

    show = actions.add_parser("list", help="stored samples as JSON lines, newest first")
    show.add_argument("--state", default="unlabelled", help="unlabelled, labelled, skipped, all")
    show.add_argument("--device")
    show.add_argument("--trigger")
    show.add_argument("--model")
    show.add_argument("--limit", type=int, default=100)
    common(show)
    show.set_defaults(func=cmd_list)

    label = actions.add_parser("label", help="give one sample its class (or --skip it)")
    label.add_argument("sample", help="its sha256")
    label.add_argument("label", nargs="?", help="a class of the sample's model")
    label.add_argument("--skip", action="store_true")
    label.add_argument("--by", default="cli", help="who labels (kept with the label)")
    common(label)
    label.set_defaults(func=cmd_label)

    export = actions.add_parser("export", help="labelled samples as DIR/<class>/ for training")
    export.add_argument("out", metavar="DIR")
    export.add_argument("--model", help="only samples of this model")
    export.add_argument("--base", help="copy this DIR/<class>/ data set in first (merge)")
    common(export)
    export.set_defaults(func=cmd_export)
