"""Property tests: every parser fed from the network or disk either parses or raises its own
typed error, never anything else."""

from __future__ import annotations

import contextlib
import json
import string
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from edgefleet.config.agentconfig import load_config
from edgefleet.errors import ConfigError, ModelError
from edgefleet.inference.modelfile import read_packed
from edgefleet.plugin.manager import Plugins
from edgefleet.protocol import Ack
from edgefleet.rollout.release import ReleaseError, parse_manifest

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
