"""What a model file is, read without running it: tensors, preprocessing, labels, ops.

Works on any ``.tflite`` (ours, Model Maker's, an EdgeTPU-compiled one): the interpreter is
built without the default delegate (so XNNPACK does not rewrite the op list) and never
allocated (an EdgeTPU model's custom op could not be prepared without the accelerator).
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.errors import ModelError
from edgefleet.inference.classifier import read_model_info
from edgefleet.inference.litert import get_runtime, native_info_dropped
from edgefleet.inference.preprocess import DEFAULT_CROP, DEFAULT_MEAN, DEFAULT_STD

EDGETPU_OP = "edgetpu-custom-op"


def _tensor(detail: dict[str, Any]) -> dict[str, Any]:
    scale, zero_point = detail.get("quantization", (0.0, 0))
    return {
        "shape": [int(d) for d in detail["shape"]],
        "dtype": np.dtype(detail["dtype"]).name,
        "quantization": {"scale": float(scale), "zero_point": int(zero_point)} if scale else None,
    }


def describe(path: Path) -> dict[str, Any]:
    """A JSON-ready description of the model at ``path``; ModelError when it is not one."""
    info = read_model_info(path)
    runtime = get_runtime()
    resolver = runtime.module.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    try:
        with native_info_dropped():
            # The module's own class (not the typed seam): the op list is a private method.
            interpreter = runtime.module.Interpreter(
                model_path=str(path), experimental_op_resolver_type=resolver
            )
    except (ValueError, RuntimeError) as exc:
        raise ModelError(f"{path}: cannot read model: {str(exc).strip()}") from None
    ops = collections.Counter(op["op_name"] for op in interpreter._get_ops_details())
    # The op is named in the flatbuffer's operator codes whichever way a runtime reports it.
    edgetpu = EDGETPU_OP in ops or EDGETPU_OP.encode() in path.read_bytes()
    meta = info.metadata
    labels = list(info.labels) if info.labels else []
    return {
        "path": str(path),
        "name": info.name,
        "version": info.version,
        "variant": meta.variant if meta else None,
        "trained": info.trained,
        "size": info.size,
        "sha256": info.sha256,
        "inputs": [_tensor(d) for d in interpreter.get_input_details()],
        "outputs": [_tensor(d) for d in interpreter.get_output_details()],
        "preprocessing": {
            "mean": meta.input.mean if meta else DEFAULT_MEAN,
            "std": meta.input.std if meta else DEFAULT_STD,
            "crop_fraction": meta.input.crop_fraction if meta else DEFAULT_CROP,
            "from": "embedded metadata" if meta else "EfficientNet-Lite defaults",
        },
        "labels": labels,
        "ops": dict(sorted(ops.items())),
        "edgetpu": edgetpu,
        "source": dict(meta.source) if meta else {},
    }
