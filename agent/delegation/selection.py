"""Choosing the delegate: measure what really works for this model on this device.

Policies (``delegate.type``):
- ``auto``: every available candidate (delegate x runtime x thread count) is loaded and timed
  on the actual model (warm-up, then invokes within a total budget, default 5 s), each invoke
  beside another thread preparing the next frame as the pipeline does; the lowest median
  wins. The ranking is cached per model sha256 and hardware, so a restart does not
  measure again.
- ``prefer``: the first candidate, in the given order, that is available, loads and runs a
  test inference.
- any plugin type: that delegate, fixed.
The ranked list is kept: the runner-up is the failover target (``edgefleet.delegation.failover``).
"""

from __future__ import annotations

import json
import os
import platform
import queue
import statistics
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from edgefleet.delegation.policies import DelegatePolicy
from edgefleet.errors import ModelError, UserError
from edgefleet.fsutil import atomic_write_bytes
from edgefleet.inference.classifier import (
    Classifier,
    ModelInfo,
    load_checked,
    read_model_info,
)
from edgefleet.inference.delegate import Delegate
from edgefleet.inference.litert import available_runtimes
from edgefleet.inference.preprocess import Preprocessor
from edgefleet.plugin.registry import PluginConfig, Registry
from edgefleet.protocol import loads

log = structlog.get_logger(__name__)


@dataclass
class Measurement:
    """One candidate's row in the table."""

    label: str
    section: dict[str, Any]
    ok: bool
    reason: str = ""
    median_ms: float | None = None
    p90_ms: float | None = None
    spread_ms: float | None = None
    runs: int = 0


@dataclass
class Choice:
    """The outcome: candidates ranked best first, with their loaded classifiers."""

    policy: str
    table: list[Measurement]
    ranked: list[tuple[Measurement, Delegate, Classifier]] = field(default_factory=list)
    from_cache: bool = False
    seconds: float = 0.0

    @property
    def best(self) -> tuple[Measurement, Delegate, Classifier]:
        return self.ranked[0]

    def summary(self) -> list[dict[str, Any]]:
        return [asdict(m) for m in self.table]


def candidate_sections(
    policy: DelegatePolicy, validated: Sequence[PluginConfig], registry: Registry[Delegate]
) -> list[PluginConfig]:
    """The policy's validated candidates; for an empty ``auto`` list, the defaults."""
    if validated or policy.type != "auto":
        return list(validated)
    sections: list[PluginConfig] = []
    for item in default_candidates(registry):
        entry = registry.get(str(item["type"]))
        if entry is not None:
            sections.append(entry.config_model.model_validate(item))
    return sections


def fixed_choice(section: PluginConfig, delegate: Delegate, classifier: Classifier) -> Choice:
    row = Measurement(label_of(section), section.model_dump(mode="json"), True)
    return Choice("fixed", [row], [(row, delegate, classifier)])


def label_of(section: PluginConfig) -> str:
    data = section.model_dump(exclude_defaults=True)
    data.pop("type", None)
    extra = ",".join(f"{k}={v}" for k, v in sorted(data.items()))
    return f"{section.type}({extra})" if extra else section.type


