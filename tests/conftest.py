"""Shared fixtures: the plugin manager, the factory model, the shared ImageNet photos."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.factory import factory_model_path
from edgefleet.inference.classifier import Classifier, load_classifier
from edgefleet.plugin.manager import Plugins, make_plugin_manager
from edgefleet_plugins.delegates.cpu import CpuConfig, CpuDelegate

from .mqtt_helpers import Broker

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("EDGEFLEET_SHARED", REPO.parent / "shared"))
SAMPLES = SHARED / "imagenet-samples"
# Photos the factory model gets right with high confidence (checked by hand, >0.85).
CLEAR_PHOTOS = {
    "n01443537_goldfish.JPEG": "goldfish",
    "n07920052_espresso.JPEG": "espresso",
    "n02504458_African_elephant.JPEG": "African elephant",
    "n07747607_orange.JPEG": "orange",
    "n01531178_goldfinch.JPEG": "goldfinch",
    "n02085620_Chihuahua.JPEG": "Chihuahua",
}


def train_extra_installed() -> bool:
    """torch and litert-torch import: the [train] extra (model export and training)."""
    try:
        import litert_torch  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


needs_train = pytest.mark.skipif(not train_extra_installed(), reason="[train] extra not installed")


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "edgefleet", *args]


@pytest.fixture(scope="session")
def samples() -> Path:
    if not SAMPLES.is_dir():
        pytest.skip(f"shared ImageNet samples not found at {SAMPLES}")
    return SAMPLES


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A release signing key pair (private, public), made once."""
    from edgefleet.rollout.release import generate_keys

    return generate_keys(tmp_path_factory.mktemp("keys"), "release")


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """A private mosquitto on a free loopback port, killed afterwards."""
    started = Broker(tmp_path).start()
    yield started
    started.kill()


@pytest.fixture(scope="session")
def plugins() -> Plugins:
    return make_plugin_manager()


@pytest.fixture(scope="session")
def cpu_delegate() -> CpuDelegate:
    return CpuDelegate(CpuConfig(threads=2))


@pytest.fixture
def classifier(cpu_delegate: CpuDelegate) -> Classifier:
    return load_classifier(factory_model_path(), cpu_delegate)
