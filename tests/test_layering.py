"""The package map in docs/architecture.md, enforced: who may import whom.

Every ``import`` in ``agent/`` is read with ``ast`` (function-level and TYPE_CHECKING imports
included: a deferred import is still a dependency), and each contract below names a room and
the rooms it must never reach.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

from .conftest import REPO

# (importer prefix, forbidden prefixes, why)
CONTRACTS: list[tuple[str, tuple[str, ...], str]] = [
    ("edgefleet", ("edgefleet_plugins",), "the core never imports a plugin"),
    (
        "edgefleet.runtime",
        ("edgefleet.mqtt", "edgefleet.rollout", "edgefleet.fleet", "edgefleet.app"),
        "the loop never knows the fleet link, rollouts or the composition",
    ),
    (
        "edgefleet.inference",
        (
            "edgefleet.mqtt",
            "edgefleet.rollout",
            "edgefleet.fleet",
            "edgefleet.app",
            "edgefleet.runtime.pipeline",
            "edgefleet.delegation.selection",
            "edgefleet.delegation.serving",
        ),
        "inference runs a model; it never knows the link, the loop or who serves",
    ),
    ("edgefleet.protocol", ("edgefleet.",), "the wire format depends on nothing of ours"),
    (
        "edgefleet.mqtt",
        ("edgefleet.rollout", "edgefleet.fleet", "edgefleet.app"),
        "the link carries rollouts but does not know them",
    ),
    (
        "edgefleet.delegation",
        ("edgefleet.mqtt", "edgefleet.rollout", "edgefleet.fleet", "edgefleet.app"),
        "what serves is decided below the fleet link",
    ),
    ("edgefleet.rollout", ("edgefleet.fleet", "edgefleet.app"), "devices never run fleet tools"),
    ("edgefleet.fleet", ("edgefleet.app", "edgefleet.runtime"), "fleet tools run no loop"),
    ("edgefleet.plugin", ("edgefleet.mqtt", "edgefleet.rollout"), "plugins see the agent only"),
    ("edgefleet.config", ("edgefleet.app", "edgefleet.runtime"), "config is data"),
    (
        "edgefleet.training",
        (
            "edgefleet.mqtt",
            "edgefleet.rollout",
            "edgefleet.fleet",
            "edgefleet.app",
            "edgefleet.runtime",
            "edgefleet.delegation",
        ),
        "training makes model files; it runs them only as inference does",
    ),
]
# Only the command line reaches training: a device never imports torch's world.
TRAINING = "edgefleet.training"
# Nobody below the command line imports it.
CLI_ONLY = "edgefleet.cli"


def _module_name(root: Path, path: Path, package: str) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([package, *parts])


def _imports(path: Path, module: str) -> Iterator[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".")[: -node.level]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            yield target
            # `from edgefleet import x` may name a submodule
            yield from (f"{target}.{alias.name}" for alias in node.names)


def _within(name: str, prefix: str | tuple[str, ...]) -> bool:
    prefixes = (prefix,) if isinstance(prefix, str) else prefix
    return any(name == p.rstrip(".") or name.startswith(p.rstrip(".") + ".") for p in prefixes)


def violations(root: Path, package: str = "edgefleet") -> list[str]:
    """Every import in ``root`` (the folder installed as ``package``) that breaks a contract."""
    found = []
    for path in sorted(root.rglob("*.py")):
        module = _module_name(root, path, package)
        reported: list[str] = []
        for imported in sorted(set(_imports(path, module))):
            if any(_within(imported, done) for done in reported):
                continue  # `from a.b import c`: a.b is reported, a.b.c adds nothing
            why = _broken(module, imported)
            if why:
                reported.append(imported)
                found.append(f"{module} imports {imported}: {why}")
    return found


def _broken(module: str, imported: str) -> str | None:
    for importer, forbidden, why in CONTRACTS:
        inside = _within(module, importer) and not _within(imported, importer)
        if inside and any(_within(imported, prefix) for prefix in forbidden):
            return why
    if _within(imported, TRAINING) and not _within(module, (TRAINING, CLI_ONLY)):
        return "only the command line trains models"
    entry = module in (CLI_ONLY, "edgefleet.__main__")
    if _within(imported, CLI_ONLY) and not entry and not _within(module, CLI_ONLY):
        return "only the command line is the CLI"
    return None


def test_the_package_keeps_its_layers() -> None:
    assert violations(REPO / "agent") == []


def test_the_check_notices_a_forbidden_import(tmp_path: Path) -> None:
    (tmp_path / "runtime").mkdir()
    (tmp_path / "runtime" / "__init__.py").write_text("")
    (tmp_path / "runtime" / "pipeline.py").write_text(
        "def f():\n    from edgefleet.mqtt.link import MqttLink\n    return MqttLink\n"
    )
    (tmp_path / "inference").mkdir()
    (tmp_path / "inference" / "x.py").write_text("from edgefleet_plugins.sources import images\n")
    (tmp_path / "protocol.py").write_text("from .errors import UserError\n")
    (tmp_path / "fine.py").write_text("from edgefleet.runtime import pipeline\n")
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "daemon.py").write_text("import edgefleet.training.model\n")
    assert violations(tmp_path) == [
        (
            "edgefleet.app.daemon imports edgefleet.training.model: only the command line trains "
            "models"
        ),
        "edgefleet.inference.x imports edgefleet_plugins.sources: the core never imports a plugin",
        "edgefleet.protocol imports edgefleet.errors: the wire format depends on nothing of ours",
        (
            "edgefleet.runtime.pipeline imports edgefleet.mqtt.link: the loop never knows the "
            "fleet link, rollouts or the composition"
        ),
    ]
