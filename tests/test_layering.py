"""The package map in docs/architecture.md, enforced: who may import whom, and how the house stands.

Every ``import`` in ``agent/`` is read with ``ast``, function-level and TYPE_CHECKING imports
included: a deferred import is still a dependency, and a type named across two rooms ties them
as surely as a call does.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

from .conftest import REPO

# The operator's side, four rooms: none of them runs on a device's loop.
FLEET = ("edgefleet.collector", "edgefleet.dashboard", "edgefleet.operator", "edgefleet.simulator")
ABOVE_THE_DEVICE = (*FLEET, "edgefleet.app")

# (importer prefix, forbidden prefixes, why)
CONTRACTS: list[tuple[str, tuple[str, ...], str]] = [
    ("edgefleet", ("edgefleet_plugins",), "the core never imports a plugin"),
    (
        "edgefleet.runtime",
        ("edgefleet.mqtt", "edgefleet.rollout", *ABOVE_THE_DEVICE),
        "the loop never knows the fleet link, rollouts or the composition",
    ),
    (
        "edgefleet.inference",
        (
            "edgefleet.mqtt",
            "edgefleet.rollout",
            *ABOVE_THE_DEVICE,
            "edgefleet.runtime",
            "edgefleet.delegation",
        ),
        "inference runs a model; it never knows the link, the loop or who serves",
    ),
    ("edgefleet.protocol", ("edgefleet.",), "the wire format depends on nothing of ours"),
    ("edgefleet.topics", ("edgefleet.",), "topics depend on nothing of ours"),
    (
        "edgefleet.mqtt",
        ("edgefleet.rollout", "edgefleet.config", *ABOVE_THE_DEVICE),
        "the link carries rollouts but does not know them; it is handed its own settings",
    ),
    (
        "edgefleet.delegation",
        ("edgefleet.mqtt", "edgefleet.rollout", "edgefleet.config", *ABOVE_THE_DEVICE),
        "what serves is decided below the fleet link",
    ),
    (
        "edgefleet.rollout",
        ("edgefleet.config", *ABOVE_THE_DEVICE),
        "devices never run fleet tools; a rollout is handed its own settings",
    ),
    (
        "edgefleet.plugin",
        ("edgefleet.mqtt", "edgefleet.rollout", "edgefleet.config", *ABOVE_THE_DEVICE),
        "plugins see the agent through small ports only",
    ),
    (
        "edgefleet.capture",
        ("edgefleet.mqtt", "edgefleet.rollout", "edgefleet.config", *ABOVE_THE_DEVICE),
        "capture hands samples to a link port; it never knows the link or rollouts",
    ),
    ("edgefleet.config", ("edgefleet.runtime", *ABOVE_THE_DEVICE), "config is data"),
    (
        "edgefleet.dashboard",
        (
            "edgefleet.collector",
            "edgefleet.operator",
            "edgefleet.simulator",
            "edgefleet.mqtt",
            "edgefleet.app",
            "edgefleet.runtime",
        ),
        "the view reads messages: it neither stores, connects nor publishes",
    ),
    (
        "edgefleet.collector",
        ("edgefleet.operator", "edgefleet.simulator", "edgefleet.app", "edgefleet.runtime"),
        "the collector stores and feeds the view; it publishes no release",
    ),
    (
        "edgefleet.operator",
        ("edgefleet.collector", "edgefleet.simulator", "edgefleet.app", "edgefleet.runtime"),
        "operator tools run no loop and store no reports",
    ),
    (
        "edgefleet.simulator",
        (
            "edgefleet.collector",
            "edgefleet.dashboard",
            "edgefleet.operator",
            "edgefleet.rollout",
            "edgefleet.inference",
            "edgefleet.app",
            "edgefleet.runtime",
        ),
        "a virtual device speaks the wire only",
    ),
    (
        "edgefleet.training",
        (
            "edgefleet.mqtt",
            "edgefleet.rollout",
            *ABOVE_THE_DEVICE,
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

# The floors of the house, from the ground up (docs/architecture.md draws the same). A room
# imports its own floor or those below; config sits above mqtt, rollout and delegation because
# it composes their sections. Top-level modules not named here (errors, logs, fsutil, the
# package itself) are the ground; the deprecated shims (hookspecs.py ...) sit on plugin's floor.
FLOORS: list[tuple[str, ...]] = [
    ("protocol", "topics", "errors", "logs", "fsutil", "samples", "factory", "edgefleet"),
    ("inference",),
    ("runtime", "training"),
    (
        "plugin",
        *("hookspecs", "registry", "sourceoffers", "sources", "sinks", "frames", "results"),
        "delegates",
        "capture",
    ),
    ("delegation",),
    ("mqtt",),
    ("rollout",),
    ("config",),
    ("dashboard",),
    ("collector", "operator", "simulator"),
    ("app",),
    ("cli", "__main__"),
]
# Arrows that may point up a floor, each with its reason. None today; the issue allows three.
UP_ALLOWED: dict[tuple[str, str], str] = {}
MAX_UP = 3
# The longest module, in lines, before it is two concerns; exceptions named with their reason.
MAX_LINES = 500
LONG_ALLOWED: dict[str, str] = {}


def _module_name(root: Path, path: Path, package: str) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([package, *parts])


def _import_nodes(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node


def _from_target(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    # relative: a package's own __init__ counts as level 1 of itself
    parts = module.split(".")
    base = parts[: len(parts) - node.level + (1 if is_package else 0)]
    return ".".join([*base, node.module] if node.module else base)


def _imports(path: Path, module: str) -> Iterator[str]:
    """Every name imported, and for `from a import b` both `a` and `a.b` (b may be a module)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in _import_nodes(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
            continue
        target = _from_target(node, module, path.name == "__init__.py")
        yield target
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


# The wire format keeps its topics in a module of their own and re-exports them.
PART_OF = {"edgefleet.protocol": ("edgefleet.topics",)}


def _broken(module: str, imported: str) -> str | None:
    if _within(imported, PART_OF.get(module, ())):
        return None
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


def _resolve(name: str, modules: set[str]) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _dependencies(path: Path, module: str, modules: set[str]) -> Iterator[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in _import_nodes(tree):
        if isinstance(node, ast.Import):
            named = [alias.name for alias in node.names]
        else:
            target = _from_target(node, module, path.name == "__init__.py")
            # `from a import b` where a.b is a module depends on a.b, not on a's __init__:
            # that is how a package's __init__ gathers submodules that import each other.
            named = [
                f"{target}.{alias.name}" if f"{target}.{alias.name}" in modules else target
                for alias in node.names
            ]
        for name in named:
            found = _resolve(name, modules)
            if found and found != module:
                yield found


def module_graph(root: Path, package: str = "edgefleet") -> dict[str, set[str]]:
    """Module -> the modules of ours it imports."""
    paths = {_module_name(root, p, package): p for p in sorted(root.rglob("*.py"))}
    modules = set(paths)
    return {m: set(_dependencies(p, m, modules)) for m, p in paths.items()}


def room_of(module: str) -> str:
    """`edgefleet.mqtt.link` -> `mqtt`; a top-level module is its own room."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def room_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    rooms: dict[str, set[str]] = defaultdict(set)
    for module, imported in graph.items():
        rooms[room_of(module)] |= {room_of(i) for i in imported} - {room_of(module)}
    return dict(rooms)


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected parts with more than one member (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                part = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    part.append(member)
                    if member == node:
                        break
                if len(part) > 1:
                    found.append(sorted(part))
    return found


def floor_of(room: str) -> int:
    for level, rooms in enumerate(FLOORS):
        if room in rooms:
            return level
    return 0  # a top-level helper module (errors, logs, fsutil): the ground


def arrows_up(rooms: dict[str, set[str]]) -> list[tuple[str, str]]:
    return sorted(
        (room, other)
        for room, imported in rooms.items()
        for other in imported
        if floor_of(other) > floor_of(room)
    )


def long_modules(*roots: Path) -> dict[str, int]:
    lengths = {}
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            lines = len(path.read_text(encoding="utf-8").splitlines())
            if lines > MAX_LINES:
                lengths[str(path.relative_to(REPO))] = lines
    return lengths


def test_the_package_keeps_its_layers() -> None:
    assert violations(REPO / "agent") == []


def test_no_circle_between_modules() -> None:
    assert circles(module_graph(REPO / "agent")) == []


def test_no_circle_between_rooms() -> None:
    assert circles(room_graph(module_graph(REPO / "agent"))) == []


def test_few_arrows_point_up_a_floor() -> None:
    rooms = room_graph(module_graph(REPO / "agent"))
    unnamed = [arrow for arrow in arrows_up(rooms) if arrow not in UP_ALLOWED]
    assert unnamed == []
    assert len(arrows_up(rooms)) <= MAX_UP


def test_every_room_has_a_floor() -> None:
    placed = {room for rooms in FLOORS for room in rooms}
    subpackages = {p.name for p in (REPO / "agent").iterdir() if (p / "__init__.py").exists()}
    assert subpackages - placed - {"factory", "samples"} == set()


def test_no_module_is_two_concerns_long() -> None:
    lengths = long_modules(REPO / "agent", REPO / "plugins")
    assert {path: n for path, n in lengths.items() if path not in LONG_ALLOWED} == {}


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_the_circle_check_finds_a_circle_and_spares_a_gathering_package(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            # a package gathering its submodules, which import each other through it: no circle
            "cli/__init__.py": "from edgefleet.cli import a, b\n",
            "cli/a.py": "from edgefleet.cli import b\n",
            "cli/b.py": "import edgefleet.cli.c as c\n",
            "cli/c.py": "",
            # a real one across two rooms, and one closed by a type alone
            "mqtt/link.py": "from edgefleet.rollout.manager import X\n",
            "rollout/__init__.py": "",
            "rollout/manager.py": "from ..mqtt.link import Y\n",
            "plugin/hooks.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
            "    from edgefleet.app.agent import Agent\n",
            "app/agent.py": "from edgefleet.plugin.hooks import H\n",
        },
    )
    graph = module_graph(root)
    assert circles(graph) == [
        ["edgefleet.app.agent", "edgefleet.plugin.hooks"],
        ["edgefleet.mqtt.link", "edgefleet.rollout.manager"],
    ]
    assert circles(room_graph(graph)) == [["app", "plugin"], ["mqtt", "rollout"]]
    assert arrows_up(room_graph(graph)) == [("mqtt", "rollout"), ("plugin", "app")]


def test_the_check_notices_a_forbidden_import(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "runtime/__init__.py": "",
            "runtime/pipeline.py": "def f():\n    from edgefleet.mqtt.link import MqttLink\n"
            "    return MqttLink\n",
            "inference/x.py": "from edgefleet_plugins.sources import images\n",
            "protocol.py": "from .errors import UserError\n",
            "fine.py": "from edgefleet.runtime import pipeline\n",
            "app/daemon.py": "import edgefleet.training.model\n",
            "dashboard/view.py": "from edgefleet.collector.store import Store\n",
        },
    )
    assert violations(root) == [
        (
            "edgefleet.app.daemon imports edgefleet.training.model: only the command line trains "
            "models"
        ),
        (
            "edgefleet.dashboard.view imports edgefleet.collector.store: the view reads messages: "
            "it neither stores, connects nor publishes"
        ),
        "edgefleet.inference.x imports edgefleet_plugins.sources: the core never imports a plugin",
        "edgefleet.protocol imports edgefleet.errors: the wire format depends on nothing of ours",
        (
            "edgefleet.runtime.pipeline imports edgefleet.mqtt.link: the loop never knows the "
            "fleet link, rollouts or the composition"
        ),
    ]