def default_candidates(registry: Registry[Delegate]) -> list[dict[str, Any]]:
    """Every registered accelerator with its defaults, and CPU x runtime x thread counts."""
    cores = os.cpu_count() or 1
    threads = sorted({1, max(1, cores // 2), cores})
    out: list[dict[str, Any]] = [
        {"type": name} for name in registry.names() if name not in ("cpu", "external")
    ]
    for runtime in available_runtimes():
        out += [{"type": "cpu", "runtime": runtime.name, "threads": t} for t in threads]
    return out


def hardware_key() -> str:
    """What a cached ranking depends on besides the model."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "model\t")):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    runtimes = ",".join(f"{r.name}={r.version}" for r in available_runtimes())
    accel = ",".join(sorted(p.name for p in Path("/dev").glob("apex_*")))
    return f"{platform.machine()}|{os.cpu_count()}|{model}|{runtimes}|{accel}"


def _time_invokes(classifier: Classifier, seconds: float, max_runs: int = 200) -> list[float]:
    """Invoke times as the loop sees them: while each invoke runs, another thread prepares
    the next frame (a 640x480 one), as the pipeline's prepare stage does. A thread count
    that leaves no core for that work pays for it here, not only once the agent runs."""
    h, w = classifier.input_shape
    buffer = classifier.preprocessor.new_buffer()
    classifier.preprocessor(np.full((h, w, 3), 127, dtype=np.uint8), buffer)
    classifier.set_input(buffer)
    for _ in range(3):
        classifier.interpreter.invoke()
    with _PrepareBeside(classifier) as prepare:
        times: list[float] = []
        deadline = time.perf_counter() + seconds
        while len(times) < max_runs and (time.perf_counter() < deadline or len(times) < 5):
            prepare.next_frame()
            started = time.perf_counter()
            classifier.interpreter.invoke()
            times.append((time.perf_counter() - started) * 1e3)
    return times


class _PrepareBeside:
    """A thread that prepares one frame each time it is asked, into a buffer of its own."""

    FRAME = (480, 640, 3)

    def __init__(self, classifier: Classifier) -> None:
        # A preprocessor of its own: the classifier's keeps scratch space.
        self.preprocessor = Preprocessor(classifier.preprocessor.plan)
        self.frame = np.full(self.FRAME, 127, dtype=np.uint8)
        self.out = self.preprocessor.new_buffer()
        self.asked: queue.SimpleQueue[bool] = queue.SimpleQueue()  # False: stop
        self.thread = threading.Thread(target=self._run, name="measure-prepare", daemon=True)

    def __enter__(self) -> _PrepareBeside:
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.asked.put(False)  # after every frame asked for
        self.thread.join(5)

    def next_frame(self) -> None:
        self.asked.put(True)

    def _run(self) -> None:
        while self.asked.get():
            self.preprocessor(self.frame, self.out)


def _try(
    section: PluginConfig,
    registry: Registry[Delegate],
    model: Path,
    crop: bool,
    info: ModelInfo,
) -> tuple[Measurement, Delegate | None, Classifier | None]:
    label = label_of(section)
    dump = section.model_dump(mode="json", exclude_defaults=True) | {"type": section.type}
    try:
        delegate: Delegate = registry.create(section)
        available = delegate.availability(model)
        if not available.ok:
            return Measurement(label, dump, False, available.reason), None, None
        return (
            Measurement(label, dump, True),
            delegate,
            load_checked(model, delegate, crop=crop, info=info),
        )
    except (ModelError, UserError, RuntimeError, ValueError, OSError) as exc:
        return Measurement(label, dump, False, str(exc).strip().splitlines()[0]), None, None


def choose(
    policy: str,
    sections: Sequence[PluginConfig],
    registry: Registry[Delegate],
    model: Path,
    model_sha256: str,
    budget_s: float = 5.0,
    cache_dir: Path | None = None,
    crop: bool = True,
    labels: Path | None = None,
) -> Choice:
    """Apply a policy to candidate sections; raises UserError when none works."""
    started = time.monotonic()
    info = read_model_info(model, labels)  # hashed once, not once per candidate
    if policy == "auto":
        choice = _auto(sections, registry, model, model_sha256, budget_s, cache_dir, crop, info)
    else:
        choice = _prefer(sections, registry, model, crop, info)
    if not choice.ranked:
        reasons = "; ".join(f"{m.label}: {m.reason}" for m in choice.table) or "no candidates"
        raise UserError(f"no delegate works for this model ({reasons})")
    choice.seconds = time.monotonic() - started
    return choice


def _prefer(
    sections: Sequence[PluginConfig],
    registry: Registry[Delegate],
    model: Path,
    crop: bool,
    info: ModelInfo,
) -> Choice:
    choice = Choice("prefer", [])
    for section in sections:
        row, delegate, classifier = _try(section, registry, model, crop, info)
        choice.table.append(row)
        if delegate is not None and classifier is not None:
            choice.ranked.append((row, delegate, classifier))
    return choice


def _cache_path(cache_dir: Path | None) -> Path | None:
    return cache_dir / "delegate-ranking.json" if cache_dir is not None else None


def _read_cache(path: Path | None, key: str) -> list[dict[str, Any]] | None:
    if path is None or not path.exists():
        return None
    try:
        data = loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    entry = data.get(key) if isinstance(data, dict) else None
    return entry if isinstance(entry, list) else None


def _write_cache(path: Path | None, key: str, table: list[Measurement]) -> None:
    if path is None:
        return
    try:
        data = loads(path.read_bytes()) if path.exists() else {}
        if not isinstance(data, dict):
            data = {}
    except (OSError, ValueError):
        data = {}
    data[key] = [asdict(m) for m in table]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, json.dumps(data, indent=1).encode())
    except OSError as exc:
        log.warning("delegate ranking not cached", error=str(exc))


def _auto(
    sections: Sequence[PluginConfig],
    registry: Registry[Delegate],
    model: Path,
    sha256: str,
    budget_s: float,
    cache_dir: Path | None,
    crop: bool,
    info: ModelInfo,
) -> Choice:
    # "loop": invokes timed beside the prepare stage's work; rankings measured otherwise
    # (bare invokes, before 2026-11-30) are not reused.
    key = f"{sha256}|{hardware_key()}|loop|" + "|".join(label_of(s) for s in sections)
    cache = _cache_path(cache_dir)
    cached = _read_cache(cache, key)
    by_label = {label_of(s): s for s in sections}
    if cached is not None:
        choice = Choice("auto", [Measurement(**row) for row in cached], from_cache=True)
        for row in choice.table:
            section = by_label.get(row.label)
            if not row.ok or section is None:
                continue
            _row, delegate, classifier = _try(section, registry, model, crop, info)
            if delegate is not None and classifier is not None:
                choice.ranked.append((row, delegate, classifier))
        if choice.ranked:
            return choice
    loaded = [_try(section, registry, model, crop, info) for section in sections]
    working = sum(1 for entry in loaded if entry[2] is not None)
    share = budget_s / max(1, working) * 0.8  # loading took part of the budget
    choice = Choice("auto", [row for row, _, _ in loaded])
    for row, delegate, classifier in loaded:
        if delegate is None or classifier is None:
            continue
        try:
            times = _time_invokes(classifier, share)
        except (RuntimeError, ValueError) as exc:
            row.ok, row.reason = False, f"invoke failed: {exc}"
            continue
        row.runs = len(times)
        row.median_ms = round(statistics.median(times), 3)
        row.p90_ms = round(float(np.percentile(times, 90)), 3)
        row.spread_ms = round(float(np.percentile(times, 75) - np.percentile(times, 25)), 3)
        choice.ranked.append((row, delegate, classifier))
    choice.ranked.sort(key=lambda entry: entry[0].median_ms or float("inf"))
    order = {id(row): i for i, (row, _, _) in enumerate(choice.ranked)}
    choice.table.sort(key=lambda row: (not row.ok, order.get(id(row), 1 << 30)))
    _write_cache(cache, key, choice.table)
    return choice
