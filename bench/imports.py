"""Where the agent's memory goes: RSS added by each group of imports (a benchmark: prints only).

    .venv/bin/python bench/imports.py

Each group is imported in a fresh interpreter after the groups above it, in the order the
agent loads them, and the resident set size (VmRSS) is read before and after, so a row is
what that group adds to what was already there. The last rows load the factory model into
an interpreter with XNNPACK and run one invoke, as ``edgefleet run`` does.
"""

from __future__ import annotations

import subprocess
import sys

GROUPS = [
    ("numpy", "import numpy"),
    ("structlog (without rich: see edgefleet/__init__.py)", "import edgefleet.logs"),
    ("pydantic, PyYAML and the config models", "import edgefleet.config.agentconfig"),
    ("LiteRT interpreter", "import edgefleet.inference.litert as L; L.available_runtimes()"),
    ("OpenCV", "import cv2"),
    ("paho, cryptography, fleet link, rollouts", "import edgefleet.mqtt.fleetlink"),
    (
        "the factory lite0 int8 model, loaded, one invoke",
        (
            "from edgefleet.factory import factory_model_path;"
            "from edgefleet.inference.classifier import load_classifier;"
            "from edgefleet_plugins.delegates.cpu import CpuConfig, CpuDelegate;"
            "import numpy as np;"
            "c = load_classifier(factory_model_path(), CpuDelegate(CpuConfig(threads=2)));"
            "c.classify(np.zeros((480, 640, 3), dtype=np.uint8))"
        ),
    ),
]

PROBE = """
import json, sys
def rss():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS:'):
            return int(line.split()[1]) / 1024
    return 0.0
steps = json.loads(sys.argv[1])
out = []
for code in steps:
    before = rss()
    exec(code)
    out.append(rss() - before)
print(json.dumps([rss(), out]))
"""


def main() -> int:
    import json

    codes = [code for _, code in GROUPS]
    result = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(codes)],
        capture_output=True,
        text=True,
        check=True,
    )
    total, added = json.loads(result.stdout.strip().splitlines()[-1])
    print("RSS added by each group, imported in this order in one fresh interpreter:")
    for (name, _), mb in zip(GROUPS, added, strict=True):
        print(f"  {mb:6.1f} MB  {name}")
    print(f"  {total:6.1f} MB  resident at the end (the interpreter itself included)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
