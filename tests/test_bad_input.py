"""What a new user types wrong: one line, exit 2, no traceback; and what a user sees."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from edgefleet.errors import ConfigError
from edgefleet.plugin.manager import Plugins

from .conftest import REPO, cli_command

SAMPLES = REPO / "agent" / "samples"


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cli_command(*args),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["classify", "--threads", "0", "x.jpg"], "argument --threads: '0' must be between"),
        (["classify", "clip.mp4", "--every", "0"], "argument --every: '0' must be at least 1"),
        (["classify", "--every", "-5", "x"], "argument --every: '-5' must be at least 1"),
        (["classify", "--top-k", "0", "x"], "argument --top-k: '0' must be between 1 and 100"),
        (["classify", "--top-k", "-2", "x"], "argument --top-k: '-2' must be between 1 and 100"),
        (["bench", "/nope.tflite"], "error: /nope.tflite: no such model file"),
        (["bench", "--candidates", "notjson"], "error: --candidates is not JSON"),
        (
            ["bench", "--candidates", '[{"type":"cpu","threads":0}]'],
            "error: --candidates[0].threads: Input should be greater than or equal to 1",
        ),
        (["bench", "--budget", "-1"], "argument --budget: '-1' must be greater than 0"),
        (
            ["schema", "--out", "/nonexistent/dir/x.json"],
            "error: --out /nonexistent/dir/x.json: No such file or directory",
        ),
        (
            ["collect", "--broker", "mqtt://127.0.0.1:9", "--db", "sqlite:////nonexistent/d/x.db"],
            "error: database /nonexistent/d/x.db: folder /nonexistent/d does not exist",
        ),
    ],
)
def test_one_line_exit_2_no_traceback(args: list[str], message: str) -> None:
    proc = _run(*args)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert message in proc.stderr.strip().splitlines()[-1], proc.stderr
    assert not Path("/nonexistent").exists()


def test_top_says_a_refused_broker_at_once() -> None:
    """It waited out its 10 s timeout before; a refused connection is known at once."""
    import socket

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = _run("top", "--broker", f"mqtt://127.0.0.1:{port}", "--once")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        (
            f"error: cannot reach the broker at mqtt://127.0.0.1:{port}: no broker accepts a "
            f"connection (127.0.0.1:{port})"
        )
    ]


def test_classify_says_what_is_wrong_with_each_input(tmp_path: Path) -> None:
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "notes.jpg").write_text("shopping list\n")
    cut = (SAMPLES / "coffee.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(cut[: len(cut) // 2])
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "red.gif")
    proc = _run("classify", str(tmp_path))
    assert proc.returncode == 1  # some inputs failed; the others were classified
    errors = sorted(line for line in proc.stderr.splitlines() if line.startswith("error:"))
    assert errors == [
        f"error: {tmp_path / 'cut.jpg'}: truncated JPEG (no end-of-image marker)",
        f"error: {tmp_path / 'empty.jpg'}: empty file",
        f"error: {tmp_path / 'notes.jpg'}: not a decodable image (text)",
    ]
    assert "red.gif" in proc.stdout  # a folder scan takes GIFs, as naming one does
    assert "INFO:" not in proc.stderr  # the runtime's chatter stays out of the terminal


def test_a_labels_file_that_does_not_fit_is_named() -> None:
    readme = REPO / "README.md"
    count = sum(1 for line in readme.read_text().splitlines() if line.strip())
    proc = _run("classify", "--labels", str(readme), str(SAMPLES / "coffee.jpg"))
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"error: {readme}: {count} labels, but the model efficientnet-lite0-int8.tflite "
        "has 1000 output classes"
    )


def test_nested_plugin_sections_are_checked(plugins: Plugins, tmp_path: Path) -> None:
    from edgefleet.config.agentconfig import load_config

    cases = {
        "source:\n  type: auto\n  fallback:\n    type: synthetic\n    fps: 0\n": (
            "agent.yaml:5: source.fallback.fps: Input should be greater than 0"
        ),
        "source: {type: auto, fallback: {type: nosuch}}\n": (
            "agent.yaml:1: source.fallback.type: unknown source type 'nosuch'"
        ),
        "source: {type: auto, fallback: {type: auto}}\n": (
            "agent.yaml:1: source.fallback: cannot nest itself"
        ),
    }
    for text, expected in cases.items():
        path = tmp_path / "agent.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError) as info:
            load_config(path, plugins.registries, environ={})
        problems = [p.replace(str(tmp_path) + "/", "") for p in info.value.problems]
        assert problems[0].startswith(expected), problems
    path.write_text(next(iter(cases)))
    proc = _run("check-config", str(path))
    assert proc.returncode == 2  # what check-config calls ok, run starts


def test_a_mistyped_override_names_the_variable(plugins: Plugins, tmp_path: Path) -> None:
    from edgefleet.config.agentconfig import load_config

    path = tmp_path / "agent.yaml"
    path.write_text("model: {top_k: 3}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, plugins.registries, environ={"EDGEFLEET_MODLE__TOP_K": "3"})
    assert info.value.problems == [
        "environment EDGEFLEET_MODLE__TOP_K: modle: Extra inputs are not permitted"
    ]


def test_blocking_an_unknown_plugin_warns(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text("plugins: {block: [nosuchplugin]}\nsource: {type: synthetic}\n")
    proc = _run("check-config", str(path))
    assert proc.returncode == 0
    assert proc.stderr.strip() == (
        "warning: plugins.block: no installed plugin is called 'nosuchplugin'"
    )


def test_plugins_say_what_works_here() -> None:
    proc = _run("plugins")
    assert proc.returncode == 0
    flat = " ".join(proc.stdout.split())
    assert "cpu: available" in flat
    # No EdgeTPU here: the row says so and why (the table may wrap the words).
    row = next(line for line in proc.stdout.splitlines() if "│ edgetpu" in line)
    assert "edgetpu:" in row
    assert "libedgetpu.so.1" in flat


def test_the_console_sink_shows_readable_lines(tmp_path: Path) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text(
        f"source: {{type: images, path: '{SAMPLES}', loop: false, fps: null}}\n"
        "sinks: [{type: console}]\n"
        f"state_dir: '{tmp_path}'\nlogging: {{level: error}}\n"
    )
    proc = _run("run", "-c", str(config))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("edgefleet ")
    coffee = next(line for line in lines if "coffee.jpg" in line)
    assert "espresso" in coffee
    assert "efficientnet-lite0 v0" in coffee


def test_demo_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    """Ctrl-C reaches the whole process group; the agent stops before its private broker."""
    proc = subprocess.Popen(
        cli_command("demo"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        seen: list[str] = []
        deadline = time.monotonic() + 60
        # Results have come back through the broker: the agent runs, its handlers are set.
        while time.monotonic() < deadline and sum("demo-device #" in s for s in seen) < 2:
            seen.append(proc.stdout.readline())
        os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
        rest, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    output = "".join(seen) + rest
    assert proc.returncode == 0, output
    assert "link down" not in output
    assert "disconnected" not in output
    assert "Traceback" not in output
    assert "collector stored" in output


def test_collect_says_what_it_does(tmp_path: Path) -> None:
    db = tmp_path / "fleet.db"
    proc = subprocess.Popen(
        cli_command("collect", "--broker", "mqtt://127.0.0.1:9", "--db", f"sqlite:///{db}"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(4)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    lines = out.splitlines()
    assert lines[0] == f"collector: broker mqtt://127.0.0.1:9, storing into sqlite:///{db}"
    assert "collector: cannot reach 127.0.0.1:9 (1 attempts); retrying every 1-10 s" in lines
    assert lines[-1] == "collector stopped: 0 messages stored, 0 rejected"


PUBLISH = ["rollout", "publish", "m.tflite", "--name", "a", "--version", "1",
           "--target", "device:x", "--key", "k"]  # fmt: skip


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--http", "8080"], "error: --http '8080': use HOST:PORT"),
        (["--http", "0.0.0.0:0"], "binding beyond loopback needs --http-token-file"),
        (["--broker", "mqtt://a,mqtts://b"], "use mqtt:// for all of them or mqtts://"),
        (["--alert-webhook", "ftp://x"], "error: --alert-webhook 'ftp://x': use http://"),
        (["--alert-label", "person"], "error: --alert-label needs --alert-webhook URL"),
        (["--alert-label", "x:2"], "argument --alert-label: 'x:2': the score after ':'"),
    ],
)
def test_bad_collector_options_open_no_database(
    tmp_path: Path, args: list[str], message: str
) -> None:
    db = tmp_path / "fleet.db"
    command = ["collect", "--broker", "mqtt://127.0.0.1:9", "--db", f"sqlite:///{db}"]
    proc = _run(*command, *args)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert message in proc.stderr.strip().splitlines()[-1], proc.stderr
    assert not db.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--shadow", "0"], "argument --shadow: '0' must be between 1 and 100000"),
        (["--shadow", "5", "--shadow-interval", "0.01"], "error: --shadow-interval: Input"),
        (["--shadow", "5", "--min-agreement", "2"], "argument --min-agreement: '2' must be"),
        (["--manual"], "error: --manual, --min-agreement and --max-latency-ratio need --shadow N"),
    ],
)
def test_bad_shadow_options_name_the_option(args: list[str], message: str) -> None:
    proc = _run(*PUBLISH, *args)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert message in proc.stderr.strip().splitlines()[-1], proc.stderr


@pytest.mark.parametrize(
    "command",
    [
        ["collect", "--broker", "mqtt://127.0.0.1:9"],
        ["rollout", "status", "--broker", "mqtt://127.0.0.1:9"],
        ["simulate", "--devices", "1", "--broker", "mqtt://127.0.0.1:9"],
        ["top", "--broker", "mqtt://127.0.0.1:9", "--once"],
    ],
)
def test_every_fleet_command_reads_its_login_alike(command: list[str], tmp_path: Path) -> None:
    """The login flags are declared and read in one place: the same flags, the same error."""
    missing = tmp_path / "no-such.secret"
    proc = _run(*command, "--username", "op", "--password-file", str(missing), "--ca", "ca.pem")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert f"error: --password-file {missing}: No such file or directory" in last, proc.stderr
