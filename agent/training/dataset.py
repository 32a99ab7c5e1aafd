"""Labelled photos on disk: one subfolder per class, split by a seed, stratified.

The folder is read once (names only); images are decoded later, when features are extracted,
so an unreadable file is skipped and counted there rather than failing the whole listing.
Splitting reads each file's bytes once: photos with the same bytes (a copy under another
name, in the same class or another) always land in the same part, so no photo is both
learned from and tested on, and ``duplicates`` lists them for the report.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
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
            groups = _same_bytes(members)
            order = rng.permutation(len(groups))
            take = round(len(members) * fraction)
            taken = 0
            for n in order:
                part = first if taken < take else second
                part += [(p, index) for p in groups[n]]
                taken += len(groups[n]) if part is first else 0
            if not any(t == index for _, t in first) or not any(t == index for _, t in second):
                raise UserError(
                    f"class {label!r} has {len(members)} image(s)"
                    f"{f' ({len(groups)} different)' if len(groups) < len(members) else ''}: "
                    f"too few to split {fraction:.0%} / {1 - fraction:.0%} "
                    "(each part needs at least one)"
                )
        return self._with(first), self._with(second)

    def duplicates(self) -> list[list[tuple[Path, str]]]:
        """Groups of two or more photos with the same bytes, each as (path, class)."""
        by_hash: dict[str, list[tuple[Path, str]]] = defaultdict(list)
        for path, target in self.items:
            by_hash[_digest(path)].append((path, self.labels[target]))
        return [group for group in by_hash.values() if len(group) > 1]

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


def _digest(path: Path) -> str:
    """The file's sha256 (a key of its own for one that cannot be read: decoding says why)."""
    digest = hashlib.sha256()
    try:
        with path.open("rb") as fh:
            while block := fh.read(1 << 20):
                digest.update(block)
    except OSError:
        return f"unreadable:{path}"
    return digest.hexdigest()


def _same_bytes(members: list[Path]) -> list[list[Path]]:
    """``members`` grouped by content, in order of each group's first path."""
    groups: dict[str, list[Path]] = {}
    for path in members:
        groups.setdefault(_digest(path), []).append(path)
    return list(groups.values())


def _suffixes() -> str:
    return ", ".join(sorted(IMAGE_SUFFIXES))


class ImageFolder(Dataset):
    """``ImageFolder("photos/")``: the Model Maker ``from_folder`` step as a constructor."""

    def __init__(self, root: Path | str) -> None:
        found = image_folder(root)
        super().__init__(labels=found.labels, items=found.items, root=found.root)
