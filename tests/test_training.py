"""Training your own classes (``edgefleet.training``, ``edgefleet models``): real photos.

The folders come from data the project already has: scikit-image's ``lfw_subset`` (faces and
not-faces) and super-classes grouped from the shared ImageNet samples. Tests that train or
export need the ``[train]`` extra; the rest (folders, splits, scores, ``info``, ``evaluate``,
errors) run on the agent's own dependencies.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgefleet.cli import main
from edgefleet.errors import UserError
from edgefleet.factory import factory_model_path
from edgefleet.inference.classifier import read_model_info
from edgefleet.training import ImageFolder, TrainedModel, image_folder, train
from edgefleet.training.evaluate import OTHER, predict_file, score
from edgefleet.training.workflow import Plan, split

from .conftest import REPO, cli_command, needs_train, train_extra_installed
from .mqtt_helpers import Broker, Subscriber, agent_config, running, wait_for

sys.path.insert(0, str(REPO / "tools"))
import sample_datasets


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cli_command(*args), capture_output=True, text=True, timeout=timeout, check=False
    )


def _folder(root: Path, counts: dict[str, int]) -> Path:
    for label, n in counts.items():
        (root / label).mkdir(parents=True)
        for i in range(n):
            # Not decoded when listing or splitting; distinct, since copies split together.
            (root / label / f"{i:02d}.jpg").write_bytes(f"{label} {i}".encode())
    return root


# -- folders and splits (no training) --------------------------------------------------------


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        (None, "not a folder"),
        ({}, "no class subfolders"),
        ({"cat": 3}, "only one class (cat); a classifier needs two"),
        ({"cat": 3, "dog": 0}, "class folder holds no images"),
    ],
)
def test_folder_layout_errors_are_plain(
    tmp_path: Path, layout: dict[str, int] | None, message: str
) -> None:
    root = tmp_path / "photos"
    if layout is not None:
        root.mkdir()
        _folder(root, layout)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ImageFolder(root)


def test_split_is_stratified_seeded_and_refuses_tiny_classes(tmp_path: Path) -> None:
    data = image_folder(_folder(tmp_path, {"a": 20, "b": 10, "c": 30}))
    assert data.labels == ("a", "b", "c")
    first, second = data.split(0.9, seed=3)
    assert first.counts() == {"a": 18, "b": 9, "c": 27}
    assert second.counts() == {"a": 2, "b": 1, "c": 3}
    assert set(first.paths).isdisjoint(second.paths)
    assert sorted(first.paths + second.paths) == sorted(data.paths)
    again, _ = image_folder(tmp_path).split(0.9, seed=3)
    assert again.items == first.items
    other, _ = data.split(0.9, seed=4)
    assert other.items != first.items
    small = image_folder(_folder(tmp_path / "small", {"x": 3, "y": 1}))
    with pytest.raises(UserError, match="class 'y' has 1 image"):
        small.split(0.5)


def test_workflow_split_holds_out_test_then_validation(tmp_path: Path) -> None:
    data = image_folder(_folder(tmp_path, {"a": 50, "b": 30}))
    plan = Plan(data=tmp_path, out=tmp_path / "out", name="m")
    train_part, validation, test = split(data, plan)
    assert validation is not None
    assert test is not None
    assert test.counts() == {"a": 5, "b": 3}
    assert validation.counts() == {"a": 5, "b": 3}
    assert train_part.counts() == {"a": 40, "b": 24}
    bad = Plan(data=tmp_path, out=tmp_path, name="m", validation_split=0.5, test_split=0.5)
    with pytest.raises(UserError, match="leave no training images"):
        split(data, bad)


def test_scores_confusion_precision_recall() -> None:
    truth = np.array([0, 0, 0, 1, 1, 2])
    predicted = np.array([0, 0, 1, 1, OTHER, 2])
    scores = score(("a", "b", "c"), truth, predicted)
    assert scores.confusion.tolist() == [[2, 1, 0, 0], [0, 1, 0, 1], [0, 0, 1, 0]]
    assert scores.accuracy == pytest.approx(4 / 6)
    rows = {r["label"]: r for r in scores.per_class()}
    assert rows["a"] == {
        "label": "a",
        "precision": 1.0,
        "recall": pytest.approx(2 / 3),
        "support": 3,
    }
    assert rows["b"]["precision"] == pytest.approx(0.5)
    assert rows["b"]["recall"] == pytest.approx(0.5)
    assert rows["c"]["precision"] == rows["c"]["recall"] == 1.0


# -- the command line without the extra ------------------------------------------------------


def test_train_bad_input_is_one_line(tmp_path: Path) -> None:
    missing = _run("models", "train", str(tmp_path / "nope"), "-o", str(tmp_path / "out"))
    assert missing.returncode == 2
    assert (
        missing.stderr.strip() == f"error: {tmp_path / 'nope'}: not a folder (expected one "
        "subfolder of photos per class)"
    )
    split_arg = _run("models", "train", str(tmp_path), "-o", "x", "--test-split", "1.5")
    assert split_arg.returncode == 2
    assert "argument --test-split: '1.5' must be at least 0 and below 1" in split_arg.stderr
    assert "Traceback" not in split_arg.stderr


def test_missing_extra_names_the_install_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A None entry makes the import fail as if torch were not installed.
    monkeypatch.setitem(sys.modules, "torch", None)
    data = _folder(tmp_path / "photos", {"a": 2, "b": 2})
    code = main(
        [
            "models",
            "train",
            str(data),
            "-o",
            str(tmp_path / "out"),
            "--cache",
            str(tmp_path / "cache"),
            "--test-split",
            "0",
            "--validation-split",
            "0",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (
        "error: missing package torch==2.13.0: pip install 'edgefleet[train]' "
        "(in a checkout: pip install -e '.[train]')"
    )
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_uninstalled_converter_and_unusable_cache_are_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import importlib.metadata

    data = _folder(tmp_path / "photos", {"a": 2, "b": 2})
    args = ["models", "train", str(data), "-o", str(tmp_path / "out"), "--test-split", "0",
            "--validation-split", "0"]  # fmt: skip
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main([*args, "--cache", str(blocker / "cache")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"error: cache: cannot create output folder {blocker}/cache/backbones: Not a directory "
        "(--cache sets another folder)"
    )

    def absent(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", absent)
    assert main([*args, "--cache", str(tmp_path / "cache")]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: missing package torch: pip install 'edgefleet[train]' "
        "(in a checkout: pip install -e '.[train]')"
    )
    assert not (tmp_path / "out").exists()


def test_models_info_describes_the_factory_model() -> None:
    done = _run("models", "info", str(factory_model_path()), "--json")
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert info["inputs"] == [
        {
            "shape": [1, 224, 224, 3],
            "dtype": "uint8",
            "quantization": {"scale": pytest.approx(1 / 128), "zero_point": 127},
        }
    ]
    assert info["outputs"][0]["shape"] == [1, 1000]
    assert len(info["labels"]) == 1000
    assert info["ops"]["QUANTIZE"] == 2
    assert info["ops"]["CONV_2D"] == 33
    assert info["edgetpu"] is False
    assert info["variant"] == "int8"
    text = _run("models", "info", str(factory_model_path()))
    assert text.returncode == 0
    assert "EdgeTPU" in text.stdout
    assert "[1, 224, 224, 3] uint8, scale 0.0078125 zero point 127" in text.stdout


def test_models_info_refuses_a_non_model(tmp_path: Path) -> None:
    fake = tmp_path / "fake.tflite"
    fake.write_bytes(b"hello world, not a flatbuffer")
    done = _run("models", "info", str(fake))
    assert done.returncode == 2
    assert done.stderr == f"error: {fake}: not a TFLite model (no TFL3 identifier)\n"


def test_models_evaluate_scores_the_factory_model(tmp_path: Path, samples: Path) -> None:
    labels = read_model_info(factory_model_path()).labels
    assert labels is not None
    photos = sorted(samples.glob("n*.JPEG"))
    root = tmp_path / "imagenet"
    chosen = [i for i in range(0, 1000, 50) if "/" not in labels[i]]
    for i in chosen:
        (root / labels[i]).mkdir(parents=True)
        (root / labels[i] / photos[i].name).symlink_to(photos[i])
    (root / labels[chosen[0]] / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    done = _run("models", "evaluate", str(factory_model_path()), str(root), "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["images"] == len(chosen)
    assert result["accuracy"] >= 0.5  # a pretrained lite0 gets about 3 in 4 of these
    assert [s["reason"] for s in result["skipped"]] == ["truncated JPEG (no end-of-image marker)"]
    # Mistakes outside the folder's classes are counted in an extra column, not dropped.
    assert all(len(row) in (len(chosen), len(chosen) + 1) for row in result["confusion"])
    (root / "not-a-label").mkdir()
    (root / "not-a-label" / "x.jpg").symlink_to(photos[0])
    unknown = _run("models", "evaluate", str(factory_model_path()), str(root))
    assert unknown.returncode == 2
    assert unknown.stderr.startswith("error: folder class(es) 'not-a-label' are not labels of ")


# -- training and export (the [train] extra) -------------------------------------------------


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("training-cache")


@pytest.fixture(scope="module")
def faces(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return sample_datasets.faces(tmp_path_factory.mktemp("faces") / "faces")


@pytest.fixture(scope="module")
def faces_run(tmp_path_factory: pytest.TempPathFactory, faces: Path, cache: Path) -> dict[str, Any]:
    if not train_extra_installed():
        pytest.skip("[train] extra not installed")
    out = tmp_path_factory.mktemp("faces-model")
    done = _run(
        "models", "train", str(faces), "-o", str(out), "--cache", str(cache), "--json", timeout=600
    )
    assert done.returncode == 0, done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    assert json.loads((out / "report.json").read_text()) == report
    return report


@pytest.mark.export
@needs_train
def test_faces_train_export_and_report(faces_run: dict[str, Any]) -> None:
    report = faces_run
    assert report["labels"] == ["face", "not-face"]
    assert report["splits"]["test"] == {"face": 10, "not-face": 10}
    assert report["splits"]["train"] == {"face": 80, "not-face": 80}
    test = report["test"]
    assert test["fp32"]["accuracy"] >= 0.9  # chance is 0.5
    assert abs(test["int8"]["accuracy"] - test["fp32"]["accuracy"]) <= 0.02
    # Photos of faces are far from a decision boundary: noise of one grey level moves none.
    assert test["fp32_noise_agreement"] >= 0.95
    head = report["head"]
    assert head["trials"][0]["variant"] == "plain"  # judged on the validation photos
    assert head["variant"] in ("plain", "robust")
    assert head["why"]
    int8 = Path(report["files"]["int8"]["path"])
    fp32 = Path(report["files"]["fp32"]["path"])
    assert int8.name == "faces-int8.tflite"
    assert report["files"]["int8"]["size"] < 0.35 * report["files"]["fp32"]["size"]
    assert report["deploy"] == (
        f"edgefleet rollout publish {int8} --name faces --version 1 --target fleet "
        "--key release.key"
    )
    info = read_model_info(int8)
    assert info.labels == ("face", "not-face")
    assert info.name == "faces"
    assert info.version == 1
    assert read_model_info(fp32).metadata is not None


@pytest.mark.export
@needs_train
def test_trained_model_classifies_held_out_photos_through_classify(
    faces_run: dict[str, Any], faces: Path
) -> None:
    plan = Plan(data=faces, out=faces, name="faces")
    _, _, test = split(image_folder(faces), plan)
    assert test is not None
    int8 = faces_run["files"]["int8"]["path"]
    done = _run("classify", "--model", int8, "--top-k", "1", *map(str, test.paths))
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    predicted = {
        Path(r["input"]).name + Path(r["input"]).parent.name: r["top"][0]["label"] for r in lines
    }
    truth = {p.name + p.parent.name: p.parent.name for p in test.paths}
    assert set(predicted.values()) <= {"face", "not-face"}
    hits = sum(predicted[k] == v for k, v in truth.items())
    assert hits / len(truth) >= 0.9


@pytest.fixture(scope="module")
def groups(tmp_path_factory: pytest.TempPathFactory, samples: Path) -> Path:
    root = tmp_path_factory.mktemp("groups") / "groups"
    return sample_datasets.imagenet_groups(root, per_class=36, samples=samples)


@pytest.fixture(scope="module")
def grouped_model(groups: Path, cache: Path) -> tuple[TrainedModel, ImageFolder, ImageFolder]:
    if not train_extra_installed():
        pytest.skip("[train] extra not installed")
    data = ImageFolder(groups)
    train_data, test_data = data.split(0.75, seed=0)
    model = train(train_data, base="lite0", cache=cache)
    return model, train_data, test_data  # type: ignore[return-value]


@pytest.mark.export
@needs_train
def test_five_steps_on_imagenet_super_classes(
    grouped_model: tuple[TrainedModel, ImageFolder, ImageFolder], tmp_path: Path
) -> None:
    model, _, test_data = grouped_model
    assert model.labels == ("bird", "dog", "food", "other", "reptile")
    head = model.evaluate(test_data)
    assert head.total == 45
    assert head.accuracy >= 0.6  # chance is 0.2
    exported = model.export(tmp_path, "groups")
    fp32 = predict_file(exported.fp32, test_data)
    int8 = predict_file(exported.int8, test_data)
    fp32_scores = score(model.labels, fp32.truth, fp32.predicted)
    int8_scores = score(model.labels, int8.truth, int8.predicted)
    assert fp32_scores.accuracy >= 0.6
    # The exported float network is the backbone plus this head: same answers on every image.
    assert fp32_scores.confusion.tolist() == head.confusion.tolist()
    assert abs(int8_scores.accuracy - fp32_scores.accuracy) <= 0.0225  # one image of 45
    assert read_model_info(exported.int8).labels == model.labels


@pytest.mark.export
@needs_train
def test_the_int8_backbone_sees_what_the_int8_file_holds(
    grouped_model: tuple[TrainedModel, ImageFolder, ImageFolder], tmp_path: Path, cache: Path
) -> None:
    """The robust head learns from an int8 backbone quantized on the export's calibration
    photos: its features must be exactly the pooled features inside the exported int8 file."""
    from ai_edge_litert.interpreter import Interpreter

    from edgefleet.inference.images import decode_image
    from edgefleet.training.features import Extractor, model_sized
    from edgefleet.training.model import calibration_crops
    from edgefleet.training.robust import int8_backbone

    model, train_data, test_data = grouped_model
    exported = model.export(tmp_path, "groups")
    path = int8_backbone(model.extractor, calibration_crops(0, train_data, "data"))
    assert int8_backbone(model.extractor, calibration_crops(0, train_data, "data")) == path
    items = list(test_data.items)[:3]
    features = Extractor(0, cache, backbone=path).extract(items).features
    with warnings.catch_warnings():  # LiteRT's notice that keeping every tensor is for debugging
        warnings.simplefilter("ignore", UserWarning)
        file = Interpreter(model_path=str(exported.int8), experimental_preserve_all_tensors=True)
    file.allocate_tensors()
    pooled = next(op for op in file._get_ops_details() if op["op_name"] == "MEAN")["outputs"][0]
    scale, zero = next(d for d in file.get_tensor_details() if d["index"] == pooled)["quantization"]
    for row, (photo, _) in zip(features, items, strict=True):
        file.set_tensor(
            file.get_input_details()[0]["index"], model_sized(decode_image(photo), 224)[None]
        )
        file.invoke()
        inside = (file.get_tensor(pooled).astype(np.float32).reshape(-1) - zero) * np.float32(scale)
        np.testing.assert_array_equal(row, inside)
    assert np.ptp(features) > 0  # real features, not a constant


@pytest.mark.export
@needs_train
def test_exported_network_is_backbone_plus_head_with_frozen_statistics(
    grouped_model: tuple[TrainedModel, ImageFolder, ImageFolder], tmp_path: Path
) -> None:
    import torch

    from edgefleet.training.convert import efficientnet

    model, _, test_data = grouped_model
    network = model.network()
    pretrained = efficientnet(0, pretrained=True)
    trained_state = network.state_dict()
    backbone = {k: v for k, v in pretrained.state_dict().items() if not k.startswith("_fc.")}
    assert any("running_mean" in key for key in backbone)
    for key, value in backbone.items():
        assert torch.equal(trained_state[key], value), key
    found = model.extractor.extract(list(test_data.items)[:6])
    with torch.no_grad():
        logits = network._fc(torch.from_numpy(found.features)).numpy()
    np.testing.assert_allclose(
        model.head.probabilities(found.features),
        torch.softmax(torch.from_numpy(logits), dim=1).numpy(),
        atol=1e-5,
    )


@pytest.mark.export
@needs_train
def test_litert_features_match_pytorch(
    grouped_model: tuple[TrainedModel, ImageFolder, ImageFolder],
) -> None:
    import torch

    from edgefleet.inference.images import decode_image
    from edgefleet.training.features import backbone_module

    model, _, test_data = grouped_model
    torch_backbone = backbone_module(0)
    items = list(test_data.items)[:4]
    lite = model.extractor.extract(items).features
    for row, (path, _) in zip(lite, items, strict=True):
        buffer = model.extractor._centre.new_buffer()
        model.extractor._centre(decode_image(path), buffer)
        with torch.no_grad():
            ref = torch_backbone(torch.from_numpy(buffer)).numpy()[0]
        np.testing.assert_allclose(row, ref, atol=2e-4, rtol=1e-3)


@pytest.mark.export
@needs_train
def test_feature_cache_hits_and_heals_a_torn_entry(
    grouped_model: tuple[TrainedModel, ImageFolder, ImageFolder],
) -> None:
    model, train_data, _ = grouped_model
    extractor = model.extractor
    items = list(train_data.items)[:5]
    first = extractor.extract(items).features
    hits, misses = extractor.hits, extractor.misses
    again = extractor.extract(items).features
    assert extractor.hits == hits + 5
    assert extractor.misses == misses
    np.testing.assert_array_equal(first, again)
    digest = hashlib.sha256(items[0][0].read_bytes()).hexdigest()
    entry = next(extractor.cache_dir.rglob(f"{digest}-c.npy"))
    entry.write_bytes(entry.read_bytes()[:40])  # an interrupted write
    healed = extractor.extract(list(train_data.items)).features
    assert extractor.misses == misses + 1
    assert healed.shape == (len(train_data), 1280)


@pytest.mark.export
@needs_train
def test_unreadable_photos_are_skipped_and_counted(
    faces: Path, cache: Path, tmp_path: Path
) -> None:
    data = tmp_path / "faces"
    for folder in ("face", "not-face"):
        (data / folder).mkdir(parents=True)
        for photo in sorted((faces / folder).iterdir())[:12]:
            (data / folder / photo.name).symlink_to(photo)
    (data / "face" / "broken.png").write_text("not an image")
    model = train(ImageFolder(data), cache=cache)
    assert [(p.name, r) for p, r in model.skipped] == [
        ("broken.png", "not a decodable image (text)")
    ]
    assert len(model.train_data) == 25
    only_broken = tmp_path / "broken"
    for folder in ("a", "b"):
        (only_broken / folder).mkdir(parents=True)
    (only_broken / "a" / "x.png").write_text("not an image")
    (only_broken / "b" / "y.png").symlink_to(min((faces / "face").iterdir()))
    with pytest.raises(UserError, match=r"no readable training image left for class.*'a'"):
        train(ImageFolder(only_broken), cache=cache)


@pytest.mark.export
@needs_train
@pytest.mark.slow
def test_trained_model_rolls_out_and_the_agent_reports_its_labels(
    faces_run: dict[str, Any], tmp_path: Path, broker: Broker, keys: tuple[Path, Path]
) -> None:
    pem = keys[1].read_text().replace("\n", "\\n")
    extra = f'rollout:\n  trusted_keys: {{release: "{pem}"}}\n  health_frames: 10\n'
    config = agent_config(tmp_path, broker.url, fps=20, extra=extra)
    sub = Subscriber(broker.port, ["edgefleet/v1/devices/#"]).start()
    with running(config) as agent:
        wait_for(lambda: len(sub.result_seqs()) > 10, 30, "results on the factory model")
        # The line `models train` printed, with this test's key, target and broker.
        line = faces_run["deploy"].split()[1:]
        line[line.index("fleet")] = "device:dev-1"
        line[line.index("release.key")] = str(keys[0])
        done = _run(*line, "--broker", broker.url, "--wait-timeout", "120", timeout=180)
        assert done.returncode == 0, done.stderr
        wait_for(
            lambda: any(
                r["model"] == "faces" for m in sub.on("/predictions") for r in m.json()["results"]
            ),
            30,
            "results from the trained model",
        )
        agent.terminate()
    sub.stop()
    results = [r for m in sub.on("/predictions") for r in m.json()["results"]]
    trained = [r for r in results if r["model"] == "faces"]
    assert {t["label"] for r in trained for t in r["top"]} <= {"face", "not-face"}
    assert trained[-1]["model_version"] == 1
    seqs = [r["seq"] for r in results]
    assert seqs == list(range(1, len(seqs) + 1))  # served throughout the swap


@pytest.mark.export
@needs_train
def test_fine_tune_moves_only_the_last_block_and_exports_what_it_learned(
    grouped_model: tuple[TrainedModel, ImageFolder, ImageFolder], cache: Path, tmp_path: Path
) -> None:
    import torch

    from edgefleet.training.convert import efficientnet

    head_only, train_data, test_data = grouped_model
    from edgefleet.training.head import L2_GRID

    model = train(train_data, base="lite0", cache=cache, fine_tune_epochs=2)
    assert model.tuned is not None
    assert [r.get("fine_tune", 0.0) for r in model.head.history] == [0.0] * len(L2_GRID) + [
        1.0,
        1.0,
    ]
    tuned = model.network().state_dict()
    pretrained = efficientnet(0, pretrained=True).state_dict()
    last = f"_blocks.{len(efficientnet(0, pretrained=True)._blocks) - 1}."
    changed = {k for k, v in pretrained.items() if not torch.equal(tuned[k], v)}
    assert f"{last}_project_conv.weight" in changed
    assert "_conv_head.weight" in changed
    assert all(k.startswith((last, "_conv_head.", "_bn1.", "_fc.")) for k in changed), changed
    assert not any("running_" in k for k in changed)  # batch-norm statistics never move
    scores = model.evaluate(test_data)
    assert scores.accuracy >= 0.6
    exported = model.export(tmp_path, "tuned")
    fp32 = predict_file(exported.fp32, test_data)
    assert score(model.labels, fp32.truth, fp32.predicted).confusion.tolist() == (
        scores.confusion.tolist()
    )
    int8 = predict_file(exported.int8, test_data)
    assert float(np.mean(int8.predicted == fp32.predicted)) >= 0.95
    assert head_only.tuned is None
