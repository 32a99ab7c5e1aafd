"""Capture on the device: which frames are kept, the budgets, and the pieces on the wire.

The link is faked at its port (``SampleLink``: ``enqueue`` and ``pending_bytes``); the loop,
classifier and frames are real (the factory model on the CPU).
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from edgefleet.capture import Capture, CaptureSettings
from edgefleet.capture.rules import Budget, triggers
from edgefleet.inference.classifier import Classifier
from edgefleet.inference.labels import Label
from edgefleet.protocol import SAMPLE_PIECE_BYTES, SamplePiece
from edgefleet.runtime.frames import Frame
from edgefleet.runtime.results import Result
from tests.mqtt_helpers import wait_for


class Link:
    def __init__(self, pending: int = 0) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []
        self.pending = pending

    def enqueue(self, kind: str, body: dict[str, Any]) -> None:
        self.sent.append((kind, body))

    def pending_bytes(self, kind: str) -> int:
        assert kind == "samples"
        return self.pending


class Loop:
    def __init__(self, classifier: Classifier) -> None:
        self.last_frame: Frame | None = None
        self._classifier = classifier

    @property
    def classifier(self) -> Classifier:
        return self._classifier


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _result(frame: int, scores: list[float], label: str = "tabby") -> Result:
    top = [Label(label if i == 0 else f"c{i}", i, s) for i, s in enumerate(scores)]
    return Result(0, "boot", 1.0, "lite0", 3, top, {}, frame)


def _settings(**changes: Any) -> CaptureSettings:
    base: dict[str, Any] = {
        "enabled": True, "below_score": None, "margin_below": None, "random_one_in": None,
        "min_interval_s": 0.0, "shadow_disagrees": False,
    }  # fmt: skip
    return CaptureSettings(**{**base, **changes})


def test_each_trigger_fires_on_its_own_condition() -> None:
    never = lambda: 0.99  # noqa: E731 - a draw that never samples
    always = lambda: 0.0  # noqa: E731
    cases = [
        (_settings(below_score=0.5), [0.4, 0.3], never, ["low_score"]),
        (_settings(below_score=0.5), [0.6, 0.1], never, []),
        (_settings(margin_below=0.1), [0.55, 0.5], never, ["small_margin"]),
        (_settings(margin_below=0.1), [0.7, 0.2], never, []),
        (_settings(watch=["tabby"]), [0.9, 0.1], never, ["watched"]),
        (_settings(watch=["goldfish"]), [0.9, 0.1], never, []),
        (_settings(random_one_in=100), [0.9, 0.1], always, ["random"]),
        (_settings(random_one_in=100), [0.9, 0.1], never, []),
        (_settings(below_score=0.5, margin_below=0.2), [0.45, 0.4], never,
         ["low_score", "small_margin"]),
    ]  # fmt: skip
    for settings, scores, draw, expected in cases:
        assert triggers(settings, _result(1, scores), draw) == expected, (settings, scores)


def test_random_one_in_n_keeps_about_one_in_n() -> None:
    import random

    rng = random.Random(7)
    settings = _settings(random_one_in=50)
    fired = sum(bool(triggers(settings, _result(i, [0.9, 0.1]), rng.random)) for i in range(20000))
    assert 300 < fired < 500  # 400 expected


def test_capture_with_every_trigger_off_is_refused() -> None:
    with pytest.raises(ValueError, match="every trigger is off"):
        _settings()


def test_budgets_hold_per_hour_spacing_and_per_day_across_a_restart(tmp_path: Path) -> None:
    clock = Clock()
    settings = _settings(random_one_in=1, per_hour=3, min_interval_s=5.0, mib_per_day=0.001)
    budget = Budget(settings, tmp_path / "b.json", clock=clock, day=lambda: "2026-12-07")
    assert budget.refusal() is None
    budget.claim()
    assert budget.refusal() == "spacing"
    for _ in range(2):
        clock.now += 6
        assert budget.refusal() is None
        budget.claim()
    clock.now += 6
    assert budget.refusal() == "per_hour"
    clock.now += 3600
    assert budget.refusal() is None
    budget.spend(1000)
    assert budget.fits_today(48)
    assert not budget.fits_today(49)
    budget.spend(100)
    assert budget.refusal() == "per_day"
    # Saved at most every ten minutes: the first spend was written, the second waits.
    crashed = Budget(settings, tmp_path / "b.json", clock=clock, day=lambda: "2026-12-07")
    assert crashed.day_bytes == 1000
    budget.save()  # a graceful stop
    again = Budget(settings, tmp_path / "b.json", clock=clock, day=lambda: "2026-12-07")
    assert again.day_bytes == 1100
    assert again.refusal() == "per_day"
    tomorrow = Budget(settings, tmp_path / "b.json", clock=clock, day=lambda: "2026-12-08")
    assert tomorrow.day_bytes == 0
    assert tomorrow.refusal() is None


def _photo(height: int, width: int) -> np.ndarray:
    ys, xs = np.mgrid[0:height, 0:width]
    image = np.stack([xs % 256, ys % 256, (xs + ys) % 256], axis=-1).astype(np.uint8)
    return np.ascontiguousarray(image)


def _joined(sent: list[tuple[str, dict[str, Any]]]) -> dict[str, bytes]:
    pieces: dict[str, dict[int, bytes]] = {}
    for kind, body in sent:
        assert kind == "samples"
        piece = SamplePiece.model_validate({
            **body, "device": "d", "boot_id": "b", "mseq": 1, "floor": 1, "ts": 1.0,
        })  # fmt: skip
        pieces.setdefault(piece.sample, {})[piece.piece] = base64.b64decode(piece.data)
    return {sha: b"".join(p[i] for i in sorted(p)) for sha, p in pieces.items()}


def test_a_kept_frame_is_the_model_view_in_pieces_with_its_hash(classifier: Classifier) -> None:
    loop, link = Loop(classifier), Link()
    capture = Capture(_settings(random_one_in=1), lambda: loop, link, None)
    capture.open({})
    try:
        image = _photo(480, 640)
        loop.last_frame = Frame(image, 7, 0.0)
        capture.emit(_result(7, [0.3, 0.2]))
        wait_for(lambda: capture.kept == 1, 10, "the frame encoded and queued")
    finally:
        capture.close()
    ((sha, data),) = _joined(link.sent).items()
    assert hashlib.sha256(data).hexdigest() == sha
    meta = link.sent[0][1]["meta"]
    assert meta["triggers"] == ["random"]
    assert meta["model"] == "lite0"
    stored = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert stored is not None
    # 224 / 0.875: the model's own centre crop of the stored picture is its input.
    assert stored.shape == (256, 256, 3) == (meta["height"], meta["width"], 3)
    # The centre square of the frame, not a squashed whole frame: compare to it, scaled.
    expected = cv2.resize(image[:, 80:560], (256, 256), interpolation=cv2.INTER_AREA)
    assert np.abs(stored[..., ::-1].astype(int) - expected).mean() < 6


def test_a_big_full_frame_goes_in_several_pieces(classifier: Classifier) -> None:
    loop, link = Loop(classifier), Link()
    capture = Capture(_settings(random_one_in=1, full_frame=True, jpeg_quality=100),
                      lambda: loop, link, None)  # fmt: skip
    capture.open({})
    try:
        rng = np.random.default_rng(1)
        loop.last_frame = Frame(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8), 1, 0.0)
        capture.emit(_result(1, [0.3, 0.2]))
        wait_for(lambda: capture.kept == 1, 10, "the frame queued")
    finally:
        capture.close()
    (data,) = _joined(link.sent).values()
    assert len(link.sent) == -(-len(data) // SAMPLE_PIECE_BYTES) > 1
    assert [b["piece"] for _, b in link.sent] == list(range(len(link.sent)))
    assert "meta" in link.sent[0][1]
    assert all("meta" not in b for _, b in link.sent[1:])
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert decoded is not None
    assert decoded.shape == (480, 640, 3)


def test_a_full_queue_refuses_new_samples_and_counts_them(classifier: Classifier) -> None:
    loop, link = Loop(classifier), Link(pending=16 * 1024 * 1024)
    capture = Capture(_settings(random_one_in=1), lambda: loop, link, None)
    capture.open({})
    try:
        loop.last_frame = Frame(_photo(240, 320), 1, 0.0)
        capture.emit(_result(1, [0.3, 0.2]))
        wait_for(lambda: capture.refused["queue_full"] == 1, 10, "the refusal")
    finally:
        capture.close()
    assert link.sent == []
    assert capture.kept == 0


def test_a_result_of_an_older_frame_keeps_nothing(classifier: Classifier) -> None:
    loop, link = Loop(classifier), Link()
    capture = Capture(_settings(random_one_in=1), lambda: loop, link, None)
    loop.last_frame = Frame(_photo(120, 160), 9, 0.0)
    capture.emit(_result(8, [0.3, 0.2]))  # the loop moved on to frame 9
    assert capture.kept == 0
    assert not capture._waiting


def test_a_shadow_disagreement_is_kept_with_the_candidate_answer(classifier: Classifier) -> None:
    loop, link = Loop(classifier), Link()
    capture = Capture(_settings(shadow_disagrees=True), lambda: loop, link, None)
    capture.open({})
    try:
        candidate = ("lite0-retrained", 4, [Label("tiger cat", 282, 0.8)])
        capture.on_shadow_disagreement(_photo(240, 320), _result(3, [0.6, 0.1]), candidate)
        wait_for(lambda: capture.kept == 1, 10, "the disagreement queued")
    finally:
        capture.close()
    meta = link.sent[0][1]["meta"]
    assert meta["triggers"] == ["shadow_disagrees"]
    assert meta["shadow"] == {
        "model": "lite0-retrained", "version": 4,
        "top": [{"label": "tiger cat", "index": 282, "score": 0.8}],
    }  # fmt: skip
    assert json.dumps(meta)  # what the link encodes
