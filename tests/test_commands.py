"""Remote commands: every field bound, every refusal, exactly one reply for anything."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgefleet.errors import UserError
from edgefleet.mqtt.commands import CommandHandler
from edgefleet.mqtt.reporter import ReportState
from edgefleet.mqtt.settings import ReportPolicy
from edgefleet.runtime.pipeline import LoopSettings


class _FakeStats:
    inferences = 3

    def fps(self) -> float:
        return 1.23456


class _FakeAgent:
    """The AgentControl port: a loop, and a reload that cannot find a config file."""

    def __init__(self) -> None:
        self.pipeline: SimpleNamespace | None = SimpleNamespace(
            settings=LoopSettings(), stats=_FakeStats(), last_frame=None, last_result=None
        )

    def reload_settings(self) -> dict[str, Any]:
        raise UserError("the agent was not started from a config file")


def _handler() -> CommandHandler:
    return CommandHandler(_FakeAgent(), ReportState(ReportPolicy()), max_bytes=4096)


def test_set_changes_settings_and_report() -> None:
    handler = _handler()
    reply = handler.execute(
        "set", json.dumps({"top_k": 3, "fps_cap": 0, "report": {"mode": "change"}}).encode()
    )
    assert reply["ok"] is True
    assert reply["result"]["top_k"] == 3
    assert reply["result"]["fps_cap"] is None
    assert reply["result"]["report"]["mode"] == "change"
    bad = handler.execute("set", b'{"report": {"mode": "sometimes"}}')
    assert bad["ok"] is False
    assert bad["error"].startswith("report.mode: Input should be")
    empty = handler.execute("set", b"{}")
    assert empty == {
        "command": "set",
        "ok": False,
        "error": "nothing to set (fps_cap, top_k, threshold, report)",
    }
    snap = handler.execute("snapshot", b"")
    assert snap["error"] == "no frame has been classified yet"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(
    name=st.sampled_from(["ping", "pause", "resume", "set", "reload", "snapshot", "nope", ""]),
    payload=st.one_of(st.binary(max_size=200), json_values.map(lambda v: json.dumps(v).encode())),
)
def test_any_command_payload_gets_a_reply_never_an_exception(name: str, payload: bytes) -> None:
    reply: dict[str, Any] = _handler().execute(name, payload)
    assert reply["command"] == name
    assert isinstance(reply["ok"], bool)
    assert reply["ok"] or (isinstance(reply["error"], str) and reply["error"])


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        (b'{"fps_cap": 1e-10}', "fps_cap: Value error, must be 0 (no cap) or at least 0.001"),
        (b'{"fps_cap": 5000}', "fps_cap: Input should be less than or equal to 1000"),
        (b'{"top_k": 0}', "top_k: Input should be greater than or equal to 1"),
        (b'{"threshold": 1.5}', "threshold: Input should be less than or equal to 1"),
        (b'{"fps_cap": NaN}', "payload is not JSON: NaN is not a JSON number"),
        (b"[" * 4_000, "payload is not JSON: JSON nested deeper than 32 levels"),
    ],
)
def test_set_refuses_what_the_config_refuses(payload: bytes, error: str) -> None:
    handler = _handler()
    reply = handler.execute("set", payload)
    assert reply["ok"] is False
    assert reply["error"] == error
    assert handler.agent.pipeline is not None
    assert handler.agent.pipeline.settings.fps_cap is None  # nothing applied


# -- every bound on both sides; the refusals that need no loop ---------------------------------
@pytest.mark.parametrize(
    ("name", "payload", "ok"),
    [
        ("set", {"top_k": 1}, True),
        ("set", {"top_k": 100}, True),
        ("set", {"top_k": 0}, False),
        ("set", {"top_k": 101}, False),
        ("set", {"threshold": 0}, True),
        ("set", {"threshold": 1}, True),
        ("set", {"threshold": -0.01}, False),
        ("set", {"threshold": 1.01}, False),
        ("set", {"fps_cap": 0}, True),
        ("set", {"fps_cap": 0.001}, True),
        ("set", {"fps_cap": 0.0009}, False),
        ("set", {"fps_cap": 1000}, True),
        ("set", {"fps_cap": 1000.5}, False),
        ("set", {"fps_cap": -1}, False),
        ("snapshot", {"quality": 10}, True),
        ("snapshot", {"quality": 9}, False),
        ("snapshot", {"quality": 95}, True),
        ("snapshot", {"quality": 96}, False),
        ("snapshot", {"max_side": 32}, True),
        ("snapshot", {"max_side": 31}, False),
        ("snapshot", {"max_side": 4096}, True),
        ("snapshot", {"max_side": 4097}, False),
        ("ping", {"request_id": "a" * 64}, True),
        ("ping", {"request_id": "a" * 65}, False),
        ("ping", {"request_id": "bad id"}, False),
        ("ping", {"surprise": 1}, False),
    ],
)
def test_bounds_on_both_sides(name: str, payload: dict[str, Any], ok: bool) -> None:
    handler = _handler()
    reply = handler.execute(name, json.dumps(payload).encode())
    field = next(iter(payload))
    if name == "snapshot":
        # No frame yet: within bounds it is refused for that alone, never for the argument.
        if ok:
            assert reply["error"] == "no frame has been classified yet"
        else:
            assert reply["error"].startswith(f"{field}: Input should be"), reply
    else:
        assert reply["ok"] is ok, reply
        if not ok:
            assert reply["error"].startswith(field), reply


def test_set_applies_exactly_what_was_asked() -> None:
    handler = _handler()
    loop = handler.agent.pipeline
    assert loop is not None
    reply = handler.execute("set", b'{"fps_cap": 2.5, "threshold": 0.3}')
    assert reply["result"] == {"fps_cap": 2.5, "threshold": 0.3}
    assert (loop.settings.fps_cap, loop.settings.threshold, loop.settings.top_k) == (2.5, 0.3, 5)
    assert handler.execute("set", b'{"fps_cap": 0}')["result"] == {"fps_cap": None}
    assert loop.settings.fps_cap is None
    nothing = handler.execute("set", b"{}")
    assert nothing["error"] == "nothing to set (fps_cap, top_k, threshold, report)"


def test_pause_resume_and_ping() -> None:
    handler = _handler()
    loop = handler.agent.pipeline
    assert loop is not None
    assert handler.execute("pause", b"")["result"] == {"paused": True}
    assert loop.settings.paused is True
    assert handler.execute("ping", b"")["result"]["paused"] is True
    assert handler.execute("resume", b"")["result"] == {"paused": False}
    assert loop.settings.paused is False


def test_the_size_cap_on_both_sides() -> None:
    handler = CommandHandler(_FakeAgent(), ReportState(ReportPolicy()), max_bytes=64)
    at_cap = b'{"request_id": "x"' + b" " * (64 - 19) + b"}"
    assert len(at_cap) == 64
    assert handler.execute("ping", at_cap)["ok"] is True
    over = handler.execute("ping", at_cap + b" ")
    assert over["error"] == "payload of 65 bytes exceeds 64"


def test_without_a_loop_every_command_says_so() -> None:
    class _NoLoop(_FakeAgent):
        def __init__(self) -> None:
            self.pipeline = None

    handler = CommandHandler(_NoLoop(), ReportState(ReportPolicy()))
    for name in ("ping", "pause", "resume", "set", "snapshot"):
        reply = handler.execute(name, b'{"top_k": 3}' if name == "set" else b"")
        assert reply == {
            "command": name,
            "ok": False,
            "error": "the classification loop is not running",
        }


def test_unknown_and_malformed_commands() -> None:
    handler = _handler()
    unknown = handler.execute("explode", b'{"request_id": "r-1"}')
    assert unknown["error"].startswith("unknown command 'explode' (known: pause, ping, reload")
    assert unknown["request_id"] == "r-1"  # the reply still finds its asker
    assert handler.execute("ping", b"[1, 2]")["error"] == "payload must be a JSON object"
    assert handler.execute("ping", b"\xff")["error"].startswith("payload is not JSON")
    assert handler.execute("ping", b"  ")["ok"] is True  # an empty payload is no arguments
    reload = handler.execute("reload", b"")
    assert reload["error"] == "the agent was not started from a config file"


def _with_frame(width: int = 1000, height: int = 500) -> CommandHandler:
    from edgefleet.runtime.frames import Frame
    from edgefleet.runtime.results import Label, Result

    agent = _FakeAgent()
    loop = agent.pipeline
    assert loop is not None
    gradient = np.linspace(0, 255, width * height * 3).reshape(height, width, 3)
    loop.last_frame = Frame(gradient.astype(np.uint8), 41, 0.0, "cam0")
    loop.last_result = Result(
        seq=9, boot_id="b", ts=1.0, model="m", model_version=3,
        top=[Label("cat", 1, 0.9)], timings_ms={}, frame=41,
    )  # fmt: skip
    return CommandHandler(agent, ReportState(ReportPolicy()))


def test_snapshot_scales_encodes_and_names_its_frame() -> None:
    import base64

    import cv2

    handler = _with_frame()
    reply = handler.execute("snapshot", b'{"max_side": 100, "quality": 50}')
    result = reply["result"]
    assert (result["width"], result["height"], result["frame"], result["origin"]) == (
        100, 50, 41, "cam0",
    )  # fmt: skip
    assert result["result"]["seq"] == 9
    jpeg = base64.b64decode(result["jpeg_base64"])
    decoded = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert decoded is not None
    assert decoded.shape == (50, 100, 3)
    small = handler.execute("snapshot", b'{"max_side": 2000}')["result"]
    assert (small["width"], small["height"]) == (1000, 500)  # never enlarged


def test_snapshot_defaults() -> None:
    handler = _with_frame()
    default = handler.execute("snapshot", b"")["result"]
    explicit = handler.execute("snapshot", b'{"max_side": 640, "quality": 80}')["result"]
    assert (default["width"], default["height"]) == (640, 320)
    assert default["jpeg_base64"] == explicit["jpeg_base64"]  # quality 80 by default


def test_ping_reports_the_loop() -> None:
    result = _handler().execute("ping", b"")["result"]
    assert result["fps"] == 1.23
    assert result["inferences"] == 3
    assert result["paused"] is False


def test_report_arguments_refuse_unknown_keys() -> None:
    reply = _handler().execute("set", b'{"report": {"mode": "every", "bogus": 1}}')
    assert reply["error"] == "report.bogus: Extra inputs are not permitted"


def test_default_size_cap_is_64_kib_and_request_ids_are_generated() -> None:
    handler = CommandHandler(_FakeAgent(), ReportState(ReportPolicy()))
    assert handler.max_bytes == 64 * 1024
    at_cap = b'{"request_id": "r"' + b" " * (64 * 1024 - 19) + b"}"
    assert handler.execute("ping", at_cap)["ok"] is True
    assert handler.execute("ping", at_cap + b" ")["ok"] is False
    generated = CommandHandler.request_id({})
    assert len(generated) == 12
    assert CommandHandler.request_id({"request_id": "given"}) == "given"


def test_snapshot_never_enlarges_and_says_when_encoding_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    handler = _with_frame()
    same = handler.execute("snapshot", b'{"max_side": 1500}')["result"]
    assert (same["width"], same["height"]) == (1000, 500)
    monkeypatch.setattr("cv2.imencode", lambda *_a, **_k: (False, None))
    assert handler.execute("snapshot", b"")["error"] == "JPEG encoding failed"
