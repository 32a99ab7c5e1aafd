"""The MQTT protocol between devices and the fleet: every topic, state name and message model.

This module is the one owner of the wire format. Device code, the collector, the release
publisher and the broker tools build topics here and nowhere else, and compare states with
the names here. The pydantic models are the reference for ``docs/protocol.md``: each
message's JSON schema comes from them, and a test validates the documentation's examples.

Devices add fields only in new minor versions; consumers must ignore unknown fields, so the
message models allow extra keys while the models of input *to* the device (commands, acks,
release manifests) forbid them.
"""

from __future__ import annotations

import itertools
import json
import re
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

# Topics live in their own module; this one owns the whole wire format and re-exports them.
from edgefleet.topics import DEFAULT_PREFIX as DEFAULT_PREFIX  # noqa: PLC0414
from edgefleet.topics import SHARED_CHUNKS as SHARED_CHUNKS  # noqa: PLC0414
from edgefleet.topics import FleetTopics as FleetTopics  # noqa: PLC0414
from edgefleet.topics import Topics as Topics  # noqa: PLC0414

ID_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
HEX64: Final = r"^[0-9a-f]{64}$"
# A delegate kind a release variant is built for: whatever a delegate plugin declares as its
# ``kind`` (cpu, edgetpu, gpu, or a third party's), or ``any``.
KIND_PATTERN: Final = r"^[a-z][a-z0-9_-]{0,31}$"
ANY_KIND: Final = "any"

# JSON from the network or disk is parsed only once its nesting is known to be bounded: the
# standard parser recurses per level, and `[[[[...` under any size cap exhausts the stack.
MAX_JSON_DEPTH: Final = 32
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def json_depth(payload: bytes) -> int:
    """How deeply ``payload``'s arrays and objects nest (strings do not count)."""
    brackets = _JSON_STRING.sub(b"", payload).translate(None, _NOT_BRACKETS)
    steps = (1 if b in b"[{" else -1 for b in brackets)
    return max(itertools.accumulate(steps), default=0)


