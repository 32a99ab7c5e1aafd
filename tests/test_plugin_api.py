"""The plugin API: one stable import, the old paths kept, and plugins from outside the tree.

Each out-of-tree plugin is a package of its own (pyproject, entry point in
``edgefleet.plugins``), installed with pip from its own directory into a folder of its own
(``--target``, so the project's venv is not touched), and used by ``edgefleet run`` through
``PYTHONPATH`` as an installed distribution: found by its entry point, loaded, serving.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

import edgefleet.plugin as api

from .conftest import cli_command

OLD_PATHS = {
    "edgefleet.hookspecs": ["hookimpl", "hookspec", "PROJECT", "ENTRY_POINT_GROUP"],
    "edgefleet.registry": ["PluginConfig", "Registry", "nested_section"],
    "edgefleet.sourceoffers": ["SourceOffer"],
    "edgefleet.sources": ["Source", "ThreadedSource", "OpenCvSource", "EndOfStream"],
    "edgefleet.sinks": ["Sink"],
    "edgefleet.delegates": ["Delegate", "Availability", "Interpreter"],
    "edgefleet.results": ["Result", "Label", "ResultFilter"],
    "edgefleet.frames": ["Frame"],
}


def test_every_name_of_the_api_resolves_and_nothing_else_does() -> None:
    for name in api.__all__:
        assert getattr(api, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'Pipeline'"):
        api.Pipeline  # noqa: B018 - an attribute access that must fail
    assert api.API_VERSION >= 1
    assert set(dir(api)) == set(api.__all__)


@pytest.mark.parametrize("old", sorted(OLD_PATHS))
def test_the_old_paths_still_import_with_a_deprecation_warning(old: str) -> None:
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=rf"{old} is deprecated: import from edgefleet"):
        module = importlib.import_module(old)
    for name in OLD_PATHS[old]:
        if name in api.__all__:
            assert getattr(module, name) is getattr(api, name), (old, name)
        else:
            assert getattr(module, name) is not None


NEW_STYLE = """
from typing import Literal
from pathlib import Path
from edgefleet.plugin import PluginConfig, Registry, Result, Sink, hookimpl
"""
OLD_STYLE = """
from typing import Literal
from pathlib import Path
from edgefleet.hookspecs import hookimpl
from edgefleet.registry import PluginConfig, Registry
from edgefleet.results import Result
from edgefleet.sinks import Sink
"""
BODY = """

class TallyConfig(PluginConfig):
    type: Literal["{kind}"] = "{kind}"
    path: Path


class TallySink(Sink):
    name = "{kind}"

    def __init__(self, config: TallyConfig) -> None:
        self.file = config.path.open("a")

    def emit(self, result: Result) -> None:
        self.file.write(f"{{result.seq}}\\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


@hookimpl
def edgefleet_register_sinks(registry: Registry[Sink]) -> None:
    registry.add("{kind}", TallyConfig, TallySink, "counts results into a file")
"""


def _package(root: Path, name: str, header: str) -> Path:
    folder = root / name
    (folder / name).mkdir(parents=True)
    (folder / name / "__init__.py").write_text(header + BODY.format(kind=name.replace("_", "-")))
    (folder / "pyproject.toml").write_text(
        textwrap.dedent(
            f"""\
            [build-system]
            requires = ["setuptools>=61"]
            build-backend = "setuptools.build_meta"

            [project]
            name = "{name}"
            version = "1.0"

            [project.entry-points."edgefleet.plugins"]
            {name} = "{name}"
            """
        )
    )
    return folder


@pytest.mark.slow
def test_out_of_tree_plugins_for_each_import_load_and_serve(tmp_path: Path) -> None:
    site = tmp_path / "site"
    for name, header in (("tally_new", NEW_STYLE), ("tally_old", OLD_STYLE)):
        folder = _package(tmp_path / "src", name, header)
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
             "--target", str(site), str(folder)],
            check=True, capture_output=True, timeout=300,
        )  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(site), "COLUMNS": "400"}  # no folded cells
    listing = subprocess.run(
        cli_command("plugins"), capture_output=True, text=True, env=env, check=True, timeout=120
    ).stdout
    for name in ("tally_new", "tally_old"):
        row = next(line for line in listing.splitlines() if name in line)
        assert "loaded" in row, listing
        assert f"sink:{name.replace('_', '-')}" in row, listing
    rows = {
        n: next(line for line in listing.splitlines() if n in line)
        for n in ("tally_new", "tally_old")
    }
    assert "deprecated imports: edgefleet.hookspecs, edgefleet.registry" in rows["tally_old"]
    assert "deprecated" not in rows["tally_new"]
    config = tmp_path / "agent.yaml"
    config.write_text(
        "source: {type: synthetic, fps: 20, width: 64, height: 48}\n"
        f"sinks:\n  - {{type: tally-new, path: {tmp_path / 'new.txt'}}}\n"
        f"  - {{type: tally-old, path: {tmp_path / 'old.txt'}}}\n"
        f"state_dir: {tmp_path / 'state'}\nlogging: {{format: json}}\n"
    )
    with warnings.catch_warnings():
        run = subprocess.run(
            cli_command("run", "-c", str(config), "--duration", "3"),
            capture_output=True, text=True, env=env, timeout=120, check=False,
        )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    new = (tmp_path / "new.txt").read_text().split()
    old = (tmp_path / "old.txt").read_text().split()
    assert len(new) >= 10
    assert new == old  # both saw every result, in order
    events = [json.loads(line) for line in run.stderr.splitlines() if line.startswith("{")]
    assert any(e.get("event") == "plugin uses deprecated imports" for e in events)
