"""Remote commands: ``{prefix}/devices/{id}/cmd/{name}`` and ``{prefix}/groups/{g}/cmd/{name}``.

Every command gets exactly one reply saying ok or a clear error; a malformed command (not
JSON, wrong types, unknown name, oversized) is answered, never raised.
"""

from __future__ import annotations

import base64
import re
import time
import uuid
from collections.abc import Callable
from typing import Any, Protocol

import cv2
import structlog
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from edgefleet import protocol
from edgefleet.errors import UserError
from edgefleet.protocol import FPS_CAP_MAX, FPS_CAP_MIN
from edgefleet.runtime.frames import Frame
from edgefleet.runtime.pipeline import LoopSettings
from edgefleet.runtime.results import Result
from edgefleet.runtime.stats import LoopStats

log = structlog.get_logger(__name__)
REQUEST_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class CommandError(Exception):
    """A command that cannot be carried out; the message goes into the reply."""


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid")

    request_id: str | None = Field(default=None, pattern=REQUEST_ID.pattern)


class NoArgs(_Args):
    pass


class ReportArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: str | None = None
    interval_ms: int | None = None
    min_score: float | None = None
    batch_max: int | None = None
    batch_ms: int | None = None


class SetArgs(_Args):
    fps_cap: float | None = Field(
        default=None, ge=0, le=FPS_CAP_MAX, description="0 removes the cap"
    )
    top_k: int | None = Field(default=None, ge=1, le=100)
    threshold: float | None = Field(default=None, ge=0, le=1)
    report: ReportArgs | None = None

    @field_validator("fps_cap")
    @classmethod
    def _cap_in_range(cls, value: float | None) -> float | None:
        # The same bounds as loop.fps_cap in the config; 0 means "no cap".
        if value is not None and 0 < value < FPS_CAP_MIN:
            raise ValueError(f"must be 0 (no cap) or at least {FPS_CAP_MIN}")
        return value


class SnapshotArgs(_Args):
    quality: int = Field(default=80, ge=10, le=95)
    max_side: int = Field(default=640, ge=32, le=4096)


def _validation_text(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "payload"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


class Loop(Protocol):
    """What commands read and change of the running loop."""

    @property
    def settings(self) -> LoopSettings: ...

    @property
    def stats(self) -> LoopStats: ...

    @property
    def last_frame(self) -> Frame | None: ...

    @property
    def last_result(self) -> Result | None: ...


class AgentControl(Protocol):
    """What remote commands may do to the agent."""

    @property
    def pipeline(self) -> Loop | None: ...

    def reload_settings(self) -> dict[str, Any]: ...


class ReportControl(Protocol):
    """The report policy a ``set`` may change; returns the policy now in force."""

    def update(self, changes: dict[str, Any]) -> dict[str, Any]: ...


class CommandHandler:
    """Runs on the link's command thread; reaches the agent only through its ports."""

    def __init__(
        self, agent: AgentControl, report: ReportControl, max_bytes: int = 64 * 1024
    ) -> None:
        self.agent = agent
        self.report = report
        self.max_bytes = max_bytes
        self.handlers: dict[str, tuple[type[_Args], Callable[[Any], dict[str, Any]]]] = {
            "ping": (NoArgs, self.ping),
            "pause": (NoArgs, self.pause),
            "resume": (NoArgs, self.resume),
            "set": (SetArgs, self.set),
            "reload": (NoArgs, self.reload),
            "snapshot": (SnapshotArgs, self.snapshot),
        }

    def execute(self, name: str | None, payload: bytes) -> dict[str, Any]:
        """Parse, check and run one command; always returns a reply body."""
        reply: dict[str, Any] = {"command": name or "", "ok": False}
        try:
            reply["result"] = self._run(name, payload, reply)
            reply["ok"] = True
        except (CommandError, UserError) as exc:
            reply["error"] = str(exc)
        except Exception as exc:
            log.exception("command failed", command=name)
            reply["error"] = f"internal error: {type(exc).__name__}"
        return reply

    def _run(self, name: str | None, payload: bytes, reply: dict[str, Any]) -> dict[str, Any]:
        if len(payload) > self.max_bytes:
            raise CommandError(f"payload of {len(payload)} bytes exceeds {self.max_bytes}")
        raw = self._parse(payload)
        rid = raw.get("request_id")
        if isinstance(rid, str) and REQUEST_ID.match(rid):
            reply["request_id"] = rid
        if name not in self.handlers:
            known = ", ".join(sorted(self.handlers))
            raise CommandError(f"unknown command {name!r} (known: {known})")
        model, func = self.handlers[name]
        try:
            args = model.model_validate(raw)
        except ValidationError as exc:
            raise CommandError(_validation_text(exc)) from None
        return func(args)

    @staticmethod
    def _parse(payload: bytes) -> dict[str, Any]:
        if not payload.strip():
            return {}
        try:
            data = protocol.loads(payload)
        except (UnicodeDecodeError, ValueError) as exc:
            raise CommandError(f"payload is not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise CommandError("payload must be a JSON object")
        return data

    @staticmethod
    def request_id(reply: dict[str, Any]) -> str:
        rid = reply.get("request_id")
        return rid if isinstance(rid, str) else uuid.uuid4().hex[:12]

    # -- the commands ---------------------------------------------------------------------
    def _pipeline(self) -> Loop:
        pipeline = self.agent.pipeline
        if pipeline is None:
            raise CommandError("the classification loop is not running")
        return pipeline

    def ping(self, _args: NoArgs) -> dict[str, Any]:
        pipeline = self._pipeline()
        return {
            "pong": time.time(),
            "paused": pipeline.settings.paused,
            "fps": round(pipeline.stats.fps(), 2),
            "inferences": pipeline.stats.inferences,
        }

    def pause(self, _args: NoArgs) -> dict[str, Any]:
        self._pipeline().settings.paused = True
        return {"paused": True}

    def resume(self, _args: NoArgs) -> dict[str, Any]:
        self._pipeline().settings.paused = False
        return {"paused": False}

    def set(self, args: SetArgs) -> dict[str, Any]:
        settings = self._pipeline().settings
        changed: dict[str, Any] = {}
        if args.report is not None:
            changed["report"] = self.report.update(args.report.model_dump(exclude_none=True))
        if args.fps_cap is not None:
            settings.fps_cap = args.fps_cap or None
            changed["fps_cap"] = settings.fps_cap
        if args.top_k is not None:
            settings.top_k = changed["top_k"] = args.top_k
        if args.threshold is not None:
            settings.threshold = changed["threshold"] = args.threshold
        if not changed:
            raise CommandError("nothing to set (fps_cap, top_k, threshold, report)")
        return changed

    def reload(self, _args: NoArgs) -> dict[str, Any]:
        return self.agent.reload_settings()

    def snapshot(self, args: SnapshotArgs) -> dict[str, Any]:
        pipeline = self._pipeline()
        frame = pipeline.last_frame
        if frame is None:
            raise CommandError("no frame has been classified yet")
        image = frame.image
        scale = args.max_side / max(image.shape[:2])
        if scale < 1:
            size = (round(image.shape[1] * scale), round(image.shape[0] * scale))
            image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        ok, jpeg = cv2.imencode(
            ".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, args.quality]
        )
        if not ok:
            raise CommandError("JPEG encoding failed")
        result = pipeline.last_result
        return {
            "jpeg_base64": base64.b64encode(jpeg.tobytes()).decode("ascii"),
            "width": int(image.shape[1]),
            "height": int(image.shape[0]),
            "frame": frame.index,
            "origin": frame.origin,
            "result": result.to_dict() if result is not None else None,
        }
