"""Small labelled photo folders from data that ships with the project's dependencies.

    python tools/sample_datasets.py imagenet OUT [--per-class N]   # dog/bird/reptile/food/other
    python tools/sample_datasets.py faces OUT                      # scikit-image's lfw_subset

Both give the ``OUT/<class>/<photo>`` layout ``edgefleet models train`` reads. The ImageNet
groups link (symlink) the one-per-class photos of ``../shared/imagenet-samples`` by the
classifier's class index (the position of the synset in the sorted list), so the folder costs
no copy; the faces are written as PNGs (25x25 grey, as scikit-image holds them).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

IMAGENET_SAMPLES = Path(__file__).resolve().parents[1].parent / "shared" / "imagenet-samples"
# ImageNet-1k class index ranges (inclusive) of a few super-classes; the rest is "other".
GROUPS: dict[str, tuple[tuple[int, int], ...]] = {
    "bird": ((7, 24), (80, 100), (127, 146)),
    "reptile": ((33, 68),),
    "dog": ((151, 268),),
    "food": ((923, 969),),
}


def group_of(index: int) -> str:
    for name, ranges in GROUPS.items():
        if any(lo <= index <= hi for lo, hi in ranges):
            return name
    return "other"


def imagenet_groups(
    out: Path, per_class: int | None = None, seed: int = 0, samples: Path = IMAGENET_SAMPLES
) -> Path:
    """``out/<group>/`` of symlinked samples; ``per_class`` caps each group (seeded choice)."""
    photos = sorted(samples.glob("n*.JPEG"))
    if len(photos) != 1000:
        raise SystemExit(f"expected 1000 ImageNet samples in {samples}, found {len(photos)}")
    groups: dict[str, list[Path]] = {}
    for index, photo in enumerate(photos):
        groups.setdefault(group_of(index), []).append(photo)
    rng = np.random.default_rng(seed)
    for name, found in groups.items():
        members = found
        if per_class is not None and len(found) > per_class:
            members = [found[i] for i in sorted(rng.choice(len(found), per_class, False))]
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        for photo in members:
            (folder / photo.name).symlink_to(photo.resolve())
    return out


def faces(out: Path) -> Path:
    """``out/face`` and ``out/not-face``: the 200 images of scikit-image's ``lfw_subset``."""
    import cv2
    from skimage import data

    images = data.lfw_subset()  # type: ignore[no-untyped-call]  # 100 faces, then 100 others
    for i, image in enumerate(images):
        folder = out / ("face" if i < 100 else "not-face")
        folder.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / f"{i:03d}.png"), np.round(image * 255).astype(np.uint8))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=["imagenet", "faces"])
    parser.add_argument("out", type=Path)
    parser.add_argument("--per-class", type=int, help="imagenet: at most N photos per group")
    args = parser.parse_args(argv)
    if args.kind == "imagenet":
        imagenet_groups(args.out, args.per_class)
    else:
        faces(args.out)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
