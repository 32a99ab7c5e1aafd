"""The link's run-time subscriptions: a download by hash asks for hundreds of topics at once."""

from __future__ import annotations

from typing import Any

from paho.mqtt.enums import MQTTErrorCode

from edgefleet.mqtt.subscriptions import BATCH, Subscriptions
from edgefleet.protocol import Topics


class FakeClient:
    """paho's subscribe/unsubscribe, recorded (the class boundary this module uses)."""

    def __init__(self) -> None:
        self.packets: list[tuple[str, list[str]]] = []
        self.qos: dict[str, int] = {}
        self.mid = 0

    def subscribe(self, topic: Any) -> tuple[MQTTErrorCode, int | None]:
        self.mid += 1
        self.packets.append(("subscribe", [t for t, _ in topic]))
        self.qos.update({t: o.QoS for t, o in topic})
        return MQTTErrorCode.MQTT_ERR_SUCCESS, self.mid

    def unsubscribe(self, topic: str | list[str]) -> tuple[MQTTErrorCode, int | None]:
        self.mid += 1
        self.packets.append(("unsubscribe", [topic] if isinstance(topic, str) else list(topic)))
        return MQTTErrorCode.MQTT_ERR_SUCCESS, self.mid


def test_runs_of_requests_go_in_batches_in_the_order_asked() -> None:
    subs = Subscriptions(Topics("edgefleet/v1", "dev-1"), [], v5=True)
    client = FakeClient()
    subs.on_connect(client)
    client.packets.clear()
    wanted = [f"edgefleet/v1/models/_chunks/{i:064x}" for i in range(2 * BATCH + 50)]
    for topic in wanted:
        subs.want(topic, 0)
    for topic in wanted[:3]:
        subs.unwant(topic)
    subs.want(wanted[0], 0)
    subs.pump(client)
    kinds = [(kind, len(topics)) for kind, topics in client.packets]
    assert kinds == [
        ("subscribe", BATCH), ("subscribe", BATCH), ("subscribe", 50),
        ("unsubscribe", 3), ("subscribe", 1),
    ]  # fmt: skip
    assert [t for kind, ts in client.packets[:3] for t in ts] == wanted
    assert {client.qos[t] for t in wanted} == {0}
    assert client.qos[Topics("edgefleet/v1", "dev-1").commands] == 1  # the rest at QoS 1
    # A reconnect asks for what is still wanted, in one SUBSCRIBE.
    client.packets.clear()
    subs.on_connect(client)
    assert len(client.packets) == 1
    assert set(wanted[3:]) | {wanted[0]} <= set(client.packets[0][1])
    assert not {wanted[1], wanted[2]} & set(client.packets[0][1])
