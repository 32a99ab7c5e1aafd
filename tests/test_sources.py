"""Sources: images, video, synthetic, camera absence; latest-frame-wins; reopen on failure."""

from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from edgefleet.errors import SourceError
from edgefleet.runtime.backoff import Backoff
from edgefleet.runtime.frames import Frame, LatestSlot
from edgefleet.runtime.sources import EndOfStream, Source, ThreadedSource
from edgefleet_plugins.sources.camera import CameraConfig, CameraSource
from edgefleet_plugins.sources.images import ImagesConfig, ImagesSource
from edgefleet_plugins.sources.synthetic import SyntheticConfig, SyntheticSource
from edgefleet_plugins.sources.video import VideoConfig, VideoSource

FAST = Backoff(initial=0.02, maximum=0.05)


def _drain(source: Source, limit: float = 5.0) -> list[Frame]:
    frames: list[Frame] = []
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        frame = source.get(0.05)
        if frame is not None:
            frames.append(frame)
        elif source.ended:
            break
    return frames


def _write_images(folder: Path, count: int) -> list[Path]:
    paths = []
    for i in range(count):
        img = np.full((40, 50, 3), i * 20, dtype=np.uint8)
        path = folder / f"img{i:02d}.jpg"
        cv2.imwrite(str(path), img)
        paths.append(path)
    return paths


def test_latest_slot_keeps_newest_and_counts_drops() -> None:
    slot: LatestSlot[int] = LatestSlot()
    slot.put(1)
    slot.put(2)
    assert slot.put(3) == 2
    assert slot.take(0.01) == 3
    assert slot.take(0.01) is None
    assert (slot.stats.put, slot.stats.taken, slot.stats.dropped) == (3, 1, 2)


def test_images_once_in_order_then_ended(tmp_path: Path) -> None:
    _write_images(tmp_path, 4)
    source = ImagesSource(ImagesConfig(path=str(tmp_path), loop=False, fps=200))
    source.start()
    frames = _drain(source)
    source.stop()
    assert [f.origin for f in frames] == ["img00.jpg", "img01.jpg", "img02.jpg", "img03.jpg"]
    assert source.ended
    assert frames[0].image.shape == (40, 50, 3)
    assert frames[1].image[0, 0, 0] == pytest.approx(20, abs=2)


def test_images_are_never_dropped_for_a_slow_model(tmp_path: Path) -> None:
    """Files are meant to be classified, each of them: with loop false a file went missing
    under load (latest-wins dropped it before the consumer came back)."""
    _write_images(tmp_path, 6)
    source = ImagesSource(ImagesConfig(path=str(tmp_path), loop=False, fps=1000))
    source.start()
    frames: list[Frame] = []
    deadline = time.monotonic() + 20
    while not (source.ended and source.status().frames == len(frames)):
        assert time.monotonic() < deadline, [f.origin for f in frames]
        frame = source.get(0.05)
        if frame is not None:
            frames.append(frame)
            time.sleep(0.03)  # a model 30x slower than the source's pace
    source.stop()
    assert [f.origin for f in frames] == [f"img{i:02d}.jpg" for i in range(6)]
    assert source.status().dropped == 0


