"""Labelled photos on disk: one subfolder per class, split by a seed, stratified.

The folder is read once (names only); images are decoded later, when features are extracted,
so an unreadable file is skipped and counted there rather than failing the whole listing.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgefleet.errors import UserError
from edgefleet.inference.images import IMAGE_SUFFIXES


@dataclass(frozen=True)
class Dataset:
    """Images with their class index; ``labels`` are the class names in index order."""

    labels: tuple[str, ...]
    items: tuple[tuple[Path, int], ...]
    root: Path

    def __len__(self) -> int:
        return len(self.items)

    @property
    def paths(self) -> list[Path]:
        return [path for path, _ in self.items]

    @property
    def targets(self) -> np.ndarray:
        return np.array([target for _, target in self.items], dtype=np.int64)

    def counts(self) -> dict[str, int]:
        """Images per class, in label order (0 for a class this part holds none of)."""
        seen = Counter(target for _, target in self.items)
        return {label: seen[i] for i, label in enumerate(self.labels)}

    def split(self, fraction: float, seed: int = 0) -> tuple[Dataset, Dataset]:
        """Two parts, ``fraction`` of each class in the first, the rest in the second.

        Stratified (every class keeps its share) and deterministic: the same folder and seed
        give the same parts whatever the file system's listing order. Every class must land
        at least one image in each part, or the split would silently drop a class.
        """
        if not 0.0 < fraction < 1.0:
            raise UserError(f"split fraction must be between 0 and 1, got {fraction}")
        rng = np.random.default_rng(seed)
        first: list[tuple[Path, int]] = []
        second: list[tuple[Path, int]] = []
        for index, label in enumerate(self.labels):
            members = sorted(p for p, t in self.items if t == index)
            order = rng.permutation(len(members))
            take = round(len(members) * fraction)
            if take == 0 or take == len(members):
                raise UserError(
                    f"class {label!r} has {len(members)} image(s): too few to split "
                    f"{fraction:.0%} / {1 - fraction:.0%} (each part needs at least one)"
                )
            first += [(members[i], index) for i in order[:take]]
            second += [(members[i], index) for i in order[take:]]
        return self._with(first), self._with(second)

    def _with(self, items: list[tuple[Path, int]]) -> Dataset:
        return Dataset(labels=self.labels, items=tuple(sorted(items)), root=self.root)


def image_folder(root: Path | str) -> Dataset:
    """A dataset from ``root/<class>/<image>`` (class names sorted; hidden entries ignored)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise UserError(f"{root}: not a folder (expected one subfolder of photos per class)")
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise UserError(f"{root}: no class subfolders (expected {root}/<class>/<photo>.jpg)")
    if len(classes) == 1:
        raise UserError(f"{root}: only one class ({classes[0].name}); a classifier needs two")
    items: list[tuple[Path, int]] = []
    for index, folder in enumerate(classes):
        photos = sorted(
            p
            for p in folder.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not photos:
            raise UserError(f"{folder}: class folder holds no images ({_suffixes()})")
        items += [(p, index) for p in photos]
    return Dataset(labels=tuple(c.name for c in classes), items=tuple(items), root=root)


def _suffixes() -> str:
    return ", ".join(sorted(IMAGE_SUFFIXES))


class ImageFolder(Dataset):
    """``ImageFolder("photos/")``: the Model Maker ``from_folder`` step as a constructor."""

    def __init__(self, root: Path | str) -> None:
        found = image_folder(root)
        super().__init__(labels=found.labels, items=found.items, root=found.root)
