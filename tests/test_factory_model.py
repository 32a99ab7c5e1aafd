"""The bundled factory model: integrity, shape, labels, and real classifications."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from edgefleet.factory import FACTORY_MODEL_NAME, factory_model_path, recorded_sha256
from edgefleet.inference.classifier import Classifier, read_model_info
from edgefleet.inference.images import decode_image

from .conftest import CLEAR_PHOTOS, REPO, cli_command

# Also written down in docs/models.md; a changed model must change both.
FACTORY_SHA256 = "1765564f019372bf8d7d3eda53430009e9af4c3cc744b74f7c68eeb69cd78f5e"


def test_factory_sha256_matches_record() -> None:
    data = factory_model_path().read_bytes()
    assert hashlib.sha256(data).hexdigest() == FACTORY_SHA256
    assert recorded_sha256()[FACTORY_MODEL_NAME] == FACTORY_SHA256
    assert FACTORY_SHA256 in (REPO / "docs" / "models.md").read_text()


def test_committed_models_are_recorded() -> None:
    for name, digest in recorded_sha256().items():
        path = factory_model_path().parent / name
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, name


def test_factory_input_output_spec(classifier: Classifier) -> None:
    inp = classifier.interpreter.get_input_details()[0]
    out = classifier.interpreter.get_output_details()[0]
    assert list(inp["shape"]) == [1, 224, 224, 3]
    assert inp["dtype"] == np.uint8
    scale, zero = inp["quantization"]
    assert scale == pytest.approx(1 / 128)
    assert zero == 127
    assert list(out["shape"]) == [1, 1000]
    assert out["dtype"] == np.uint8


def test_labels_and_metadata_come_from_the_file_itself() -> None:
    info = read_model_info(factory_model_path())
    assert info.labels is not None
    assert len(info.labels) == 1000
    assert info.labels[0] == "tench"
    assert info.labels[967] == "espresso"
    assert info.metadata is not None
    assert info.metadata.name == "efficientnet-lite0"
    assert info.metadata.variant == "int8"
    assert info.metadata.trained
    assert (info.metadata.input.mean, info.metadata.input.std) == (127.0, 128.0)


@pytest.mark.parametrize(("photo", "label"), sorted(CLEAR_PHOTOS.items()))
def test_classifies_clear_photos(
    classifier: Classifier, samples: Path, photo: str, label: str
) -> None:
    scores = classifier.classify(decode_image(samples / photo))
    top = classifier.top(scores, 5)
    assert top[0].label == label
    assert top[0].score > 0.5
    assert 0.0 <= top[-1].score <= top[0].score <= 1.0


def test_bundled_demo_photos(classifier: Classifier) -> None:
    sample_dir = Path(factory_model_path()).parent.parent / "samples"
    coffee = classifier.top(classifier.classify(decode_image(sample_dir / "coffee.jpg")), 1)
    assert coffee[0].label == "espresso"
    cat = classifier.top(classifier.classify(decode_image(sample_dir / "chelsea.jpg")), 3)
    assert {t.label for t in cat} <= {"tabby", "tiger cat", "Egyptian cat"}


def test_classify_cli_on_shared_photos(samples: Path) -> None:
    photos = [samples / name for name in sorted(CLEAR_PHOTOS)]
    proc = subprocess.run(
        cli_command("classify", "--top-k", "3", *map(str, photos)),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [Path(d["input"]).name for d in lines] == sorted(CLEAR_PHOTOS)
    for record in lines:
        assert record["top"][0]["label"] == CLEAR_PHOTOS[Path(record["input"]).name]
        assert len(record["top"]) == 3
