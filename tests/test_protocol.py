"""docs/protocol.md: every example validates against its message's JSON schema."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from edgefleet.protocol import MESSAGE_MODELS, Topics

from .conftest import REPO

EXAMPLE = re.compile(r"<!-- message: (\w+) -->\s*```json\n(.*?)```", re.DOTALL)


def _examples() -> list[tuple[str, str]]:
    return EXAMPLE.findall((REPO / "docs" / "protocol.md").read_text())


def test_every_message_kind_has_an_example() -> None:
    kinds = {kind for kind, _ in _examples()}
    assert kinds == {"Status", "Predictions", "Metrics", "Reply", "Ack", "Decision", "SamplePiece"}


@pytest.mark.parametrize(("kind", "text"), _examples())
def test_example_validates(kind: str, text: str) -> None:
    data = json.loads(text)
    model = MESSAGE_MODELS[kind]
    jsonschema.validate(data, model.model_json_schema())
    model.model_validate(data)


def test_schema_rejects_a_broken_example() -> None:
    schema = MESSAGE_MODELS["Predictions"].model_json_schema()
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(
            {"device": "d", "boot_id": "b", "mseq": 0, "floor": 1, "ts": 1, "results": []}, schema
        )


def test_topics() -> None:
    topics = Topics("edgefleet/v1", "cam-7")
    assert topics.status == "edgefleet/v1/devices/cam-7/status"
    assert topics.group_commands("lab") == "edgefleet/v1/groups/lab/cmd/+"
    assert topics.command_name("edgefleet/v1/groups/lab/cmd/ping") == "ping"
    assert topics.command_name("edgefleet/v1/devices/cam-7/status") is None
    assert topics.reply("r1") == "edgefleet/v1/devices/cam-7/reply/r1"
