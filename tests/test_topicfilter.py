"""Topic filters split once: the same answers as paho's matcher, and the link's dispatch."""

from __future__ import annotations

import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion

from edgefleet.mqtt.link import Incoming, LinkSettings, MqttLink
from edgefleet.mqtt.topicfilter import TopicFilter

_LEVEL = st.sampled_from(["a", "b", "", "$SYS", "$x", "models", "17"])
_TOPIC = st.lists(_LEVEL, min_size=1, max_size=5).map("/".join)
_FILTER = st.builds(
    lambda levels, rest: "/".join(levels + (["#"] if rest else [])),
    st.lists(st.one_of(_LEVEL, st.just("+")), min_size=0, max_size=5),
    st.booleans(),
).filter(bool)


@settings(max_examples=3000, deadline=None)
@given(_FILTER, _TOPIC)
def test_matches_as_paho_does(text: str, topic: str) -> None:
    assert TopicFilter(text).matches(topic) == mqtt.topic_matches_sub(text, topic)


@pytest.mark.parametrize(
    ("text", "topic", "expected"),
    [
        ("sport/#", "sport", True),  # "#" takes the parent level too
        ("sport/+", "sport", False),
        ("+/+", "/finance", True),  # an empty level is a level
        ("#", "$SYS/broker", False),  # wildcards at the start never reach "$" topics
        ("+/broker", "$SYS/broker", False),
        ("$SYS/#", "$SYS/broker", True),
        ("edgefleet/v1/models/m/3/cpu/+", "edgefleet/v1/models/m/3/cpu/41", True),
        ("edgefleet/v1/models/m/3/cpu/+", "edgefleet/v1/models/m/30/cpu/41", False),
    ],
)
def test_the_rules_of_the_specification(text: str, topic: str, expected: bool) -> None:
    assert TopicFilter(text).matches(topic) is expected


def _link(tmp_path: Path) -> MqttLink:
    settings = LinkSettings(
        url="mqtt://127.0.0.1:1",
        device="dev-1",
        groups=["lab"],
        prefix="edgefleet/v1",
        boot_id=uuid.uuid4().hex,
        spool_path=tmp_path / "spool.sqlite",
    )
    return MqttLink(settings, birth=dict)


def _deliver(link: MqttLink, topic: str) -> None:
    msg = mqtt.MQTTMessage(topic=topic.encode())
    msg.payload = b"{}"
    link.net._on_message(mqtt.Client(CallbackAPIVersion.VERSION2), None, msg)  # as paho calls it


def test_the_link_dispatches_by_filter(tmp_path: Path) -> None:
    link = _link(tmp_path)
    routed: list[tuple[str, str]] = []
    link.route("edgefleet/v1/devices/dev-1/desired", lambda m: routed.append(("desired", m.topic)))
    link.route(
        "edgefleet/v1/models/+/+/+/+",
        lambda m: routed.append(("chunk", m.topic)),
        subscribe=False,
    )

    def broken(_m: Incoming) -> None:
        raise RuntimeError("a handler's bug")

    link.route("edgefleet/v1/models/#", broken, subscribe=False)
    try:
        _deliver(link, "edgefleet/v1/devices/dev-1/desired")
        _deliver(link, "edgefleet/v1/models/m/3/cpu/7")  # both model routes; one raises
        _deliver(link, "edgefleet/v1/models/m/3/cpu")  # too short for the chunk route
        own, lab = link.topics.commands, link.topics.group_commands("lab")
        _deliver(link, own.replace("+", "status"))
        _deliver(link, lab.replace("+", "pause"))
        _deliver(link, link.topics.group_commands("other").replace("+", "pause"))  # not its group
        assert routed == [
            ("desired", "edgefleet/v1/devices/dev-1/desired"),
            ("chunk", "edgefleet/v1/models/m/3/cpu/7"),
        ]
        commands = [link.net.commands.get_nowait().topic for _ in range(link.net.commands.qsize())]
        assert commands == [own.replace("+", "status"), lab.replace("+", "pause")]
    finally:
        link.outbox.close()
