"""Preprocessing for float and quantized inputs, against the plain formula."""

from __future__ import annotations

import threading
from typing import Any

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgefleet.errors import ModelError
from edgefleet.inference.classifier import Classifier, ModelInfo, _top_indices
from edgefleet.inference.preprocess import InputPlan, Preprocessor

RNG = np.random.default_rng(7)
FRAME = RNG.integers(0, 256, size=(48, 64, 3), dtype=np.uint8)


def _plan(
    dtype: Any,
    scale: float = 1.0,
    zero: int = 0,
    crop: float | None = 0.875,
    mean: float = 127.0,
    std: float = 128.0,
) -> InputPlan:
    return InputPlan(
        height=16,
        width=16,
        dtype=np.dtype(dtype),
        mean=mean,
        std=std,
        scale=scale,
        zero_point=zero,
        crop_fraction=crop,
    )


def _reference_pixels(plan: InputPlan, frame: np.ndarray) -> np.ndarray:
    pre = Preprocessor(plan)
    y0, y1, x0, x1 = pre.crop_box(*frame.shape[:2])
    region = frame[y0:y1, x0:x1]
    # Box filter by the whole factor (here 42 -> 21, exactly 2x), then bilinear to 16.
    k = min(region.shape[0] // plan.height, region.shape[1] // plan.width)
    if k >= 2:
        region = region[: region.shape[0] // k * k, : region.shape[1] // k * k]
        size = (region.shape[1] // k, region.shape[0] // k)
        region = cv2.resize(region, size, interpolation=cv2.INTER_AREA)
    return cv2.resize(region, (plan.width, plan.height), interpolation=cv2.INTER_LINEAR_EXACT)


def test_center_crop_box() -> None:
    pre = Preprocessor(_plan(np.uint8, 1 / 128, 127))
    assert pre.crop_box(480, 640) == (30, 450, 110, 530)  # 420 = 0.875 * 480
    full = Preprocessor(_plan(np.uint8, 1 / 128, 127, crop=None))
    assert full.crop_box(480, 640) == (0, 480, 0, 640)


def test_float_input_is_normalised() -> None:
    plan = _plan(np.float32)
    pre = Preprocessor(plan)
    out = pre.new_buffer()
    pre(FRAME, out)
    expected = (_reference_pixels(plan, FRAME).astype(np.float32) - 127.0) / 128.0
    np.testing.assert_allclose(out[0], expected, atol=1e-6)
    assert out.dtype == np.float32


def test_uint8_matching_quantization_feeds_raw_pixels() -> None:
    plan = _plan(np.uint8, 1 / 128, 127)
    pre = Preprocessor(plan)
    out = pre.new_buffer()
    pre(FRAME, out)
    np.testing.assert_array_equal(out[0], _reference_pixels(plan, FRAME))


@pytest.mark.parametrize(
    ("dtype", "scale", "zero"),
    [
        (np.int8, 1 / 128, -1),  # int8 model with the same real range
        (np.uint8, 1 / 255 * 2, 128),  # a different uint8 quantization
        (np.int8, 0.02, 3),  # arbitrary, with clipping
    ],
)
def test_quantized_inputs_follow_their_parameters(dtype: Any, scale: float, zero: int) -> None:
    plan = _plan(dtype, scale, zero)
    pre = Preprocessor(plan)
    out = pre.new_buffer()
    pre(FRAME, out)
    real = (_reference_pixels(plan, FRAME).astype(np.float64) - 127.0) / 128.0
    info = np.iinfo(dtype)
    expected = np.clip(np.round(real / scale + zero), info.min, info.max).astype(dtype)
    np.testing.assert_array_equal(out[0], expected)
    assert out.dtype == dtype


@settings(max_examples=60, deadline=None)
@given(
    height=st.integers(1, 200),
    width=st.integers(1, 200),
    crop=st.sampled_from([None, 0.875, 1.0, 0.5]),
    seed=st.integers(0, 2**16),
)
def test_any_frame_gives_the_three_channel_bilinear_bytes(
    height: int, width: int, crop: float | None, seed: int
) -> None:
    """The four-channel route is an optimisation only: the same bytes as resizing RGB."""
    frame = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    plan = _plan(np.uint8, 1 / 128, 127, crop=crop)
    pre = Preprocessor(plan)
    out = pre.new_buffer()
    pre(frame, out)
    np.testing.assert_array_equal(out[0], _reference_pixels(plan, frame))


def test_one_preprocessor_serves_two_threads_at_once() -> None:
    """The prepare thread and a one-off classify may share a model's preprocessor."""
    plan = _plan(np.int8, 1 / 128, -1)  # through the working image and the lookup table
    pre = Preprocessor(plan)
    frames = [RNG.integers(0, 256, (40 + 8 * i, 60, 3), dtype=np.uint8) for i in range(2)]
    expected = []
    for frame in frames:
        out = pre.new_buffer()
        pre(frame, out)
        expected.append(out.copy())
    wrong = []

    def work(i: int) -> None:
        out = pre.new_buffer()
        for _ in range(300):
            pre(frames[i], out)
            if not np.array_equal(out, expected[i]):
                wrong.append(i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert wrong == []


def test_upscaling_small_frames() -> None:
    plan = _plan(np.uint8, 1 / 128, 127, crop=None)
    pre = Preprocessor(plan)
    out = pre.new_buffer()
    tiny = FRAME[:8, :8]
    pre(tiny, out)
    expected = cv2.resize(tiny, (16, 16), interpolation=cv2.INTER_LINEAR_EXACT)
    np.testing.assert_array_equal(out[0], expected)


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((32, 32), dtype=np.uint8),
        np.zeros((32, 32, 4), dtype=np.uint8),
        np.zeros((32, 32, 3), dtype=np.float32),
    ],
)
def test_bad_frames_are_refused(bad: np.ndarray) -> None:
    pre = Preprocessor(_plan(np.uint8, 1 / 128, 127))
    with pytest.raises(ValueError, match="expected an HxWx3 uint8 RGB frame"):
        pre(bad, pre.new_buffer())


class _FakeInterpreter:
    """Stands in for a TFLite Interpreter at its class boundary."""

    def __init__(
        self,
        shape: list[int],
        dtype: Any,
        out_shape: list[int],
        quant: tuple[float, int] = (0.0, 0),
    ) -> None:
        self.inputs = [
            {"index": 0, "shape": np.array(shape), "dtype": dtype, "quantization": quant}
        ]
        self.outputs = [
            {
                "index": 1,
                "shape": np.array(out_shape),
                "dtype": np.float32,
                "quantization": (0.0, 0),
            }
        ]

    def get_input_details(self) -> list[dict[str, Any]]:
        return self.inputs

    def get_output_details(self) -> list[dict[str, Any]]:
        return self.outputs

    # These tests read only the input plan and output checks; running is not faked.
    def allocate_tensors(self) -> None:
        raise NotImplementedError

    def invoke(self) -> None:
        raise NotImplementedError

    def set_tensor(self, tensor_index: int, value: np.ndarray) -> None:
        raise NotImplementedError

    def get_tensor(self, tensor_index: int) -> np.ndarray:
        raise NotImplementedError


def _info(labels: tuple[str, ...] | None = None) -> ModelInfo:
    from pathlib import Path

    return ModelInfo(
        path=Path("m.tflite"),
        name="m",
        version=0,
        sha256="0" * 64,
        size=1,
        trained=True,
        labels=labels,
        metadata=None,
    )


@pytest.mark.parametrize(
    ("shape", "dtype", "message"),
    [
        ([1, 224, 224, 1], np.float32, r"unsupported input \[1, 224, 224, 1\]"),
        ([1, 3, 224, 224], np.float32, r"unsupported input \[1, 3, 224, 224\]"),
        ([224, 224, 3], np.float32, r"unsupported input \[224, 224, 3\]"),
        ([1, 224, 224, 3], np.int16, "unsupported input type int16"),
        ([1, 224, 224, 3], np.uint8, "integer input without quantization"),
    ],
)
def test_unsupported_inputs(shape: list[int], dtype: Any, message: str) -> None:
    with pytest.raises(ModelError, match=message):
        Classifier(_info(), _FakeInterpreter(shape, dtype, [1, 10]))


def test_label_count_must_match_outputs() -> None:
    with pytest.raises(ModelError, match=r"3 labels, but the model m\.tflite has 10 output"):
        Classifier(_info(("a", "b", "c")), _FakeInterpreter([1, 8, 8, 3], np.float32, [1, 10]))


def test_model_without_labels_reports_indices() -> None:
    clf = Classifier(_info(), _FakeInterpreter([1, 8, 8, 3], np.float32, [1, 4]))
    top = clf.top(np.array([0.1, 0.6, 0.05, 0.25], dtype=np.float32), 3, threshold=0.2)
    assert [(t.label, t.index) for t in top] == [("1", 1), ("3", 3)]
    assert top[0].score == pytest.approx(0.6)


@given(
    values=st.lists(st.sampled_from([0.0, 0.0, 0.0, 0.25, 0.5, 0.99]), min_size=1, max_size=60),
    k=st.integers(min_value=1, max_value=40),
)
def test_top_indices_are_the_best_first_ties_in_index_order(values: list[float], k: int) -> None:
    """Both selection paths (k argmax passes, a stable sort above ARGMAX_TOP_K) agree with
    the plain definition, on outputs full of ties as an int8 model's are."""
    scores = np.array(values, dtype=np.float32)
    k = min(k, scores.size)
    expected = sorted(range(scores.size), key=lambda i: (-scores[i], i))[:k]
    assert _top_indices(scores, k) == expected
