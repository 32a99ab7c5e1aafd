"""The requirements install.sh gives pip on 32-bit Pi OS, where Debian provides the numerics."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import subprocess
import sys
from types import ModuleType

from .conftest import REPO

SCRIPT = REPO / "systemd" / "requirements.py"


def _module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("pi_requirements", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_debian_numerics_leave_out_what_debian_gives_and_every_marker() -> None:
    """On a 64-bit kernel a 32-bit Python says platform_machine == 'aarch64': a marker would
    pick ai-edge-litert there, so the list carries none, and one runtime: tflite-runtime."""
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "system"], capture_output=True, text=True, check=True
    ).stdout.split()
    names = {_module()._name(line) for line in out}
    left_out = {"numpy", "opencv-python-headless", "pyyaml", "cffi", "ai-edge-litert", "pyfastcdc"}
    assert not names & left_out
    assert "tflite-runtime==2.14.*" in out
    assert not any(";" in line for line in out)
    assert "cryptography>=42,<46" in out  # cffi 2 has no armv7l wheel; Debian has 1.15
    declared = [r for r in importlib.metadata.requires("edgefleet") or [] if "extra ==" not in r]
    wanted = {_module()._name(r) for r in declared} - names
    # pyfastcdc has no armv7l wheel: a device there fetches every chunk (docs/rollouts.md).
    assert wanted == {"numpy", "opencv-python-headless", "pyyaml", "ai-edge-litert", "pyfastcdc"}


def test_a_wrong_call_is_one_line_and_exit_2() -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "everything"], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "usage: requirements.py system"
