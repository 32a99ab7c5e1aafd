"""The agent's configuration: one YAML file, validated by pydantic, plugin sections included.

Validation runs in two passes. The core model checks everything the agent itself owns and
keeps each plugin section (``source``, ``delegate``, ``sinks[]``) as a dict with a ``type``.
Each section is then validated against the model its plugin registered for that type, so a
third-party plugin's options get the same ``file:line: field: message`` errors as ours.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from edgefleet.capture.settings import CaptureSettings
from edgefleet.config.yamlsource import Loc, Located, apply_env_overrides, load_yaml, parse_yaml
from edgefleet.delegation.policies import POLICY_MODELS, DelegatePolicy
from edgefleet.errors import ConfigError
from edgefleet.mqtt.settings import FleetConfig
from edgefleet.plugin.registry import NESTED_SECTION, PluginConfig, Registries, Registry
from edgefleet.protocol import FPS_CAP_MAX, FPS_CAP_MIN, ID_PATTERN
from edgefleet.rollout.settings import RolloutSettings

ENV_PREFIX = "EDGEFLEET_"
_ID_PATTERN = ID_PATTERN
MOVED_SINKS = {
    "mqtt": "the mqtt sink became the top-level `fleet:` section, and its `rollout:` key moved "
    "to the top level beside it (see configs/agent.example.yaml)",
}


def _default_device_id() -> str:
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:64]
    return host or "edgefleet"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DeviceConfig(_Strict):
    """Who this device is in the fleet."""

    id: str = Field(default_factory=_default_device_id, pattern=_ID_PATTERN)
    groups: list[str] = Field(default_factory=list)

    @field_validator("groups")
    @classmethod
    def _groups_valid(cls, groups: list[str]) -> list[str]:
        for group in groups:
            if not re.match(_ID_PATTERN, group):
                raise ValueError(f"invalid group name {group!r}")
        return groups


class ModelConfig(_Strict):
    """Which model to run and how to read its output."""

    path: Path | None = Field(default=None, description="model file; null = factory model")
    labels: Path | None = Field(default=None, description="labels file overriding embedded ones")
    top_k: int = Field(default=5, ge=1, le=100)
    threshold: float = Field(default=0.0, ge=0.0, le=1.0)
    crop: Literal["center", "none"] = "center"


class LoopConfig(_Strict):
    """The classification loop."""

    fps_cap: float | None = Field(
        default=None, ge=FPS_CAP_MIN, le=FPS_CAP_MAX, description="inferences per second at most"
    )
    stats_window: int = Field(default=1024, ge=16, le=1_000_000)


class PluginsConfig(_Strict):
    """Plugin loading."""

    block: list[str] = Field(default_factory=list, description="entry-point names not to load")


class LoggingConfig(_Strict):
    """Structured logs: JSON for journald, readable text on a terminal."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


class Section(BaseModel):
    """A plugin's section before its own model has seen it."""

    model_config = ConfigDict(extra="allow")

    type: str