def loads(payload: bytes | str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` for untrusted input: ValueError when nested deeper than ``max_depth``.

    Non-finite numbers (``NaN``, ``Infinity``) are refused too: no message of ours has them.
    """
    data = payload.encode() if isinstance(payload, str) else payload
    # Nesting cannot exceed the number of opening brackets: most messages need no scan.
    opened = data.count(b"[") + data.count(b"{")
    if opened > max_depth and json_depth(data) > max_depth:
        raise ValueError(f"JSON nested deeper than {max_depth} levels")
    return json.loads(data, parse_constant=_refuse_constant)


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


# -- state names ---------------------------------------------------------------------------
PresenceState = Literal["online", "offline", "stopped"]
ONLINE: Final = "online"
OFFLINE: Final = "offline"
STOPPED: Final = "stopped"


class Rollout:
    """A device's rollout states, in the order a release passes through them."""

    RECEIVED: Final = "received"
    DOWNLOADING: Final = "downloading"
    VERIFYING: Final = "verifying"
    PREFLIGHT: Final = "preflight"
    ACTIVATING: Final = "activating"
    SHADOW: Final = "shadow"  # runs beside the active model on sampled frames, not serving
    ACTIVE: Final = "active"
    FAILED: Final = "failed"
    ROLLED_BACK: Final = "rolled_back"
    REJECTED: Final = "rejected"  # the shadow phase's figures did not meet the release's rules
    TERMINAL: Final = (ACTIVE, FAILED, ROLLED_BACK, REJECTED)


RolloutState = Literal[
    "received", "downloading", "verifying", "preflight", "shadow", "activating", "active",
    "failed", "rolled_back", "rejected",
]  # fmt: skip


SPOOLED_KINDS: Final = ("predictions", "metrics", "events", "samples")

# Upper bounds (ms) of the latency histogram buckets in the metrics message, +Inf implied.
# Fixed fleet-wide so that counts from every device add up: an EdgeTPU invoke (~3 ms) and a
# Pi 3 running lite4 on its CPU (~1 s) both land in a bucket that tells them apart.
LATENCY_BUCKETS_MS: Final = (
    1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 50.0, 75.0, 100.0, 150.0, 200.0, 300.0,
    500.0, 1000.0, 2000.0,
)  # fmt: skip
# The stages the histogram covers (the others only have rolling percentiles).
HISTOGRAM_STAGES: Final = ("inference", "total")


# The loop's fps cap, as the config's `loop.fps_cap` and the `set` command take it.
FPS_CAP_MIN: Final = 0.001  # one frame in about 17 minutes
FPS_CAP_MAX: Final = 1000.0


# -- messages ------------------------------------------------------------------------------
class _Message(BaseModel):
    # Consumers ignore what they do not know: devices may be newer than the fleet tools.
    model_config = ConfigDict(extra="allow")


class _Input(BaseModel):
    # Input to a device: an unknown key is an error, never silently ignored.
    model_config = ConfigDict(extra="forbid")


class ModelRef(_Message):
    name: str
    version: int
    sha256: str


class Status(_Message):
    """``devices/{id}/status`` (retained): birth, last will, graceful stop."""

    state: PresenceState
    device: str
    boot_id: str
    ts: float
    agent_version: str | None = None
    model: ModelRef | None = None
    delegate: dict[str, Any] | None = None
    source: dict[str, Any] | None = None
    capabilities: dict[str, Any] | None = None
    groups: list[str] | None = None
    state_dir: dict[str, Any] | None = Field(
        default=None, description="writable, full: whether the state directory takes writes"
    )
    clock: dict[str, Any] | None = Field(
        default=None, description="synced: whether the wall clock was set (null: unknown)"
    )


class Spooled(_Message):
    """Fields every spooled message carries (predictions, metrics, events)."""

    device: str
    boot_id: str
    mseq: int = Field(ge=1, description="per-boot message number, contiguous")
    floor: int = Field(ge=1, description="lowest mseq of this boot the device still holds")
    ts: float
    replayed: bool = False


class TopLabel(_Message):
    label: str
    index: int
    score: float = Field(ge=0, le=1)


class ResultMessage(_Message):
    seq: int = Field(ge=1)
    boot_id: str
    ts: float
    model: str
    model_version: int
    top: list[TopLabel]
    timings_ms: dict[str, float]
    frame: int


class Predictions(Spooled):
    """``devices/{id}/predictions``: one or more results (batched by the report policy)."""

    results: list[ResultMessage]


# Samples (the data flywheel): frames a device kept for labelling, sent in pieces.
SAMPLE_TRIGGERS: Final = ("low_score", "small_margin", "watched", "shadow_disagrees", "random")
MAX_SAMPLE_BYTES: Final = 4 * 1024 * 1024  # one encoded frame; the collector refuses more
SAMPLE_PIECE_BYTES: Final = 24 * 1024  # raw bytes per message (base64 makes it ~32 KiB)


class SampleShadow(_Message):
    """What the shadow candidate answered for the same frame."""

    model: str
    version: int
    top: list[TopLabel] = Field(max_length=10)


class SampleMeta(_Message):
    """Why and with what model a frame was kept (the first piece carries it)."""

    ts: float
    model: str = Field(min_length=1, max_length=128)
    model_version: int = Field(ge=0)
    top: list[TopLabel] = Field(max_length=10)
    triggers: list[str] = Field(min_length=1, max_length=len(SAMPLE_TRIGGERS))
    shadow: SampleShadow | None = None
    encoding: Literal["jpeg"] = "jpeg"
    width: int = Field(ge=1, le=65535)
    height: int = Field(ge=1, le=65535)
    full_frame: bool = False


class SamplePiece(Spooled):
    """``devices/{id}/samples``: one piece of a kept frame; the collector joins the pieces,
    checks the whole file's sha256 and acknowledges each piece like any spooled message."""

    sample: str = Field(pattern=HEX64, description="sha256 of the whole encoded file")
    piece: int = Field(ge=0)
    pieces: int = Field(ge=1, le=MAX_SAMPLE_BYTES // SAMPLE_PIECE_BYTES + 1)
    size: int = Field(ge=1, le=MAX_SAMPLE_BYTES)
    data: str = Field(max_length=(SAMPLE_PIECE_BYTES * 4) // 3 + 4, description="base64")
    meta: SampleMeta | None = None


class LatencyHistogram(_Message):
    """Observations since the agent started, cumulative per bucket (Prometheus semantics)."""

    counts: list[int] = Field(description="observations <= each bound, then the total (+Inf)")
    sum_ms: float = Field(ge=0)


class Metrics(Spooled):
    """``devices/{id}/metrics``: loop statistics and device health, every N seconds."""

    interval_s: float | None = Field(default=None, gt=0, description="when the next one is due")
    fps: float
    inferences: int
    dropped_frames: int
    latency_ms: dict[str, dict[str, float]]
    latency_window: int | None = Field(default=None, description="frames the percentiles cover")
    latency_buckets_ms: list[float] | None = None
    latency_hist: dict[str, LatencyHistogram] | None = None
    delegate: dict[str, Any] | None = None
    spool: dict[str, int]
    state_dir: dict[str, Any] | None = Field(
        default=None, description="ok, full; error and for_s while it refuses writes"
    )
    health: dict[str, Any]


class Reply(_Message):
    """A command's answer: to the v5 response topic, else ``devices/{id}/reply/{request_id}``."""

    ok: bool
    command: str
    device: str
    request_id: str | None = None
    result: dict[str, Any] | None = None
    error: str | None = None


class RolloutStatus(_Message):
    """``devices/{id}/rollout`` (retained): where this device is with its latest release."""

    state: RolloutState
    device: str
    ts: float
    rollout_id: str | None = None
    name: str | None = None
    version: int | None = None
    reason: str | None = None
    progress: float | None = None


class Ack(_Input):
    """``devices/{id}/ack`` from the collector: everything up to ``mseq`` is stored."""

    boot_id: str = Field(min_length=1, max_length=64)
    mseq: int = Field(ge=0)


MAX_CHUNK_BYTES: Final = 16 * 1024 * 1024


class InputSpecRef(_Input):
    height: int = Field(gt=0, le=4096)
    width: int = Field(gt=0, le=4096)
    dtype: Literal["uint8", "int8", "float32"]


class Chunking(_Input):
    """Content-defined chunks (FastCDC 2020, normalized chunking 1, gear seed 0: the output of
    ``pyfastcdc`` and of the Rust ``fastcdc`` crate's ``v2020``): an insertion or a resized
    tensor moves the boundaries near it only, so a retrained model shares most chunks with
    the one a device has. A device cuts its own models with these sizes to find them."""

    algorithm: Literal["fastcdc-2020"]
    min_size: int = Field(ge=64, le=1024 * 1024)
    avg_size: int = Field(ge=256, le=4 * 1024 * 1024)
    max_size: int = Field(ge=1024, le=MAX_CHUNK_BYTES)
    lengths: list[int] = Field(min_length=1, description="each chunk's length, in order")


class VariantSpec(_Input):
    kind: str = Field(pattern=KIND_PATTERN, description="delegate kind, or 'any'")
    size: int = Field(gt=0)
    sha256: str = Field(pattern=HEX64)
    chunk_size: int = Field(gt=0, le=MAX_CHUNK_BYTES, description="the longest chunk")
    chunks: list[str] = Field(min_length=1)
    cdc: Chunking | None = Field(
        default=None, description="content-defined chunks, fetched by hash (absent: fixed size)"
    )
    input: InputSpecRef
    labels: int | None = Field(default=None, ge=1, description="number of classes")
    expected_top1: str | None = Field(default=None, description="on the bundled probe image")
    latency_budget_ms: float | None = Field(default=None, gt=0)


class ShadowSpec(_Input):
    """A shadow phase: the candidate runs beside the active model before it may serve."""

    samples: int = Field(ge=1, le=100_000, description="frames to compare")
    interval_s: float = Field(default=2.0, ge=0.05, le=3600, description="at most one per")
    max_duration_s: float = Field(default=3600.0, gt=0, description="decide by then")
    mode: Literal["auto", "manual"] = Field(
        default="auto", description="auto: the rules decide; manual: an operator's decision"
    )
    min_agreement: float | None = Field(default=None, ge=0, le=1, description="top-1 share")
    max_latency_ratio: float | None = Field(
        default=None, gt=0, description="candidate p50 / active p50"
    )
    max_errors: int = Field(default=0, ge=0)


class _Signed(_Input):
    """A message the fleet signs: what a valid signature may cover."""

    # The message as it was received (``canonical_as_sent``) and this model's canonical
    # encoding then: a copy with other content (``model_copy(update=...)``) must not pass
    # for what was sent.
    _as_sent: tuple[bytes, bytes] | None = PrivateAttr(default=None)

    def canonical(self) -> bytes:
        raise NotImplementedError

    def received(self, payload: bytes) -> None:
        """Remember ``payload``, the message this was parsed from, for the signature check."""
        sent = canonical_as_sent(payload)
        self._as_sent = None if sent is None else (sent, self.canonical())

    def signed_forms(self) -> list[bytes]:
        """The fields as they were sent (a signer that leaves out a field with a default, or
        writes ``120`` for ``120.0``), then this model's own canonical encoding (every
        manifest ``edgefleet rollout publish`` signed, whatever JSON library sent it)."""
        own = self.canonical()
        if self._as_sent is None or self._as_sent[1] != own or self._as_sent[0] == own:
            return [own]
        return [self._as_sent[0], own]


class Manifest(_Signed):
    """``.../model/desired`` (retained): a signed release (see ``edgefleet.rollout.release``)."""

    rollout_id: str = Field(min_length=1, max_length=64)
    name: str = Field(pattern=ID_PATTERN)
    version: int = Field(ge=1)
    created: float
    expires: float
    min_agent_version: str = "0.0.0"
    rollback: bool = Field(default=False, description="explicitly allow a lower version")
    variants: list[VariantSpec] = Field(min_length=1)
    shadow: ShadowSpec | None = Field(default=None, description="a shadow phase first")
    key_id: str = Field(min_length=1, max_length=64)
    signature: str = ""

    def body(self) -> dict[str, Any]:
        """Every field but the signature, as JSON values; the keys added after the first
        release (``shadow``, a variant's ``cdc``) are left out when unset, so manifests signed
        before they existed sign the same bytes."""
        body = self.model_dump(mode="json", exclude={"signature"})
        if body.get("shadow") is None:
            body.pop("shadow", None)
        for variant in body["variants"]:
            if variant.get("cdc") is None:
                variant.pop("cdc", None)
        return body

    def canonical(self) -> bytes:
        """The canonical encoding of ``body()``: what ``edgefleet rollout publish`` signs."""
        return canonical_json(self.body())

    def wire(self) -> bytes:
        """The message to publish: ``body()`` and the signature."""
        return json.dumps({**self.body(), "signature": self.signature}).encode()

    def variant_for(self, kinds: list[str]) -> VariantSpec | None:
        """The first variant (in the device's preference order) it can run."""
        for kind in kinds:
            for variant in self.variants:
                if variant.kind == kind:
                    return variant
        return next((v for v in self.variants if v.kind == ANY_KIND), None)


class Decision(_Signed):
    """``.../model/decision`` (retained): an operator's signed verdict on a manual shadow phase."""

    rollout_id: str = Field(min_length=1, max_length=64)
    action: Literal["promote", "reject"]
    created: float
    key_id: str = Field(min_length=1, max_length=64)
    signature: str = ""

    def canonical(self) -> bytes:
        return canonical_json(self.model_dump(mode="json", exclude={"signature"}))

    def wire(self) -> bytes:
        return self.model_dump_json().encode()


def canonical_json(body: dict[str, Any]) -> bytes:
    """Sorted keys, no whitespace, UTF-8 (no ``\\u`` escapes but those JSON requires)."""
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


class _Number(str):
    """A JSON number kept as the text it was sent as."""


def _encode_as_sent(value: object) -> str:
    if isinstance(value, _Number):
        return str.__str__(value)
    if isinstance(value, dict):
        items = sorted(value.items())
        return "{" + ",".join(f"{_encode_as_sent(k)}:{_encode_as_sent(v)}" for k, v in items) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_encode_as_sent(v) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False)


def canonical_as_sent(payload: bytes) -> bytes | None:
    """The canonical encoding of a signed message as it was sent, without its
    ``signature``: keys sorted, no whitespace, numbers exactly as written (``120`` stays
    ``120``, ``1e3`` stays ``1e3``), fields left out staying out. None when it is no JSON
    object. The payload must have passed ``loads`` (depth, constants) already."""
    try:
        body = json.loads(payload, parse_int=_Number, parse_float=_Number)
    except ValueError:
        return None
    if not isinstance(body, dict):
        return None
    body.pop("signature", None)
    return _encode_as_sent(body).encode()


MESSAGE_MODELS: dict[str, type[BaseModel]] = {
    "Status": Status,
    "Predictions": Predictions,
    "Metrics": Metrics,
    "Reply": Reply,
    "RolloutStatus": RolloutStatus,
    "Ack": Ack,
    "SamplePiece": SamplePiece,
    "Manifest": Manifest,
    "Decision": Decision,
}
