"""Configuration: exact error texts with file, line and field; overrides; secrets; schema."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from edgefleet.config.agentconfig import AgentConfig, json_schema, load_config
from edgefleet.errors import ConfigError
from edgefleet.plugin.manager import Plugins
from edgefleet_plugins.sinks.jsonl import JsonlConfig
from edgefleet_plugins.sources.images import ImagesConfig

from .conftest import REPO, cli_command


def _load(
    plugins: Plugins, tmp_path: Path, text: str, env: dict[str, str] | None = None
) -> AgentConfig:
    path = tmp_path / "agent.yaml"
    path.write_text(text)
    return load_config(path, plugins.registries, environ=env or {})


def _errors(
    plugins: Plugins, tmp_path: Path, text: str, env: dict[str, str] | None = None
) -> list[str]:
    with pytest.raises(ConfigError) as info:
        _load(plugins, tmp_path, text, env)
    return [p.replace(str(tmp_path) + "/", "") for p in info.value.problems]


def test_example_config_is_valid(plugins: Plugins) -> None:
    config = load_config(REPO / "configs" / "agent.example.yaml", plugins.registries, environ={})
    assert config.device.id == "pi-kitchen-01"
    assert config.source.type == "auto"
    assert [s.type for s in config.sinks] == ["jsonl"]
    assert config.fleet is not None
    assert config.rollout is None


def test_defaults_without_file(plugins: Plugins) -> None:
    config = load_config(None, plugins.registries, environ={})
    assert config.delegate.type == "cpu"
    assert config.core.model.top_k == 5


def test_plugin_section_gets_its_plugins_model(plugins: Plugins, tmp_path: Path) -> None:
    config = _load(plugins, tmp_path, "source:\n  type: images\n  path: /srv/x\n  fps: 2\n")
    assert isinstance(config.source, ImagesConfig)
    assert config.source.fps == 2


def test_exact_error_texts(plugins: Plugins, tmp_path: Path) -> None:
    text = (
        "device:\n"
        "  id: cam-1\n"
        "source:\n"
        "  type: images\n"
        "  path: /srv/photos\n"
        "  fps: 0\n"
        "model:\n"
        "  top_k: 0\n"
        "  colour: red\n"
        "sinks:\n"
        "  - type: stdout\n"
        "  - type: jsonl\n"
        "  - type: carrier-pigeon\n"
    )
    assert _errors(plugins, tmp_path, text) == [
        "agent.yaml:8: model.top_k: Input should be greater than or equal to 1",
        "agent.yaml:9: model.colour: Extra inputs are not permitted",
        "agent.yaml:6: source.fps: Input should be greater than 0",
        "agent.yaml:12: sinks[1].path: Field required",
        (
            "agent.yaml:13: sinks[2].type: unknown sink type 'carrier-pigeon' "
            "(known: console, jsonl, stdout)"
        ),
    ]


def test_unknown_top_level_key_and_bad_device_id(plugins: Plugins, tmp_path: Path) -> None:
    errors = _errors(plugins, tmp_path, "device:\n  id: 'bad id!'\nmqttt: {}\n")
    assert errors[0].startswith("agent.yaml:2: device.id: String should match pattern")
    assert errors[1] == "agent.yaml:3: mqttt: Extra inputs are not permitted"


def test_yaml_syntax_error_names_line(plugins: Plugins, tmp_path: Path) -> None:
    errors = _errors(plugins, tmp_path, "device:\n  id: a\n  groups: [x\nmodel: {}\n")
    assert len(errors) == 1
    assert errors[0].startswith("agent.yaml:4: YAML syntax error")


def test_top_level_must_be_mapping(plugins: Plugins, tmp_path: Path) -> None:
    assert _errors(plugins, tmp_path, "- a\n- b\n") == [
        "agent.yaml:1: the file must hold a mapping at top level"
    ]


def test_missing_file(plugins: Plugins, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.yaml", plugins.registries, environ={})


def test_env_overrides_and_their_errors(plugins: Plugins, tmp_path: Path) -> None:
    env = {"EDGEFLEET_MODEL__TOP_K": "3", "EDGEFLEET_DEVICE__GROUPS": "[a, b]"}
    config = _load(plugins, tmp_path, "model:\n  top_k: 5\n", env)
    assert config.core.model.top_k == 3
    assert config.device.groups == ["a", "b"]
    errors = _errors(plugins, tmp_path, "model: {}\n", {"EDGEFLEET_MODEL__TOP_K": "-1"})
    message = "model.top_k: Input should be greater than or equal to 1"
    assert errors == [f"environment EDGEFLEET_MODEL__TOP_K: {message}"]


def test_credential_and_file_secrets(
    plugins: Plugins, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "path-secret").write_text("/srv/secret-photos\n")
    (tmp_path / "group.txt").write_text("kitchen\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    config = _load(
        plugins,
        tmp_path,
        "device:\n  groups: [!file group.txt]\n"
        "source:\n  type: images\n  path: !credential path-secret\n",
    )
    assert config.device.groups == ["kitchen"]
    assert isinstance(config.source, ImagesConfig)
    assert config.source.path == "/srv/secret-photos"
    errors = _errors(plugins, tmp_path, "source:\n  type: images\n  path: !credential nope\n")
    assert errors[0].startswith("agent.yaml:3: cannot read secret")
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    errors = _errors(plugins, tmp_path, "source:\n  type: images\n  path: !credential x\n")
    assert errors == ["agent.yaml:3: credential 'x': $CREDENTIALS_DIRECTORY is not set"]


def test_sink_models_forbid_extra(plugins: Plugins, tmp_path: Path) -> None:
    errors = _errors(plugins, tmp_path, "sinks:\n  - type: jsonl\n    path: a\n    rotate: 1\n")
    assert errors == ["agent.yaml:4: sinks[0].rotate: Extra inputs are not permitted"]
    config = _load(plugins, tmp_path, "sinks:\n  - type: jsonl\n    path: a.jsonl\n")
    assert isinstance(config.sinks[0], JsonlConfig)


def test_schema_file_is_current(plugins: Plugins) -> None:
    committed = json.loads((REPO / "configs" / "agent.schema.json").read_text())
    assert committed == json_schema(plugins.registries), (
        "configs/agent.schema.json is stale: run `edgefleet schema --out configs/agent.schema.json`"
    )


def test_example_validates_against_schema(plugins: Plugins) -> None:
    import jsonschema
    import yaml

    schema = json.loads((REPO / "configs" / "agent.schema.json").read_text())
    data = yaml.safe_load((REPO / "configs" / "agent.example.yaml").read_text())
    jsonschema.validate(data, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"source": {"type": "images", "fps": 1}}, schema)


def test_check_config_cli(tmp_path: Path) -> None:
    good = subprocess.run(
        cli_command("check-config", str(REPO / "configs" / "agent.example.yaml")),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert good.returncode == 0, good.stderr
    bad_file = tmp_path / "agent.yaml"
    bad_file.write_text("source:\n  type: synthetic\n  fps: -3\n")
    bad = subprocess.run(
        cli_command("check-config", str(bad_file)),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip() == (
        f"error: {bad_file}:3: source.fps: Input should be greater than 0"
    )
    assert "Traceback" not in bad.stderr


def test_the_old_mqtt_sink_says_where_its_keys_moved(plugins: Plugins, tmp_path: Path) -> None:
    text = "sinks:\n  - type: jsonl\n    path: /tmp/x\n  - type: mqtt\n    url: mqtt://b:1883\n"
    assert _errors(plugins, tmp_path, text) == [
        (
            "agent.yaml:4: sinks[1]: the mqtt sink became the top-level `fleet:` section, and "
            "its `rollout:` key moved to the top level beside it (see configs/agent.example.yaml)"
        )
    ]


def test_rollout_needs_a_fleet_link(plugins: Plugins, tmp_path: Path) -> None:
    text = "rollout:\n  trusted_keys: {}\n"
    assert _errors(plugins, tmp_path, text) == ["agent.yaml:1: rollout: needs a `fleet:` section"]


def test_delegate_policies_are_core_config(plugins: Plugins, tmp_path: Path) -> None:
    text = "delegate:\n  type: prefer\n  budget_s: 3\n  order:\n    - {type: auto}\n"
    assert _errors(plugins, tmp_path, text) == [
        "agent.yaml:3: delegate.budget_s: Extra inputs are not permitted",
    ]
    text = "delegate:\n  type: prefer\n  order:\n    - {type: auto}\n"
    assert _errors(plugins, tmp_path, text) == [
        "agent.yaml:4: delegate.order[0]: a policy cannot nest"
    ]
