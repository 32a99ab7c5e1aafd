"""Plugin loading: entry points, isolation of broken plugins, block list, hooks."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import pytest

from edgefleet.plugin.hookspecs import ENTRY_POINT_GROUP, hookimpl
from edgefleet.plugin.manager import make_plugin_manager
from edgefleet.plugin.registry import PluginConfig, Registry

from .conftest import cli_command

if TYPE_CHECKING:
    from edgefleet.app.agent import Agent

BUILTINS = {
    "synthetic",
    "images",
    "video",
    "camera",
    "rtsp",
    "picamera2",
    "auto-source",
    "stdout",
    "jsonl",
    "cpu",
}


def _write_thirdparty(root: Path) -> None:
    """A fake installed distribution with three plugins: broken, mistyped, good."""
    dist = root / "thirdparty_plugins-1.2.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: thirdparty-plugins\nVersion: 1.2\n"
    )
    (dist / "entry_points.txt").write_text(
        textwrap.dedent(f"""\
        [{ENTRY_POINT_GROUP}]
        broken = tp_broken
        mistyped = tp_mistyped
        goodsink = tp_goodsink
        """)
    )
    (root / "tp_broken.py").write_text("raise ImportError('libfoo.so.3 missing')\n")
    (root / "tp_mistyped.py").write_text(
        textwrap.dedent("""\
        from edgefleet.plugin import hookimpl

        @hookimpl
        def edgefleet_register_sources(regsitry):
            pass
        """)
    )
    (root / "tp_goodsink.py").write_text(
        textwrap.dedent("""\
        from typing import Literal
        from edgefleet.plugin import hookimpl
        from edgefleet.plugin.registry import PluginConfig
        from edgefleet.runtime.sinks import Sink

        class NullConfig(PluginConfig):
            type: Literal["null"] = "null"

        class NullSink(Sink):
            name = "null"
            def __init__(self, config): self.count = 0
            def emit(self, result): self.count += 1

        @hookimpl
        def edgefleet_register_sinks(registry):
            registry.add("null", NullConfig, NullSink, "discards results")
        """)
    )


@pytest.fixture
def thirdparty(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    _write_thirdparty(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_builtins_load_through_entry_points(plugins: Any) -> None:
    records = {r.name: r for r in plugins.records}
    assert set(records) >= BUILTINS
    assert all(records[name].origin == "built-in" for name in BUILTINS)
    assert all(records[name].status == "loaded" for name in BUILTINS)
    assert plugins.registries.sources.get("images").plugin == "images"
    assert "register_sources" in " ".join(records["synthetic"].hooks)


def test_broken_and_mistyped_plugins_are_isolated(thirdparty: Path) -> None:
    plugins = make_plugin_manager()
    records = {r.name: r for r in plugins.records}
    assert records["broken"].status == "failed"
    assert records["broken"].error == "load: ImportError: libfoo.so.3 missing"
    assert records["broken"].origin == "thirdparty-plugins 1.2"
    assert records["mistyped"].status == "failed"
    assert "PluginValidationError" in records["mistyped"].error
    assert records["goodsink"].status == "loaded"
    assert "null" in plugins.registries.sinks.names()
    # The built-ins are untouched by their neighbours' failures.
    assert all(records[name].status == "loaded" for name in BUILTINS)


def test_block_list(thirdparty: Path) -> None:
    plugins = make_plugin_manager(block=["goodsink", "rtsp"])
    records = {r.name: r for r in plugins.records}
    assert records["goodsink"].status == "blocked"
    assert records["rtsp"].status == "blocked"
    assert "null" not in plugins.registries.sinks.names()
    assert "rtsp" not in plugins.registries.sources.names()


class _DupSource:
    """Registers a type that a built-in already owns: its registration fails alone."""

    class Config(PluginConfig):
        type: str = "images"

    @hookimpl
    def edgefleet_register_sources(self, registry: Registry[Any]) -> None:
        registry.add("images", self.Config, lambda c: None)


class _ExplodingLifecycle:
    started = False

    @hookimpl
    def edgefleet_start(self, agent: Any) -> None:
        raise RuntimeError("boom")

    @hookimpl
    def edgefleet_stop(self, agent: Any) -> None:
        _ExplodingLifecycle.started = True


def test_registration_failure_is_isolated() -> None:
    plugins = make_plugin_manager(extra=[("dup", _DupSource())])
    record = next(r for r in plugins.records if r.name == "dup")
    assert record.status == "failed"
    assert "already registered by images" in record.error
    images = plugins.registries.sources.get("images")
    assert images is not None
    assert images.plugin == "images"


def test_lifecycle_hook_errors_do_not_propagate() -> None:
    plugins = make_plugin_manager(extra=[("exploding", _ExplodingLifecycle())])
    agent = cast("Agent", object())  # the hooks raise before they look at it
    plugins.lifecycle("edgefleet_start", agent=agent)
    plugins.lifecycle("edgefleet_stop", agent=agent)
    assert _ExplodingLifecycle.started


def test_entry_points_are_loaded_each_in_isolation() -> None:
    eps = [
        EntryPoint("nosuchmodule", "edgefleet_no_such_module", ENTRY_POINT_GROUP),
        EntryPoint("cpu", "edgefleet_plugins.delegates.cpu", ENTRY_POINT_GROUP),
    ]
    plugins = make_plugin_manager(entry_points=eps)
    records = {r.name: r for r in plugins.records}
    assert records["nosuchmodule"].status == "failed"
    assert "ModuleNotFoundError" in records["nosuchmodule"].error
    assert plugins.registries.delegates.names() == ["cpu"]


def test_plugins_cli_lists_failures(thirdparty: Path) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(thirdparty), *sys.path]),
        "COLUMNS": "200",
    }
    proc = subprocess.run(
        cli_command("plugins"), capture_output=True, text=True, timeout=60, env=env, check=False
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "broken" in out
    assert "failed: load: ImportError: libfoo.so.3 missing" in out
    assert "thirdparty-plugins 1.2" in out
    assert "sink:null" in out
    assert "source:images" in out
    assert "2 plugin(s) failed to load" in out
