"""The head, the gates and the splits of ``models train`` on data unlike ImageNet.

The head is checked on features made here (numpy), against scikit-learn's logistic
regression with its regularisation chosen by cross-validation: what a careful user would
fit by hand on the same features. The gates and the duplicate handling need no model.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgefleet.errors import UserError
from edgefleet.training.dataset import image_folder
from edgefleet.training.gates import MIN_AGREEMENT, judge

from .conftest import needs_train

# Five classes that differ in 6 of 65 features (one of them dead), the rest noise: like
# backbone features of photos the backbone was never trained on.
_CENTRES = np.random.default_rng(42).normal(0, 1, (5, 6))


def _draw(rng: np.random.Generator, per_class: int) -> tuple[np.ndarray, np.ndarray]:
    rows, targets = [], []
    for label in range(5):
        signal = _CENTRES[label] + rng.normal(0, 0.9, (per_class, 6))
        noise = rng.normal(0, 1, (per_class, 58))
        rows.append(np.hstack([signal, noise, np.zeros((per_class, 1))]))
        targets.append(np.full(per_class, label))
    return np.vstack(rows).astype(np.float32), np.concatenate(targets)


@needs_train
def test_the_head_converges_says_why_and_matches_a_tuned_logistic_regression() -> None:
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from edgefleet.training.head import L2_GRID, train_head

    gaps = []
    for seed in range(3):
        rng = np.random.default_rng(100 + seed)
        x, y = _draw(rng, 60)
        vx, vy = _draw(rng, 20)
        tx, ty = _draw(rng, 200)
        head = train_head(x, y, 5, (vx, vy))
        assert head.fit["stopped"].startswith("converged"), head.fit
        assert head.fit["l2"] in L2_GRID
        assert [r["l2"] for r in head.history] == list(L2_GRID)
        assert head.fit["fitted_on"] == len(y) + len(vy)
        ours = float(np.mean(head.predict(tx) == ty))
        reference = make_pipeline(
            StandardScaler(), LogisticRegressionCV(Cs=10, cv=5, max_iter=5000)
        )
        with warnings.catch_warnings():  # scikit-learn's notices of its next defaults
            warnings.simplefilter("ignore", FutureWarning)
            reference.fit(np.vstack([x, vx]), np.concatenate([y, vy]))
        theirs = float(np.mean(reference.predict(tx) == ty))
        gaps.append(theirs - ours)
    assert max(gaps) <= 0.03, gaps  # 1,000 test rows each: 3 points is beyond noise
    assert float(np.mean(gaps)) <= 0.01, gaps


@needs_train
def test_without_a_validation_split_the_strength_is_chosen_on_folds() -> None:
    from edgefleet.training.head import FOLDS, L2_GRID, train_head

    steps: list[tuple[int, int]] = []
    x, y = _draw(np.random.default_rng(7), 30)
    head = train_head(x, y, 5, None, lambda done, total: steps.append((done, total)))
    assert head.fit["chosen_on"] == f"{FOLDS} folds of train"
    assert head.fit["fitted_on"] == len(y)
    assert steps[-1] == (len(L2_GRID) * FOLDS + 1,) * 2
    assert [d for d, _ in steps] == sorted(d for d, _ in steps)


@needs_train
def test_a_rare_class_weighs_as_much_as_the_others() -> None:
    """90 photos of one class, 10 of another: unweighted, the rare class's recall suffers;
    weighted by n / (classes * count) it is recalled about as well as the common one."""
    from edgefleet.training.head import class_weights, train_head

    rng = np.random.default_rng(3)
    centres = np.array([[0.0, 0.0], [1.6, 0.0]])

    def draw(counts: list[int]) -> tuple[np.ndarray, np.ndarray]:
        parts = [centres[k] + rng.normal(0, 1, (n, 2)) for k, n in enumerate(counts)]
        noise = rng.normal(0, 1, (sum(counts), 8))
        return (
            np.hstack([np.vstack(parts), noise]).astype(np.float32),
            np.repeat(np.arange(len(counts)), counts),
        )

    x, y = draw([450, 50])
    assert class_weights(y, 2).tolist() == pytest.approx([500 / 900, 500 / 100])
    head = train_head(x, y, 2, draw([90, 10]))
    assert head.class_weights == pytest.approx([500 / 900, 500 / 100])
    tx, ty = draw([2000, 2000])
    predicted = head.predict(tx)
    recall = [float(np.mean(predicted[ty == k] == k)) for k in range(2)]
    assert min(recall) >= 0.7, recall  # unweighted, the rare class's recall is about 0.4
    assert abs(recall[0] - recall[1]) <= 0.12, recall


def _test_section(fp32: float, int8: float, agreement: float, images: int = 200) -> dict[str, Any]:
    def scores(accuracy: float) -> dict[str, Any]:
        return {"accuracy": accuracy, "images": images}

    return {"fp32": scores(fp32), "int8": scores(int8), "int8_agreement": agreement}


@pytest.mark.parametrize(
    ("fp32", "int8", "agreement", "minimum", "refused"),
    [
        (0.95, 0.95, 1.0, None, []),
        (0.95, 0.945, 0.985, 0.9, []),
        (0.95, 0.95, 0.975, None, ["int8_agreement"]),
        (0.95, 0.93, 0.99, None, ["int8_loss"]),
        (0.95, 0.96, 0.99, None, []),  # int8 better than fp32 is no loss
        (0.80, 0.80, 1.0, 0.85, ["min_accuracy"]),
        (0.74, 0.39, 0.38, None, ["int8_agreement", "int8_loss"]),  # the scans
    ],
)
def test_the_gates_refuse_what_int8_or_the_user_would_not_accept(
    fp32: float, int8: float, agreement: float, minimum: float | None, refused: list[str]
) -> None:
    verdict = judge(_test_section(fp32, int8, agreement), minimum)
    failed = [c["name"] for c in verdict["checks"] if not c["passed"]]
    assert failed == refused
    assert verdict["passed"] is (not refused)
    assert len(verdict["refused"]) == len(refused)
    assert MIN_AGREEMENT == 0.98


def test_no_test_split_is_a_refusal_that_says_so() -> None:
    for test in (None, _test_section(0.9, 0.9, 1.0, images=0)):
        verdict = judge(test, None)
        assert not verdict["passed"]
        assert "no held-out test photos" in verdict["refused"][0]


def _png(path: Path, value: int) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (8, 8), value).save(path)


def test_copies_of_a_photo_stay_in_one_split_and_are_listed(tmp_path: Path) -> None:
    """A photo saved twice under two names must not be learned from and tested on: both
    copies land in the same part for every seed, and ``duplicates`` names them, the copy
    filed under another class too."""
    for label in ("a", "b"):
        for n in range(10):
            _png(tmp_path / label / f"{n}.png", n * 20 + (label == "b"))
    (tmp_path / "a" / "copy-of-3.png").write_bytes((tmp_path / "a" / "3.png").read_bytes())
    (tmp_path / "b" / "also-a-3.png").write_bytes((tmp_path / "a" / "3.png").read_bytes())
    data = image_folder(tmp_path)
    groups = data.duplicates()
    assert len(groups) == 1
    assert sorted((p.name, c) for p, c in groups[0]) == [
        ("3.png", "a"),
        ("also-a-3.png", "b"),
        ("copy-of-3.png", "a"),
    ]
    for seed in range(20):
        first, second = data.split(0.7, seed)
        names = {p.name for p in first.paths if p.parent.name == "a"}
        assert ("3.png" in names) == ("copy-of-3.png" in names), seed
        assert len(first) + len(second) == len(data)


def test_a_class_of_copies_cannot_be_split_and_says_how_many_differ(tmp_path: Path) -> None:
    for n in range(6):
        _png(tmp_path / "a" / f"{n}.png", n * 30)
        _png(tmp_path / "b" / f"{n}.png", 7)  # six copies of one picture
    with pytest.raises(UserError, match=r"class 'b' has 6 image\(s\) \(1 different\): too few"):
        image_folder(tmp_path).split(0.8)


@pytest.mark.export
@needs_train
@pytest.mark.slow
def test_a_model_below_its_gates_is_not_offered_unless_forced(tmp_path: Path) -> None:
    """Noise photos with made-up classes (12 test photos: all right by chance 1 in 4,096):
    the model is written and reported, but with a
    least accuracy it cannot reach there is no deploy line and the exit code is 3, with one
    line that says which gate refused it; ``--force`` offers it, saying so."""
    import json
    import subprocess

    from PIL import Image

    from .conftest import cli_command

    rng = np.random.default_rng(5)
    for label in ("left", "right"):
        (tmp_path / "data" / label).mkdir(parents=True)
        for n in range(15):
            pixels = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "data" / label / f"{n}.png")
    common = ["--test-split", "0.4", "--cache", str(tmp_path / "cache"), "--min-accuracy", "0.99"]
    refused = subprocess.run(
        cli_command("models", "train", str(tmp_path / "data"), "-o", str(tmp_path / "a"), *common),
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert refused.returncode == 3, refused.stderr
    assert "deploy with" not in refused.stdout
    assert "gate FAILED: int8 top-1" in refused.stdout
    last = refused.stderr.strip().splitlines()[-1]
    assert last.startswith("models train: not offered for deployment: "), last
    assert "int8 top-1" in last
    assert "(--min-accuracy 99.0%)" in last
    assert "--force" in last
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["deploy"] is None
    assert not report["gates"]["fp32_instead"]  # fp32 misses --min-accuracy as well
    assert not report["gates"]["passed"]
    assert (tmp_path / "a" / "data-int8.tflite").exists()  # written, for a look
    assert 0.0 <= report["test"]["fp32_noise_agreement"] <= 1.0
    assert report["head"]["variant"] in ("plain", "robust")
    assert "head kept: " in refused.stdout
    forced = subprocess.run(
        cli_command(
            "models", "train", str(tmp_path / "data"), "-o", str(tmp_path / "b"), *common, "--force"
        ),
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert forced.returncode == 0, forced.stderr
    assert "deploy (forced past its gates):" in forced.stdout
    assert json.loads((tmp_path / "b" / "report.json").read_text())["forced"] is True


def test_where_only_int8_failed_the_report_points_at_the_fp32_file() -> None:
    assert judge(_test_section(0.9, 0.8, 0.85), None)["fp32_instead"]
    assert judge(_test_section(0.9, 0.8, 0.85), 0.85)["fp32_instead"]
    assert not judge(_test_section(0.8, 0.8, 1.0), 0.85)["fp32_instead"]  # fp32 misses it too
    assert not judge(_test_section(0.9, 0.9, 1.0), None)["fp32_instead"]  # nothing failed


class _Backbone:
    """Features of fake photos ``Path("<n>.png")``: row ``n`` of ``rows`` (the centre view)
    or of ``noisy`` (``NOISY``), as ``features.Extractor`` would hand them out."""

    def __init__(self, rows: np.ndarray, noisy: np.ndarray) -> None:
        self.rows, self.noisy = rows, noisy

    def extract(
        self, items: list[tuple[Path, int]], views: tuple[Any, ...] = (), progress: Any = None
    ) -> Any:
        from edgefleet.training.features import CENTRE, NOISY, FeatureSet

        picked: list[np.ndarray] = []
        targets: list[int] = []
        for path, target in items:
            for view in views or (CENTRE,):
                table = self.noisy if view == NOISY else self.rows
                picked.append(table[int(path.stem)])
                targets.append(target)
        return FeatureSet(np.stack(picked), np.array(targets), [p for p, _ in items])


def _blurred_by_int8(rng: np.random.Generator, blur: float) -> tuple[Any, ...]:
    """Two classes: feature 0 separates them loosely; feature 1 sharply in float, but the
    'int8 backbone' adds ``blur`` of noise to feature 1 (what a plain head leans on)."""
    n = 240
    y = np.arange(n) % 2
    sign = 2.0 * y - 1.0
    floats = rng.normal(0.0, 1.0, (n, 8))
    floats[:, 0] += 1.5 * sign
    floats[:, 1] = 0.3 * sign + rng.normal(0.0, 0.05, n)
    ints = floats.copy()
    ints[:, 1] += rng.normal(0.0, blur, n)
    noisy = floats + rng.normal(0.0, 0.01, floats.shape)
    items = [(Path(f"{i}.png"), int(y[i])) for i in range(n)]
    return items[:180], items[180:], _Backbone(floats, noisy), _Backbone(ints, noisy)


def _choose(seed: int, blur: float) -> tuple[Any, Any, dict[str, Any], np.ndarray, Any]:
    """(plain head, kept head, choice, validation float features, int8 backbone)."""
    from edgefleet.training.head import train_head
    from edgefleet.training.robust import choose

    train_items, val_items, floats, ints = _blurred_by_int8(np.random.default_rng(seed), blur)
    fit = floats.extract(train_items)
    held = floats.extract(val_items)
    plain = train_head(fit.features, fit.targets, 2, (held.features, held.targets))
    head, choice = choose(plain, fit, held, train_items, (), (floats, ints))
    return plain, head, choice, held.features, ints.extract(val_items).features


@needs_train
def test_the_robust_head_is_kept_where_int8_would_change_the_plain_heads_answers() -> None:
    plain, head, choice, floats, ints = _choose(seed=3, blur=1.0)
    first, second = choice["trials"]
    assert first["variant"] == "plain"
    assert first["validation_agreement"] < MIN_AGREEMENT
    assert choice["chosen"] == "robust", choice
    assert head is not plain
    assert second["validation_agreement"] > first["validation_agreement"]
    assert second["validation_int8"] >= first["validation_int8"]
    assert "robust head's" in choice["why"]
    # Its answers on the int8 features really keep those on the float ones more often.
    assert np.mean(head.predict(floats) == head.predict(ints)) > first["validation_agreement"]


@needs_train
def test_the_plain_head_stays_where_int8_keeps_its_answers() -> None:
    plain, head, choice, _, _ = _choose(seed=4, blur=0.0)  # int8 features equal the float ones
    assert plain.checked is not None  # the fit that never saw the validation photos
    assert head is plain
    assert choice["chosen"] == "plain"
    assert [t["variant"] for t in choice["trials"]] == ["plain"]
    assert "not needed" in choice["why"]


def test_a_refusal_for_agreement_says_when_the_fp32_file_itself_is_not_firm() -> None:
    fragile = {**_test_section(0.8, 0.8, 0.9), "fp32_noise_agreement": 0.85}
    firm = {**_test_section(0.8, 0.8, 0.9), "fp32_noise_agreement": 1.0}
    said = judge(fragile, None)["refused"][0]
    assert "keeps only 85.0% of its answers with +-1 grey level" in said
    assert "not firm" not in judge(firm, None)["refused"][0]
