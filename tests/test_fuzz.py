"""Property tests: every parser fed from the network or disk either parses or raises its own
typed error, never anything else."""

from __future__ import annotations

import contextlib
import json
import string
import tempfile
from pathlib import Path
from typing import Any, cast

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from edgefleet.collector.collector import Collector, CollectorSettings
from edgefleet.config.agentconfig import load_config
from edgefleet.errors import ConfigError, ModelError, UserError
from edgefleet.inference.modelfile import read_packed
from edgefleet.mqtt.commands import CommandHandler
from edgefleet.mqtt.link import Incoming
from edgefleet.mqtt.reporter import ReportState
from edgefleet.mqtt.settings import ReportPolicy
from edgefleet.plugin.manager import Plugins
from edgefleet.protocol import Ack, FleetTopics
from edgefleet.rollout.manager import RolloutManager
from edgefleet.rollout.ports import ServingPort
from edgefleet.rollout.release import ReleaseError, parse_manifest
from edgefleet.rollout.settings import RolloutSettings
from edgefleet.runtime.pipeline import LoopSettings
from edgefleet.runtime.stats import LoopStats

from .fakes import RecordingLink

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=16),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5)
    ),
    max_leaves=16,
)
MANIFEST_KEYS = [
    "rollout_id",
    "name",
    "version",
    "created",
    "expires",
    "variants",
    "key_id",
    "signature",
    "rollback",
    "min_agent_version",
]


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=300),
        json_values.map(lambda v: json.dumps(v).encode()),
        st.dictionaries(st.sampled_from(MANIFEST_KEYS), json_values, max_size=10).map(
            lambda v: json.dumps(v).encode()
        ),
    )
)
def test_manifest_parser(payload: bytes) -> None:
    try:
        parse_manifest(payload)
    except ReleaseError as exc:
        assert str(exc)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()))
def test_ack_parser(payload: bytes) -> None:
    with contextlib.suppress(ValidationError):
        Ack.model_validate_json(payload)


yaml_text = st.text(
    alphabet=string.ascii_letters + string.digits + " :-[]{}\n#'\"!&*,.|>_", max_size=200
)
config_docs = st.dictionaries(
    st.sampled_from(
        [
            "device",
            "model",
            "source",
            "delegate",
            "sinks",
            "loop",
            "plugins",
            "logging",
            "state_dir",
            "junk",
        ]
    ),
    json_values,
    max_size=6,
).map(json.dumps)  # JSON is YAML: structured documents with wrong shapes


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.one_of(yaml_text, config_docs))
def test_config_loader(plugins: Plugins, text: str) -> None:
    try:
        load_config(None, plugins.registries, environ={}, text=text)
    except ConfigError as exc:
        assert exc.problems
        assert all(isinstance(p, str) and p for p in exc.problems)


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=400))
def test_model_file_reader(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.tflite"
        path.write_bytes(b"\x00\x00\x00\x00TFL3" + data)
        try:
            read_packed(path)
        except ModelError as exc:
            assert str(exc)


# -- hostile input: every handler of network input records a typed rejection or succeeds ------
hostile = st.one_of(
    st.integers(1, 5000).map(lambda n: b"[" * n),
    st.integers(1, 300).map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
    st.sampled_from(
        [
            b'{"x": NaN}',
            b'{"fps_cap": Infinity}',
            b'{"mseq": 1e999}',
            b'{"boot_id": "b", "mseq": 99999999999999999999999999999, "floor": 1}',
            b'{"boot_id": "b", "mseq": -1, "floor": 0}',
            b'{"boot_id": ["b"], "mseq": true}',
        ]
    ),
    st.binary(max_size=64).map(lambda b: b"\xff\xfe" + b),
    st.text(max_size=3).map(lambda s: json.dumps({"name": s * 20_000}).encode()),
    json_values.map(lambda v: json.dumps(v).encode()),
)


@settings(max_examples=300, deadline=None)
@given(hostile)
def test_manifest_parser_refuses_hostile_input(payload: bytes) -> None:
    try:
        manifest = parse_manifest(payload)
    except ReleaseError as exc:
        assert str(exc)
    else:
        assert manifest.variants  # only a complete manifest gets through


@settings(max_examples=300, deadline=None)
@given(hostile | st.binary(max_size=200))
def test_ack_parser_refuses_hostile_input(payload: bytes) -> None:
    try:
        ack = Ack.model_validate_json(payload)
    except ValidationError:
        return
    assert isinstance(ack.boot_id, str)
    assert 1 <= len(ack.boot_id) <= 64
    assert isinstance(ack.mseq, int)
    assert ack.mseq >= 0


class _Loop:
    def __init__(self) -> None:
        self.settings = LoopSettings()
        self.stats = LoopStats()
        self.last_frame = None
        self.last_result = None


class _Agent:
    def __init__(self) -> None:
        self.pipeline = _Loop()

    def reload_settings(self) -> dict[str, Any]:
        raise UserError("the agent was not started from a config file")


@settings(max_examples=300, deadline=None)
@given(
    name=st.sampled_from(["ping", "pause", "resume", "set", "reload", "snapshot", "x", ""]),
    payload=hostile,
)
def test_commands_answer_hostile_input_once(name: str, payload: bytes) -> None:
    handler = CommandHandler(_Agent(), ReportState(ReportPolicy()))
    reply = handler.execute(name, payload)
    assert isinstance(reply["ok"], bool)
    assert reply["ok"] or reply["error"]
    json.dumps(reply)  # the reply itself is always sendable


@settings(max_examples=200, deadline=None)
@given(payload=hostile, chunk_index=st.text(max_size=8))
def test_rollout_handler_records_a_state_for_hostile_input(
    payload: bytes, chunk_index: str
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        link = RecordingLink()
        topics = FleetTopics().device("dev-1")
        manager = RolloutManager(
            cast("ServingPort", object()),  # never reached: nothing hostile gets that far
            LoopStats(),
            link,
            RolloutSettings(trusted_keys={}),
            Path(tmp),
            topics,
            [],
        )
        manager._handle(Incoming(topics.desired, payload, None, None))
        manager._handle(Incoming(f"edgefleet/v1/models/m/1/cpu/{chunk_index}", payload, None, None))
        manager._tick()
        states = link.states(topics.rollout)
        assert states
        assert states[-1]["state"] == "failed"
        assert states[-1]["reason"]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(hostile, min_size=1, max_size=5))
def test_collector_stores_the_good_beside_hostile_messages(payloads: list[bytes]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        collector = Collector(
            CollectorSettings(broker="mqtt://127.0.0.1:1", db=f"sqlite:///{tmp}/f.db")
        )
        collector.client.publish = lambda *_a, **_k: None  # type: ignore[method-assign,assignment]
        good = {"boot_id": "b0", "mseq": 1, "floor": 1, "ts": 1.0, "results": []}
        topic = "edgefleet/v1/devices/d/metrics"
        batch = [(topic, p) for p in payloads] + [(topic, json.dumps(good).encode())]
        collector._store_batch(batch)
        cur = collector.store.cursor()
        cur.execute("SELECT count(*) FROM messages WHERE boot_id = 'b0' AND kind = 'metrics'")
        assert cur.fetchone()[0] == 1
        collector.store.close()