class FileConfig(_Strict):
    """What the YAML file holds, plugin sections still raw."""

    device: DeviceConfig = Field(default_factory=DeviceConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    delegate: Section = Field(default_factory=lambda: Section(type="cpu"))
    source: Section = Field(default_factory=lambda: Section(type="auto"))
    sinks: list[Section] = Field(default_factory=lambda: [Section(type="stdout")])
    fleet: FleetConfig | None = Field(default=None, description="the MQTT link to the fleet")
    rollout: RolloutSettings | None = Field(
        default=None, description="model rollouts (needs fleet)"
    )
    capture: CaptureSettings = Field(
        default_factory=CaptureSettings, description="frames kept for labelling (needs fleet)"
    )
    loop: LoopConfig = Field(default_factory=LoopConfig)
    plugins: PluginsConfig = Field(default_factory=PluginsConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    state_dir: Path = Path("/var/lib/edgefleet")


@dataclass
class AgentConfig:
    """The validated configuration, each plugin section as its plugin's model."""

    core: FileConfig
    source: PluginConfig
    delegate: PluginConfig | DelegatePolicy
    candidates: list[PluginConfig]  # a policy's candidates, validated; empty when fixed
    sinks: list[PluginConfig]
    origin: str

    @property
    def device(self) -> DeviceConfig:
        return self.core.device

    @property
    def fleet(self) -> FleetConfig | None:
        return self.core.fleet

    @property
    def rollout(self) -> RolloutSettings | None:
        return self.core.rollout


def format_loc(loc: Loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _problems(exc: ValidationError, located: Located, prefix: Loc = ()) -> list[str]:
    problems = []
    for err in exc.errors():
        loc = (*prefix, *err["loc"])
        problems.append(f"{located.where(loc)}: {format_loc(loc)}: {err['msg']}")
    return problems


def _validate_section(
    raw: Any, loc: Loc, registry: Registry[Any], located: Located, problems: list[str]
) -> PluginConfig | None:
    type_name = raw.get("type") if isinstance(raw, Mapping) else None
    if type_name is None:
        return None  # the core model already reported the missing or malformed section
    entry = registry.get(str(type_name))
    if entry is None and registry.kind == "sink" and type_name in MOVED_SINKS:
        where = located.where((*loc, "type"))
        problems.append(f"{where}: {format_loc(loc)}: {MOVED_SINKS[str(type_name)]}")
        return None
    if entry is None:
        known = ", ".join(registry.names()) or "none"
        where = located.where((*loc, "type"))
        problems.append(
            f"{where}: {format_loc((*loc, 'type'))}: unknown {registry.kind} type "
            f"{type_name!r} (known: {known})"
        )
        return None
    try:
        return entry.config_model.model_validate(raw)
    except ValidationError as exc:
        problems.extend(_problems(exc, located, loc))
        return None


def _validate_nested(
    section: PluginConfig | None,
    loc: Loc,
    registries: Registries,
    located: Located,
    problems: list[str],
) -> None:
    """Fields marked ``nested_section(kind)`` hold another plugin's section: check it too."""
    if section is None:
        return
    by_kind: dict[str, Registry[Any]] = {
        "source": registries.sources,
        "delegate": registries.delegates,
        "sink": registries.sinks,
    }
    for name, field in type(section).model_fields.items():
        extra = field.json_schema_extra
        kind = extra.get(NESTED_SECTION) if isinstance(extra, dict) else None
        value = getattr(section, name)
        if not isinstance(kind, str) or kind not in by_kind or value is None:
            continue
        where: Loc = (*loc, name)
        if isinstance(value, Mapping) and value.get("type") == section.type:
            problems.append(f"{located.where(where)}: {format_loc(where)}: cannot nest itself")
            continue
        nested = _validate_section(value, where, by_kind[kind], located, problems)
        if isinstance(value, Mapping) and "type" not in value:
            problems.append(f"{located.where(where)}: {format_loc(where)}: needs a `type`")
        _validate_nested(nested, where, registries, located, problems)


def _validate_delegate(
    raw: Any, registry: Registry[Any], located: Located, problems: list[str]
) -> tuple[PluginConfig | DelegatePolicy | None, list[PluginConfig]]:
    """A policy (core config) with each candidate checked by its plugin, or one plugin."""
    type_name = raw.get("type") if isinstance(raw, Mapping) else None
    policy_model = POLICY_MODELS.get(str(type_name))
    if policy_model is None:
        return _validate_section(raw, ("delegate",), registry, located, problems), []
    try:
        policy: DelegatePolicy = policy_model.model_validate(raw)
    except ValidationError as exc:
        problems.extend(_problems(exc, located, ("delegate",)))
        return None, []
    candidates = []
    for i, item in enumerate(policy.sections):
        where: Loc = ("delegate", policy.sections_field, i)
        if isinstance(item, Mapping) and item.get("type") in POLICY_MODELS:
            problems.append(f"{located.where(where)}: {format_loc(where)}: a policy cannot nest")
            continue
        section = _validate_section(item, where, registry, located, problems)
        if section is not None:
            candidates.append(section)
    return policy, candidates


def validate(located: Located, registries: Registries) -> AgentConfig:
    """Validate parsed data; every problem is collected before raising one ConfigError."""
    if not isinstance(located.data, dict):
        raise ConfigError([f"{located.where(())}: the file must hold a mapping at top level"])
    problems: list[str] = []
    core: FileConfig | None = None
    try:
        core = FileConfig.model_validate(located.data)
    except ValidationError as exc:
        problems.extend(_problems(exc, located))
    raw = located.data
    default = FileConfig().model_dump(mode="python")
    source = _validate_section(
        raw.get("source", default["source"]), ("source",), registries.sources, located, problems
    )
    _validate_nested(source, ("source",), registries, located, problems)
    delegate, candidates = _validate_delegate(
        raw.get("delegate", default["delegate"]), registries.delegates, located, problems
    )
    raw_sinks = raw.get("sinks", default["sinks"])
    sinks = [
        _validate_section(item, ("sinks", i), registries.sinks, located, problems)
        for i, item in enumerate(raw_sinks if isinstance(raw_sinks, list) else [])
    ]
    for i, sink in enumerate(sinks):
        _validate_nested(sink, ("sinks", i), registries, located, problems)
    if problems:
        raise ConfigError(problems)
    if core is None or source is None or delegate is None:
        raise ConfigError(["internal: validation failed without a problem"])
    if core.rollout is not None and core.fleet is None:
        raise ConfigError([f"{located.where(('rollout',))}: rollout: needs a `fleet:` section"])
    if core.capture.enabled and core.fleet is None:
        raise ConfigError([f"{located.where(('capture',))}: capture: needs a `fleet:` section"])
    return AgentConfig(
        core=core,
        source=source,
        delegate=delegate,
        candidates=candidates,
        sinks=[s for s in sinks if s is not None],
        origin=located.origin,
    )


def load_config(
    path: Path | None,
    registries: Registries,
    environ: Mapping[str, str] | None = None,
    text: str | None = None,
) -> AgentConfig:
    """Load a config file (or text), apply ``EDGEFLEET_*`` overrides, validate it all."""
    if text is not None:
        located = parse_yaml(text, str(path or "<config>"))
    elif path is not None:
        located = load_yaml(path)
    else:
        located = Located(data={}, origin="<defaults>")
    env = dict(os.environ if environ is None else environ)
    # EDGEFLEET_CONFIG names the file itself; it is no override.
    env.pop("EDGEFLEET_CONFIG", None)
    apply_env_overrides(located, env, ENV_PREFIX)
    return validate(located, registries)


def json_schema(registries: Registries) -> dict[str, Any]:
    """JSON schema of the whole file, each plugin section a union over the registered types."""
    schema = FileConfig.model_json_schema()
    defs = schema.setdefault("$defs", {})

    def union(registry: Registry[Any]) -> dict[str, Any]:
        options = []
        for entry in registry.entries():
            sub = entry.config_model.model_json_schema(ref_template="#/$defs/{model}")
            defs.update(sub.pop("$defs", {}))
            name = f"{registry.kind.title()}_{entry.type.replace('-', '_')}"
            defs[name] = sub
            options.append({"$ref": f"#/$defs/{name}"})
        return {"oneOf": options}

    props = schema["properties"]
    props["source"] = {**union(registries.sources), "description": "frame source"}
    delegate = union(registries.delegates)
    for name, model in POLICY_MODELS.items():
        sub = model.model_json_schema(ref_template="#/$defs/{model}")
        defs.update(sub.pop("$defs", {}))
        defs[f"Policy_{name}"] = sub
        delegate["oneOf"].append({"$ref": f"#/$defs/Policy_{name}"})
    props["delegate"] = {**delegate, "description": "inference delegate or delegate policy"}
    props["sinks"] = {"type": "array", "items": union(registries.sinks)}
    defs.pop("Section", None)
    return schema
