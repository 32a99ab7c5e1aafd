"""YAML loading that remembers where every value came from (file and line).

Also resolves two tags for secrets, so that no password sits in the config file:
``!credential NAME`` reads ``$CREDENTIALS_DIRECTORY/NAME`` (systemd ``LoadCredential=``)
and ``!file PATH`` reads a file; trailing newlines are stripped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from edgefleet.errors import ConfigError

Loc = tuple[str | int, ...]


@dataclass
class Located:
    """Parsed data plus the origin of each path in it."""

    data: Any
    origin: str
    lines: dict[Loc, int] = field(default_factory=dict)
    overrides: dict[Loc, str] = field(default_factory=dict)

    def where(self, loc: Loc) -> str:
        """``file:line`` (or the environment variable) of the closest known enclosing path."""
        for end in range(len(loc), -1, -1):
            prefix = loc[:end]
            if prefix in self.overrides:
                return self.overrides[prefix]
            if prefix in self.lines:
                return f"{self.origin}:{self.lines[prefix]}"
        return self.origin


class _Loader(yaml.SafeLoader):
    """SafeLoader with the secret tags; no arbitrary Python objects."""

    base_dir: Path = Path()


def _secret_error(node: yaml.Node, message: str) -> ConfigError:
    mark = node.start_mark
    return ConfigError([f"{mark.name}:{mark.line + 1}: {message}"])


def _read_secret(node: yaml.Node, path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as exc:
        raise _secret_error(node, f"cannot read secret {path}: {exc.strerror}") from None


def _credential(loader: _Loader, node: yaml.Node) -> str:
    name = str(loader.construct_scalar(node))  # type: ignore[arg-type]
    if not name or "/" in name:
        raise _secret_error(node, f"invalid credential name {name!r}")
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        raise _secret_error(node, f"credential {name!r}: $CREDENTIALS_DIRECTORY is not set")
    return _read_secret(node, Path(directory) / name)


def _file(loader: _Loader, node: yaml.Node) -> str:
    raw = Path(str(loader.construct_scalar(node)))  # type: ignore[arg-type]
    return _read_secret(node, raw if raw.is_absolute() else loader.base_dir / raw)


_Loader.add_constructor("!credential", _credential)
_Loader.add_constructor("!file", _file)


def _walk(node: yaml.Node, loc: Loc, lines: dict[Loc, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value
            child = (*loc, key)
            lines[child] = key_node.start_mark.line + 1
            _walk(value_node, child, lines)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            child = (*loc, index)
            lines[child] = item.start_mark.line + 1
            _walk(item, child, lines)


def load_yaml(path: Path) -> Located:
    """Parse a YAML file; syntax errors become a ConfigError naming file and line."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{path}: file not found"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}: cannot read: {exc}"]) from None
    return parse_yaml(text, str(path), base_dir=path.parent)


def parse_yaml(text: str, origin: str, base_dir: Path | None = None) -> Located:
    loader = _Loader(text)
    loader.name = origin
    loader.base_dir = base_dir or Path()
    try:
        node = loader.get_single_node()
        lines: dict[Loc, int] = {}
        if node is None:
            return Located(data={}, origin=origin)
        lines[()] = node.start_mark.line + 1
        _walk(node, (), lines)
        data = loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError([f"{origin}{line}: YAML syntax error: {exc.problem}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{origin}: YAML error: {exc}"]) from None
    finally:
        loader.dispose()
    return Located(data=data, origin=origin, lines=lines)


def apply_env_overrides(located: Located, environ: dict[str, str], prefix: str) -> None:
    """Apply ``PREFIX_SECTION__KEY=value`` variables; values are parsed as YAML scalars."""
    if not isinstance(located.data, dict):
        return
    for name in sorted(environ):
        if not name.startswith(prefix) or name.endswith("_FILE_CONTENTS"):
            continue
        parts = [p.lower() for p in name[len(prefix) :].split("__") if p]
        if not parts:
            continue
        try:
            value = yaml.safe_load(environ[name])
        except yaml.YAMLError:
            value = environ[name]
        target: dict[str, Any] = located.data
        loc: Loc = ()
        for part in parts[:-1]:
            loc = (*loc, part)
            nxt = target.get(part)
            if not isinstance(nxt, dict):
                nxt = {}
                target[part] = nxt
                # A section only the variable made (a typo, say) is reported as the variable.
                located.overrides.setdefault(loc, f"environment {name}")
            target = nxt
        target[parts[-1]] = value
        key: Loc = (*loc, parts[-1])
        located.overrides[key] = f"environment {name}"
