"""The agent's requirements for a venv whose numerics come from Debian (run by install.sh).

    python3 systemd/requirements.py system   # one requirement per line

32-bit Raspberry Pi OS (armhf) has no PyPI wheels for OpenCV, numpy, PyYAML or cffi, and the
only LiteRT build for it is tflite-runtime 2.14, which needs numpy < 2. There the installer
takes those four from Debian (``python3-opencv``, ``python3-numpy``, ``python3-yaml``,
``python3-cffi``), installs the project with ``--no-deps`` into a venv that sees the system's
packages, and then installs what this prints: the project's other requirements from
pyproject.toml, with their environment markers dropped (on a 64-bit kernel a 32-bit Python
still reports ``platform_machine == 'aarch64'``, which would pick ai-edge-litert), and
tflite-runtime 2.14 as the runtime (and not pyfastcdc: see ``NOT_ON_ARMHF``).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import tomllib

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
# Distribution names (normalised) that Debian provides in this mode, and the runtimes.
FROM_DEBIAN = {"numpy", "opencv-python-headless", "pyyaml", "cffi"}
RUNTIMES = {"ai-edge-litert", "tflite-runtime"}
RUNTIME = "tflite-runtime==2.14.*"
# No armv7l wheel: pip would build it under the installer, and without a compiler get the
# pure-Python chunker, which the agent does not use (it fetches every chunk instead).
NOT_ON_ARMHF = {"pyfastcdc"}
# Bounds that Debian's packages set here: cryptography 46 and later need cffi 2, which has no
# armv7l wheel (pip would compile it, without a compiler) while Debian 12 ships cffi 1.15.
WITH_DEBIAN = {"cryptography": ",<46"}


def _name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if match is None:
        raise ValueError(f"not a requirement: {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def system_numerics(dependencies: list[str]) -> list[str]:
    """The requirements to install beside Debian's numerics: no markers, no runtime but one."""
    wanted = []
    for requirement in dependencies:
        name = _name(requirement)
        if name in FROM_DEBIAN or name in RUNTIMES or name in NOT_ON_ARMHF:
            continue
        wanted.append(requirement.split(";", 1)[0].strip() + WITH_DEBIAN.get(name, ""))
    return [*wanted, RUNTIME]


def main(argv: list[str]) -> int:
    if argv != ["system"]:
        print("usage: requirements.py system", file=sys.stderr)
        return 2
    project = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]
    print("\n".join(system_numerics(project["dependencies"])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
