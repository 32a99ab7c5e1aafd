"""Packed model files: labels and sidecar appended as a zip, byte-for-byte reproducible."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from edgefleet.errors import ModelError
from edgefleet.factory import factory_model_path
from edgefleet.inference.classifier import read_model_info
from edgefleet.inference.modelfile import InputSpec, ModelMetadata, pack, read_packed

META = ModelMetadata(name="m", variant="int8", version=3, input=InputSpec(height=8, width=8))
FLATBUFFER = b"\x1c\x00\x00\x00TFL3" + bytes(64)


def _bare_flatbuffer() -> bytes:
    data = factory_model_path().read_bytes()
    # The flatbuffer is everything before the first zip local-file header we appended.
    with zipfile.ZipFile(factory_model_path()) as zf:
        first = min(info.header_offset for info in zf.infolist())
    return data[:first]


def test_roundtrip(tmp_path: Path) -> None:
    path = tmp_path / "m.tflite"
    path.write_bytes(pack(FLATBUFFER, ["a", "b"], META))
    contents = read_packed(path)
    assert contents.labels == ["a", "b"]
    assert contents.metadata == META
    assert path.read_bytes().startswith(FLATBUFFER)


def test_pack_is_deterministic() -> None:
    assert pack(FLATBUFFER, ["x"], META) == pack(FLATBUFFER, ["x"], META)


def test_plain_tflite_has_no_labels(tmp_path: Path) -> None:
    path = tmp_path / "plain.tflite"
    path.write_bytes(_bare_flatbuffer())
    info = read_model_info(path)
    assert info.labels is None
    assert info.metadata is None
    assert info.name == "plain"


def test_repacking_factory_flatbuffer_reproduces_the_file() -> None:
    original = read_packed(factory_model_path())
    assert original.metadata is not None
    again = pack(_bare_flatbuffer(), original.labels, original.metadata)
    assert again == factory_model_path().read_bytes()


def test_not_a_flatbuffer_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="TFL3"):
        pack(b"hello world", None, META)
    junk = tmp_path / "junk.tflite"
    junk.write_bytes(b"this is not a model at all")
    with pytest.raises(ModelError, match="not a TFLite model"):
        read_model_info(junk)


def test_missing_model_file(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="model file not found"):
        read_model_info(tmp_path / "absent.tflite")


def test_corrupt_sidecar(tmp_path: Path) -> None:
    path = tmp_path / "bad.tflite"
    path.write_bytes(FLATBUFFER)
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr("edgefleet.json", '{"name": "m", "variant": 12345}')
    with pytest.raises(ModelError, match=r"edgefleet\.json invalid"):
        read_packed(path)


def test_damaged_archive(tmp_path: Path) -> None:
    path = tmp_path / "damaged.tflite"
    data = bytearray(pack(FLATBUFFER, ["a"], META))
    data[len(FLATBUFFER) + 40] ^= 0xFF  # inside the labels member: CRC no longer matches
    path.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="embedded archive unreadable"):
        read_packed(path)


def test_labels_file_overrides_embedded(tmp_path: Path) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(f"class{i}" for i in range(1000)) + "\n")
    info = read_model_info(factory_model_path(), labels)
    assert info.labels is not None
    assert info.labels[5] == "class5"
