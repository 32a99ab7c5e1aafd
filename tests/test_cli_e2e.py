"""The CLI end to end: `run` for 5 s then SIGTERM; bad inputs get one clear line."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from .conftest import cli_command


def _wait_for_lines(path: Path, count: int, limit: float) -> list[str]:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if path.exists():
            lines = path.read_text().splitlines()
            if len(lines) >= count:
                return lines
        time.sleep(0.1)
    raise AssertionError(f"fewer than {count} lines in {path} after {limit}s")


def test_run_produces_results_and_stops_on_sigterm(tmp_path: Path) -> None:
    out = tmp_path / "results.jsonl"
    config = tmp_path / "agent.yaml"
    config.write_text(
        "device: {id: e2e-1}\n"
        "source: {type: synthetic, fps: 20}\n"
        f"sinks: [{{type: jsonl, path: '{out}', flush_interval_s: 0}}]\n"
        f"state_dir: '{tmp_path}/state'\n"
        "logging: {format: json}\n"
    )
    proc = subprocess.Popen(
        cli_command("run", "-c", str(config)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for_lines(out, 1, 20)
        time.sleep(5)
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=10)
        stop_s = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    assert stop_s < 2.5
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(results) >= 50  # 20 fps for 5 s, minus start-up
    assert [r["seq"] for r in results] == list(range(1, len(results) + 1))
    logs = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    events = [entry["event"] for entry in logs]
    assert "agent running" in events
    assert "agent stopped" in events
    assert all(entry["device_id"] == "e2e-1" for entry in logs if "device_id" in entry)
    stopped = next(e for e in logs if e["event"] == "agent stopped")
    assert stopped["model_version"] == 0


def _run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cli_command(*args), capture_output=True, text=True, timeout=timeout, check=False
    )


def test_run_with_corrupt_model_fails_clearly(tmp_path: Path) -> None:
    model = tmp_path / "model.tflite"
    model.write_bytes(b"\x00" * 4 + b"TFL3" + b"\x01" * 200)
    config = tmp_path / "agent.yaml"
    config.write_text(f"model: {{path: '{model}'}}\nsource: {{type: synthetic}}\n")
    proc = _run("run", "-c", str(config), "--duration", "1")
    assert proc.returncode == 2
    assert f"error: {model}: cannot load model" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "model file not found"),
        (b"PK\x03\x04 definitely a zip, not a model", "not a TFLite model"),
    ],
)
def test_run_with_missing_or_foreign_model(
    tmp_path: Path, content: bytes | None, message: str
) -> None:
    model = tmp_path / "model.tflite"
    if content is not None:
        model.write_bytes(content)
    config = tmp_path / "agent.yaml"
    config.write_text(f"model: {{path: '{model}'}}\nsource: {{type: synthetic}}\n")
    proc = _run("run", "-c", str(config), "--duration", "1")
    assert proc.returncode == 2
    assert message in proc.stderr
    assert proc.stderr.count("\n") <= 3 + proc.stderr.count('"event"')


def test_run_with_invalid_config(tmp_path: Path) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text("source:\n  type: camera\n  device: 0\n  exposure: 3\n")
    proc = _run("run", "-c", str(config))
    assert proc.returncode == 2
    expected = f"error: {config}:4: source.exposure: Extra inputs are not permitted"
    assert proc.stderr.strip() == expected


def test_run_ends_when_finite_input_ends(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        cv2.imwrite(str(photos / f"p{i}.jpg"), np.full((60, 80, 3), 40 * i, dtype=np.uint8))
    config = tmp_path / "agent.yaml"
    config.write_text(
        f"source: {{type: images, path: '{photos}', loop: false, fps: 20}}\n"
        "sinks: [{type: stdout, flush_interval_s: 0}]\n"
    )
    proc = _run("run", "-c", str(config))
    assert proc.returncode == 0, proc.stderr
    origins = [json.loads(line)["origin"] for line in proc.stdout.splitlines()]
    assert origins == ["p0.jpg", "p1.jpg", "p2.jpg"]


def test_classify_reports_bad_images_and_continues(tmp_path: Path) -> None:
    good = tmp_path / "good.jpg"
    cv2.imwrite(str(good), np.full((60, 80, 3), 128, dtype=np.uint8))
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(good.read_bytes()[:200])
    proc = _run("classify", str(truncated), str(good), str(tmp_path / "missing.jpg"))
    assert proc.returncode == 1
    assert [json.loads(line)["input"] for line in proc.stdout.splitlines()] == [str(good)]
    assert f"error: {truncated}: truncated JPEG" in proc.stderr
    assert "missing.jpg: cannot read: No such file or directory" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_classify_video(tmp_path: Path) -> None:
    clip = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter.fourcc(*"MJPG"), 10.0, (96, 72))
    for i in range(6):
        writer.write(np.full((72, 96, 3), 30 * i, dtype=np.uint8))
    writer.release()
    proc = _run("classify", "--every", "2", "--top-k", "1", str(clip))
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["frame"] for r in records] == [0, 2, 4]
    assert all(len(r["top"]) == 1 for r in records)


def test_demo_runs(tmp_path: Path) -> None:
    proc = _run("demo", "--duration", "2")
    assert proc.returncode == 0, proc.stderr
    assert "espresso" in proc.stdout or "tiger cat" in proc.stdout or "missile" in proc.stdout


def test_the_demo_shows_its_device_on_the_fleet_page(tmp_path: Path) -> None:
    """`./dev demo` opens the fleet page too: the demo device appears online there."""
    import urllib.request

    from .mqtt_helpers import free_port, wait_for

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgefleet", "demo", "--http", f"127.0.0.1:{port}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:

        def online() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/fleet", timeout=2) as r:
                    rows = json.loads(r.read())["devices"]
            except OSError:
                return False
            return any(row["device"] == "demo-device" and row["state"] == "online" for row in rows)

        wait_for(online, 60, "the demo device online on the fleet page")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as page:
            assert b"<table" in page.read()
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    assert f"fleet page: http://127.0.0.1:{port}/" in out


def test_help_for_every_command() -> None:
    for command in ("run", "check-config", "plugins", "classify", "demo", "schema"):
        proc = _run(command, "--help")
        assert proc.returncode == 0
        assert "usage: edgefleet" in proc.stdout


def test_run_never_loads_rich(tmp_path: Path) -> None:
    """The daemon logs JSON and draws nothing: rich (and pygments, which it pulls in) stay
    out of its memory (bench/imports.py); `top` and the console sink, which draw with rich,
    are tested where they draw (test_dashboard.py, test_bad_input.py)."""
    config = tmp_path / "agent.yaml"
    config.write_text(
        "source: {type: synthetic, fps: 50, frames: 5}\n"
        f"sinks: [{{type: jsonl, path: '{tmp_path / 'r.jsonl'}', flush_interval_s: 0}}]\n"
        f"state_dir: '{tmp_path}'\n"
    )
    probe = (
        "import sys; from edgefleet.cli import main; code = main(['run', '-c', sys.argv[1]]); "
        "print(code, sorted({m.split('.')[0] for m in sys.modules} & {'rich', 'pygments'}))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe, str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.stdout.splitlines()[-1] == "0 []", proc.stdout + proc.stderr
    assert len((tmp_path / "r.jsonl").read_text().splitlines()) == 5
