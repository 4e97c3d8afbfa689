"""examples/embed_app.py and the runtime refuse the same damaged metadata, through one validator
(transfer/core/model_metadata.py): one line and exit 2 from the example, a DataError naming the key from the runtime,
never an answer and never a traceback."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image

from exporters.runtime import OnnxModel
from transfer.core.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["cat", "cup", "rocket"]
GOOD = {"transfer.classes": json.dumps(CLASSES), "transfer.input_size": "8", "transfer.resize": "9",
        "transfer.crop": "8", "transfer.crop_pct": repr(8 / 9), "transfer.interpolation": "bilinear",
        "transfer.mean": "[0.5, 0.5, 0.5]", "transfer.std": "[0.5, 0.5, 0.5]", "transfer.layout": "NCHW_float32",
        "transfer.output_kind": "logits", "transfer.task": "multilabel", "transfer.thresholds": "[0.5, 0.4, 0.6]",
        "transfer.draft_factor": "3.0"}
BAD = {  # the 22 cases of issue #35: key -> value (None: the key removed)
    "thresholds above 1": ("transfer.thresholds", "[0.5, 1.5, 0.6]"),
    "threshold 0": ("transfer.thresholds", "[0.5, 0, 0.6]"),
    "threshold 1": ("transfer.thresholds", "[0.5, 1, 0.6]"),
    "negative threshold": ("transfer.thresholds", "[0.5, -0.1, 0.6]"),
    "NaN threshold": ("transfer.thresholds", "[0.5, NaN, 0.6]"),
    "true threshold": ("transfer.thresholds", "[0.5, true, 0.6]"),
    "too few thresholds": ("transfer.thresholds", "[0.5, 0.6]"),
    "too many thresholds": ("transfer.thresholds", "[0.5, 0.6, 0.7, 0.8]"),
    "string thresholds": ("transfer.thresholds", '["0.5", "0.4", "0.6"]'),
    "missing thresholds": ("transfer.thresholds", None),
    "non-JSON thresholds": ("transfer.thresholds", "0.5;0.4;0.6"),
    "a number for a list": ("transfer.thresholds", "0.5"),
    "task in capitals": ("transfer.task", "MultiLabel"),
    "empty task": ("transfer.task", ""),
    "unknown task": ("transfer.task", "multiclass"),
    "negative decode factor": ("transfer.draft_factor", "-2"),
    "zero decode factor": ("transfer.draft_factor", "0"),
    "nan decode factor": ("transfer.draft_factor", "nan"),
    "inf decode factor": ("transfer.draft_factor", "inf"),
    "text decode factor": ("transfer.draft_factor", "fast"),
    "huge decode factor": ("transfer.draft_factor", "100"),
    "NaN mean": ("transfer.mean", "[0.5, NaN, 0.5]"),
}


def tiny_classifier(path: Path, meta: dict[str, str | None]) -> Path:
    """A 3-class ONNX classifier of 8x8 NCHW images (mean colour -> linear), with the given metadata."""
    weights = helper.make_tensor("w", TensorProto.FLOAT, [3, 3], np.eye(3, dtype=np.float32).ravel() * 4 - 1)
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
         helper.make_node("Flatten", ["pooled"], ["flat"]),
         helper.make_node("MatMul", ["flat", "w"], ["logits"])],
        "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])], [weights])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    for key, value in meta.items():
        if value is not None:
            model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def embed_app():
    spec = importlib.util.spec_from_file_location("embed_app", ROOT / "examples" / "embed_app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for name, colour in (("red", (250, 10, 10)), ("green", (10, 250, 10))):
        Image.new("RGB", (20, 14), colour).save(folder / f"{name}.png")
        paths.append(str(folder / f"{name}.png"))
    return paths


def test_good_metadata_answers_the_same_in_the_example_and_the_runtime(tmp_path, embed_app, images, capsys):
    model = tiny_classifier(tmp_path / "good.onnx", GOOD)
    embed_app.main(str(model), images)
    lines = capsys.readouterr().out.strip().splitlines()
    runtime = OnnxModel(model, device="cpu")
    expected = list(runtime.predict(images))
    assert [line.split("\t")[1] for line in lines] == [",".join(p.labels) for p in expected]
    assert [p.labels[0] for p in expected] == ["cat", "cup"]  # red -> class 0, green -> class 1 by the weights


@pytest.mark.parametrize("case", sorted(BAD))
def test_damaged_metadata_is_refused_by_both(tmp_path, embed_app, images, capsys, case):
    key, value = BAD[case]
    model = tiny_classifier(tmp_path / "bad.onnx", {**GOOD, key: value})
    with pytest.raises(SystemExit) as stopped:
        embed_app.main(str(model), images)
    captured = capsys.readouterr()
    assert stopped.value.code == 2 and captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and key in lines[0], captured.err
    with pytest.raises(DataError, match=key.replace(".", r"\.")):
        OnnxModel(model, device="cpu")


def test_metadata_checks_need_only_the_standard_library():
    """An embedding app copies model_metadata.py alone: it imports nothing of transfer, numpy or onnxruntime."""
    import ast

    source = (ROOT / "transfer" / "core" / "model_metadata.py").read_text()
    imported = {alias.name.split(".")[0] for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(ast.parse(source))
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert imported <= {"__future__", "json", "math", "collections", "dataclasses"}, imported