def test_images_glob_loop_skips_bad_files(tmp_path: Path) -> None:
    _write_images(tmp_path, 2)
    good = (tmp_path / "img00.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (tmp_path / "garbage.png").write_bytes(b"not an image at all")
    source = ImagesSource(ImagesConfig(path=str(tmp_path / "*"), loop=True, fps=200))
    source.start()
    seen: set[str] = set()
    deadline = time.monotonic() + 3
    while len(seen) < 2 and time.monotonic() < deadline:
        frame = source.get(0.1)
        if frame:
            seen.add(frame.origin)
    time.sleep(0.1)
    source.stop()
    assert seen == {"img00.jpg", "img01.jpg"}
    assert source.bad_files >= 2
    assert (
        "truncated JPEG" in source.status().last_error
        or "not a decodable" in source.status().last_error
    )


def test_images_empty_folder_retries(tmp_path: Path) -> None:
    source = ImagesSource(ImagesConfig(path=str(tmp_path), fps=100))
    source._backoff = FAST
    source.start()
    time.sleep(0.3)
    assert source.status().state in {"reconnecting", "opening"}
    assert source.status().errors >= 2
    _write_images(tmp_path, 1)  # the folder fills: the source recovers by itself
    frame = source.get(2.0)
    source.stop()
    assert frame is not None
    assert frame.origin == "img00.jpg"


def test_video_file_plays_and_ends(tmp_path: Path) -> None:
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), 25.0, (64, 48))
    for i in range(12):
        writer.write(np.full((48, 64, 3), (i * 20, 0, 255 - i * 20), dtype=np.uint8))
    writer.release()
    # As fast as consumed: a paced source drops frames for a consumer slower than its pace,
    # and a loaded test machine is sometimes slower than 2 ms per frame.
    source = VideoSource(VideoConfig(path=path, realtime=False))
    source.start()
    frames = _drain(source)
    source.stop()
    assert source.ended
    assert len(frames) == 12
    assert frames[0].image.shape == (48, 64, 3)
    # BGR (0, 0, 255) written: red in RGB.
    assert frames[0].image[10, 10, 0] > 200
    assert frames[0].image[10, 10, 2] < 50


def test_video_missing_file_retries_without_crashing(tmp_path: Path) -> None:
    source = VideoSource(VideoConfig(path=tmp_path / "none.mp4"))
    source._backoff = FAST
    source.start()
    time.sleep(0.2)
    status = source.status()
    source.stop()
    assert status.state in {"reconnecting", "opening"}
    assert "video file not found" in status.last_error


def test_synthetic_is_deterministic_and_bounded() -> None:
    def frames() -> list[np.ndarray]:
        source = SyntheticSource(SyntheticConfig(width=32, height=24, frames=5, variants=3))
        source.open()
        out = [source.read()[0].copy() for _ in range(5)]
        with pytest.raises(EndOfStream):
            source.read()
        return out

    first, second = frames(), frames()
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)
    assert first[0].shape == (24, 32, 3)
    assert not np.array_equal(first[0], first[1])
    np.testing.assert_array_equal(first[0], first[3])  # cycles through 3 variants


def test_synthetic_threaded_delivers_at_its_rate() -> None:
    source = SyntheticSource(SyntheticConfig(width=32, height=24, fps=100, frames=20))
    source.start()
    frames = _drain(source)
    source.stop()
    assert source.ended
    assert 15 <= len(frames) <= 20  # latest-wins may drop one or two under load
    assert frames[-1].index == 20


def test_missing_camera_retries_not_crash() -> None:
    source = CameraSource(CameraConfig(device="/dev/video-edgefleet-test-missing"))
    source._backoff = FAST
    source.start()
    time.sleep(0.3)
    status = source.status()
    assert source.get(0.05) is None
    source.stop()
    assert status.state == "reconnecting"
    assert status.errors >= 2
    assert "not present" in status.last_error
    assert not source.ended


class _FlakySource(ThreadedSource):
    """Delivers frames, 'loses the device' after 3, then works again after reopening."""

    def __init__(self) -> None:
        super().__init__("flaky", fps=200, backoff=FAST)
        self.opens = 0
        self.reads = 0

    def open(self) -> None:
        self.opens += 1

    def read(self) -> tuple[np.ndarray, str]:
        self.reads += 1
        if self.reads == 4:
            raise SourceError("device vanished")
        return np.zeros((8, 8, 3), dtype=np.uint8), f"r{self.reads}"


def test_source_reopens_after_losing_device() -> None:
    source = _FlakySource()
    source.start()
    got: list[str] = []
    deadline = time.monotonic() + 3
    while len(got) < 6 and time.monotonic() < deadline:
        frame = source.get(0.1)
        if frame:
            got.append(frame.origin)
    source.stop()
    assert source.opens >= 2
    assert source.status().errors == 1
    assert len(got) >= 6
