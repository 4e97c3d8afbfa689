"""Trust: every command fails closed. Each test reproduces a failure seen before (wrong answer, lost run,
traceback) and checks the exit code and the one-line message that replaced it."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

import cli
from exporters.export import export_onnx
from exporters.runtime import OnnxModel
from tests.conftest import digits_folder, one_line_error, tree_hashes
from tests.test_finetune import random_weights_file
from transfer.core.errors import DataError
from transfer.training import FinetuneConfig, finetune, load_run

ROOT = Path(__file__).resolve().parents[1]
TRANSFER = str(Path(sys.executable).parent / "transfer")


@pytest.fixture(scope="module")
def lenet_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("trust")
    data = digits_folder(root / "digits", per_class=10, size=32, classes=3)
    finetune(data, FinetuneConfig(backbone="lenet5", epochs_head=2, epochs_finetune=0, workers=0, batch_size=8,
                                  augment=False), output=root / "run", device="cpu", log=lambda _: None)
    export_onnx(root / "lenet.onnx", run=root / "run")
    return root / "run", root / "lenet.onnx", data


# --- one run directory, one writer -------------------------------------------------------------------------------
@pytest.mark.slow  # two real processes on all 1,797 digits; the lock itself is checked quickly below
def test_two_processes_into_one_output_one_wins_other_exits_2(tmp_path):
    data = digits_folder(tmp_path / "digits", size=32, classes=10)
    before = tree_hashes(data)
    run_dir = tmp_path / "run"
    args = [TRANSFER, "finetune", str(data), "--backbone", "lenet5", "--epochs-head", "6", "--epochs-finetune",
            "0", "--batch-size", "16", "--workers", "0", "--device", "cpu", "--no-augment", "--output", str(run_dir)]
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    deadline = time.monotonic() + 120
    while not (run_dir / ".lock").exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    second = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    print("second:", second.stderr.strip())
    assert second.returncode == 2, second.stderr
    assert "in use by another transfer process (pid" in second.stderr or "already holds a run" in second.stderr
    assert "Traceback" not in second.stderr
    config = json.loads((run_dir / "config.json").read_text())
    report = json.loads((run_dir / "report.json").read_text())
    assert config["classes"] == list(report["per_class"]) == [str(i) for i in range(10)]
    evaluated = subprocess.run([TRANSFER, "evaluate", str(data), "--run", str(run_dir)], capture_output=True, text=True)
    assert evaluated.returncode == 0, evaluated.stderr
    model, _ = load_run(run_dir)
    assert report["accuracy"] > 0.5  # digits with LeNet: far above chance (0.1), a consistent run
    assert not (run_dir / ".lock").exists()
    assert tree_hashes(data) == before


def test_lock_of_a_dead_process_does_not_block(tmp_path):
    """flock dies with its holder: a lock file left by a killed writer is taken over."""
    from transfer.core.io import Lock

    lock_path = tmp_path / ".lock"
    code = (f"import sys, time; sys.path.insert(0, {str(ROOT)!r})\n"
            "from transfer.core.io import Lock\nfrom pathlib import Path\n"
            f"Lock(Path({str(lock_path)!r}), 'x').acquire(); print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(Exception, match="in use by another transfer process"):
        Lock(lock_path, "x").acquire()
    holder.kill()
    holder.wait()
    assert lock_path.exists()
    Lock(lock_path, "x").acquire().release()


# --- a failure before the first checkpoint leaves no trace ---------------------------------------------------------
def test_failures_before_first_epoch_leave_nothing_and_retry_works(tmp_path, runner, monkeypatch, photos):
    data = digits_folder(tmp_path / "d", per_class=6, size=32, classes=2)
    run_dir = tmp_path / "runs" / "c"
    base = ["finetune", str(data), "--backbone", "lenet5", "--epochs-head", "1", "--epochs-finetune", "0",
            "--batch-size", "4", "--workers", "0", "--device", "cpu", "--output", str(run_dir)]

    bad_optimizer = runner.invoke(cli.app, [*base, "--head-optimizer", "adam"])
    assert "--head-optimizer" in one_line_error(bad_optimizer)
    assert not run_dir.exists() and not run_dir.parent.exists()

    empty = tmp_path / "withempty"
    shutil.copytree(data, empty)
    (empty / "2").mkdir()
    result = runner.invoke(cli.app, [*base[:1], str(empty), *base[2:]])
    assert "empty class" in one_line_error(result)
    assert not run_dir.exists() and not run_dir.parent.exists()  # runs/ was made for this run: gone too

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("models.weights._timm_cached_file", lambda _name: None)
    result = runner.invoke(cli.app, [*base, "--backbone", "resnet18"])
    assert "--no-pretrained" in one_line_error(result)
    assert not run_dir.exists()

    def interrupt(*_args):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(data, FinetuneConfig(backbone="lenet5", epochs_head=1, epochs_finetune=0, workers=0, batch_size=4),
                 output=run_dir, device="cpu", log=lambda _: None, on_batch=interrupt)
    assert not run_dir.exists()

    again = runner.invoke(cli.app, base)
    assert again.exit_code == 0, again.output
    assert (run_dir / "last.ckpt").is_file() and not (run_dir / ".lock").exists()


def test_existing_folder_with_other_files_is_refused_and_untouched(tmp_path, runner):
    data = digits_folder(tmp_path / "d", per_class=4, size=32, classes=2)
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    result = runner.invoke(cli.app, ["finetune", str(data), "--backbone", "lenet5", "--output", str(folder)])
    assert "holds other files" in one_line_error(result)
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]


# --- checkpoints only of finite epochs; messages that tell the truth ---------------------------------------------
def nan_validation_from(monkeypatch, epoch: int):
    """Make the validation loss NaN from `epoch` on (training itself stays finite)."""
    from transfer.training import loop as train

    real = train.Trainer.validate

    def validate(self, model, stage):
        loss, acc, logits, labels = real(self, model, stage)
        if len(self.rows) + 1 >= epoch:
            loss = float("nan")
        return loss, acc, logits, labels

    monkeypatch.setattr(train.Trainer, "validate", validate)


def test_nan_validation_loss_keeps_the_last_good_epoch_and_resume_works(tmp_path, runner, monkeypatch):
    data = digits_folder(tmp_path / "d", per_class=6, size=32, classes=2)
    run_dir = tmp_path / "run"
    args = ["finetune", str(data), "--backbone", "lenet5", "--epochs-head", "3", "--epochs-finetune", "0",
            "--batch-size", "4", "--workers", "0", "--device", "cpu", "--output", str(run_dir)]
    nan_validation_from(monkeypatch, epoch=2)
    result = runner.invoke(cli.app, args)
    line = one_line_error(result, code=1)
    assert "non-finite validation loss" in line and "the last good checkpoint, epoch 1, is kept" in line
    assert torch.load(run_dir / "last.ckpt", weights_only=True)["epoch"] == 1
    monkeypatch.undo()
    resumed = runner.invoke(cli.app, ["finetune", str(data), "--resume", str(run_dir), "--workers", "0"])
    assert resumed.exit_code == 0, resumed.output
    assert torch.load(run_dir / "last.ckpt", weights_only=True)["epoch"] == 3


def test_nan_in_the_first_epoch_keeps_nothing(tmp_path, runner, monkeypatch):
    data = digits_folder(tmp_path / "d", per_class=6, size=32, classes=2)
    run_dir = tmp_path / "run"
    nan_validation_from(monkeypatch, epoch=1)
    result = runner.invoke(cli.app, ["finetune", str(data), "--backbone", "lenet5", "--epochs-head", "2",
                                     "--workers", "0", "--device", "cpu", "--output", str(run_dir)])
    assert "no epoch had finished, so nothing was kept" in one_line_error(result, code=1)
    assert not run_dir.exists()


# --- options checked at the boundary -------------------------------------------------------------------------------
@pytest.mark.parametrize(("flags", "expected"), [
    (["--epochs-head", "-1"], "--epochs-head"),
    (["--input-size", "0"], "--input-size 0"),
    (["--input-size", "-3"], "--input-size -3"),
    (["--input-size", "7"], "needs 32..4096"),
    (["--unfreeze", "abc"], "--unfreeze 'abc'"),
    (["--patience", "-1"], "--patience"),
    (["--seed", "-4"], "--seed"),
    (["--lr-head", "0"], "--lr-head"),
    (["--crop-pct", "0"], "--crop-pct"),
])
def test_out_of_range_finetune_options_exit_2_before_work(tmp_path, runner, flags, expected):
    data = digits_folder(tmp_path / "d", per_class=3, size=16, classes=2)
    run_dir = tmp_path / "run"
    result = runner.invoke(cli.app, ["finetune", str(data), "--backbone", "efficientnet_lite0", "--output",
                                     str(run_dir), *flags])
    assert expected in one_line_error(result)
    assert not run_dir.exists()


def test_min_input_size_comes_from_the_architecture():
    from models.layers import min_input_size

    assert {name: min_input_size(name) for name in ("vgg16", "inception_v3", "resnet50", "efficientnet_lite0")} == {
        "vgg16": 32, "inception_v3": 75, "resnet50": 32, "efficientnet_lite0": 32}
    from models.registry import get_backbone
    from models.weights import build_architecture

    lenet = build_architecture(get_backbone("lenet5")).eval()
    smallest = min_input_size("lenet5")
    assert lenet.forward_features(torch.zeros(1, 3, smallest, smallest)).shape[-1] >= 1
    with pytest.raises(RuntimeError):
        lenet.forward_features(torch.zeros(1, 3, smallest - 1, smallest - 1))


def test_bench_bad_batch_sizes_exit_2(lenet_run, runner):
    _, onnx_path, _ = lenet_run
    for sizes in ("0,-1", "abc", ""):
        result = runner.invoke(cli.app, ["bench", "--onnx", str(onnx_path), "--batch-sizes", sizes, "--seconds", "0.1"])
        assert "--batch-sizes" in one_line_error(result)


# --- ONNX metadata checked against the graph ---------------------------------------------------------------------
def with_metadata(source: Path, target: Path, **changes: str) -> Path:
    model = onnx.load(str(source))
    props = {p.key: p.value for p in model.metadata_props}
    props.update({f"transfer.{k}": v for k, v in changes.items()})
    del model.metadata_props[:]
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(target))
    return target


@pytest.mark.parametrize(("changes", "key"), [
    ({"classes": json.dumps(list("abcdef"))}, "transfer.classes"),
    ({"mean": "[0.5]"}, "transfer.mean"),
    ({"std": "[0, 0, 0]"}, "transfer.std"),
    ({"std": "[0.5, NaN, 0.5]"}, "transfer.std"),
    ({"classes": "[not json"}, "transfer.classes"),
    ({"input_size": "0"}, "transfer.input_size"),
    ({"input_size": "-5"}, "transfer.input_size"),
    ({"input_size": "abc"}, "transfer.input_size"),
    ({"input_size": "100000"}, "transfer.input_size"),
    ({"crop_pct": "0"}, "transfer.crop_pct"),
    ({"interpolation": "cubic-spline"}, "transfer.interpolation"),
    ({"layout": "NHWC_uint8"}, "transfer.layout"),
    ({"layout": "NCHW_float64"}, "transfer.layout"),
    ({"output_kind": "probabilities"}, "transfer.output_kind"),
])
def test_bad_metadata_is_refused_naming_the_key(lenet_run, tmp_path, runner, changes, key):
    _, onnx_path, data = lenet_run
    bad = with_metadata(onnx_path, tmp_path / "bad.onnx", **changes)
    with pytest.raises(DataError, match=key.replace(".", r"\.")):
        OnnxModel(bad, device="cpu")
    image = next(data.rglob("*.png"))
    assert key in one_line_error(runner.invoke(cli.app, ["predict", str(image), "--onnx", str(bad)]))


def test_class_count_checked_again_on_the_first_batch(lenet_run):
    """Where the graph cannot state its output width up front, the first batch is checked instead."""
    _, onnx_path, data = lenet_run
    runtime = OnnxModel(onnx_path, device="cpu")
    runtime.classes = ["a", "b"]
    with pytest.raises(DataError, match="transfer.classes has 2 names"):
        runtime.predict([next(data.rglob("*.png"))])


# --- layers are exactly the named module ---------------------------------------------------------------------------
def test_run_predictions_and_classifier_give_the_runs_logits(tmp_path, runner):
    from transfer.apps.extract import extract

    data = digits_folder(tmp_path / "d", per_class=6, size=32, classes=3)
    weights = random_weights_file(tmp_path, "resnet18", size=48)
    finetune(data, FinetuneConfig(backbone="resnet18", epochs_head=1, epochs_finetune=0, batch_size=8, input_size=48,
                                  weights=str(weights), augment=False, workers=0),
             output=tmp_path / "run", device="cpu", log=lambda _: None)
    got = extract(data, layers=["predictions", "fc", "avg_pool"], run=tmp_path / "run", device="cpu", workers=0)
    model, config = load_run(tmp_path / "run")
    from transfer.core.preprocess import Preprocessing, eval_array

    prep = Preprocessing.from_dict(config["preprocessing"])
    x = torch.from_numpy(np.stack([eval_array(Image.open(p).convert("RGB"), prep) for p in got.paths]))
    with torch.no_grad():
        logits, pooled = model(x).numpy(), model.pooled_features(x).numpy()
    assert got.features["predictions"].shape == (18, 3)
    assert np.allclose(got.features["predictions"], logits, atol=1e-5)
    assert np.array_equal(got.features["fc"], got.features["predictions"])
    assert got.features["avg_pool"].shape == (18, 512) and np.allclose(got.features["avg_pool"], pooled, atol=1e-5)
    dropped = runner.invoke(cli.app, ["extract", str(data), "--run", str(tmp_path / "run"), "--layer", "fc1",
                                      "--output", str(tmp_path / "f.npy")])
    assert "unknown layer of this run" in one_line_error(dropped)


KERAS_KINDS = (("_conv", "Conv2d"), ("_bn", "BatchNorm2d"), ("_relu", "ReLU"), ("_pool", "Pool"),
               ("_activation", "activation"), ("_add", "InvertedResidual"))


def keras_kind(modules: dict, path: str) -> str:
    """What a module's output is, in Keras terms: timm's BatchNormAct2d is BatchNorm then activation, and its
    `.drop` (the Identity between them) carries the plain BatchNorm output."""
    module = modules[path]
    parent = modules.get(path.rsplit(".", 1)[0]) if "." in path else None
    if path.endswith(".drop") and type(parent).__name__ == "BatchNormAct2d":
        return "BatchNorm2d"
    if type(module).__name__ == "BatchNormAct2d":
        return "BatchNorm2d" if type(module.act).__name__ == "Identity" else "activation"
    return type(module).__name__


@pytest.mark.parametrize("backbone", ["vgg16", "inception_v3", "resnet18", "resnet34", "resnet50", "resnet101",
                                      "resnet152", "efficientnet_lite0", "alexnet", "lenet5"])
def test_every_alias_equals_an_independent_hook(backbone):
    """All Keras aliases at once through the extraction tap vs plain forward hooks on an untouched twin model."""
    import copy

    from models.layers import FeatureTap, min_input_size, resolve_layer
    from models.registry import get_backbone
    from models.weights import build_architecture

    spec = get_backbone(backbone)
    torch.manual_seed(0)
    reference = build_architecture(spec).eval()
    ours = copy.deepcopy(reference)
    aliases = dict(spec.aliases)
    size = max(min_input_size(backbone), 64 if backbone != "inception_v3" else 96)
    x = torch.randn(2, 3, size, size)
    modules = dict(reference.named_modules())
    captured = {}

    def hook_for(path: str):
        def hook(_module, _inputs, out) -> None:  # returns None: the model's own output stays untouched
            captured.setdefault(path, out.detach().clone())
        return hook

    handles = [modules[path].register_forward_hook(hook_for(path))
               for path in dict.fromkeys(path.split("#")[0] for path in aliases.values())]
    with torch.no_grad():
        reference(x)
    for handle in handles:
        handle.remove()
    paths = [resolve_layer(spec, alias) for alias in aliases]
    assert paths == list(aliases.values())
    with torch.no_grad():
        tapped = FeatureTap(ours, paths, stop_early=True)(x)
    for (alias, path), value in zip(aliases.items(), tapped, strict=True):
        module_path = path.split("#")[0]
        expected = captured[module_path]
        if path.endswith("#flatten"):  # Keras' Flatten: channels-last order, one vector per image
            expected = np.ascontiguousarray(expected.numpy().transpose(0, 2, 3, 1)).reshape(len(x), -1)
            assert np.array_equal(value.numpy(), expected), alias
            continue
        assert torch.equal(value, expected), alias
        for suffix, kind in KERAS_KINDS:
            if alias.endswith(suffix) and alias not in ("avg_pool",):
                assert kind in keras_kind(modules, module_path), (alias, path, keras_kind(modules, module_path))
    if backbone == "vgg16":
        assert all(type(modules[spec.aliases[f"block{b}_conv1"]]).__name__ == "ReLU" for b in range(1, 6))


# --- OS errors at user paths ---------------------------------------------------------------------------------------
def test_outputs_under_a_file_fail_before_work(lenet_run, tmp_path, runner):
    run_dir, onnx_path, data = lenet_run
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    image = str(next(data.rglob("*.png")))
    commands = {
        "finetune": ["finetune", str(data), "--backbone", "lenet5", "--output", str(blocker / "run")],
        "export": ["export", "--run", str(run_dir), "-o", str(blocker / "m.onnx")],
        "extract": ["extract", str(data), "--backbone", "lenet5", "--layer", "conv1", "--output",
                    str(blocker / "f.npy")],
        "predict": ["predict", image, "--onnx", str(onnx_path), "--output", str(blocker / "p.csv")],
        "scan": ["scan", str(data), "--json", str(blocker / "s.json")],
        "evaluate": ["evaluate", str(data), "--run", str(run_dir), "--json", str(blocker / "e.json")],
        "bench": ["bench", "--onnx", str(onnx_path), "--batch-sizes", "1", "--seconds", "0.1", "--json",
                  str(blocker / "b.json")],
    }
    for name, args in commands.items():
        started = time.perf_counter()
        line = one_line_error(runner.invoke(cli.app, args))
        assert str(blocker) in line, (name, line)
        assert time.perf_counter() - started < 20, name
    assert blocker.read_text() == "x"


def test_read_only_folder_and_full_disk_are_one_line(lenet_run, tmp_path, runner, monkeypatch):
    run_dir, onnx_path, data = lenet_run
    from transfer.core import io as tio

    real_open = os.open
    read_only = tmp_path / "ro"
    read_only.mkdir()

    def refusing_open(path, flags, *args, **kwargs):  # what a read-only folder does for a non-root user
        if str(path).startswith(str(read_only)) and flags & os.O_CREAT:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(tio.os, "open", refusing_open)
    result = runner.invoke(cli.app, ["export", "--run", str(run_dir), "-o", str(read_only / "m.onnx")])
    assert "Permission denied" in one_line_error(result) and str(read_only) in result.output
    monkeypatch.undo()

    def full_disk(_fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tio.os, "fsync", full_disk)
    result = runner.invoke(cli.app, ["scan", str(data), "--json", str(tmp_path / "scan.json")])
    line = one_line_error(result)
    assert "no space left" in line and "scan.json" in line
    assert not list(tmp_path.glob(".scan.json.*"))


def test_self_symlink_and_unreadable_class_folder_are_skipped_and_reported(tmp_path, monkeypatch, runner):
    data = digits_folder(tmp_path / "d", per_class=4, size=16, classes=3)
    (data / "0" / "loop.png").symlink_to("loop.png")
    (data / "1" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    locked = data / "2" / "private"
    locked.mkdir()
    import transfer.data.scan as scan_module

    real_scandir = os.scandir

    def scandir(path="."):
        if Path(path) == locked:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(scan_module.os, "scandir", scandir)
    result = runner.invoke(cli.app, ["scan", str(data)])
    assert result.exit_code == 0, result.output
    assert f"skipped {data / '0' / 'loop.png'}: symbolic link loop" in result.output
    assert f"skipped {data / '1' / 'gone.png'}: broken symbolic link" in result.output
    assert f"skipped {locked}: unreadable folder (Permission denied)" in result.output


def test_non_utf8_file_names_survive_csv_and_json(lenet_run, tmp_path, runner):
    _, onnx_path, data = lenet_run
    folder = tmp_path / "odd"
    folder.mkdir()
    raw_name = b"caf\xe9.png"
    source = next(data.rglob("*.png"))
    with open(os.path.join(os.fsencode(folder), raw_name), "wb") as handle:
        handle.write(source.read_bytes())
    for suffix in (".csv", ".json"):
        out = tmp_path / f"preds{suffix}"
        result = runner.invoke(cli.app, ["predict", str(folder), "--onnx", str(onnx_path), "--output", str(out),
                                         "--show"])
        assert result.exit_code == 0, result.output
        assert "caf\\xe9.png" in result.output
        if suffix == ".json":
            assert os.fsencode(json.loads(out.read_text())[0]["path"]).endswith(raw_name)
        else:
            assert raw_name in out.read_bytes()


class Opaque:  # a Python object in a checkpoint: loading it with weights_only=False could run code
    pass


def test_damaged_run_files_are_named(lenet_run, tmp_path, runner):
    run_dir, _, data = lenet_run

    def damaged_copy(name: str, damage) -> Path:
        copy = tmp_path / f"run_{name.replace('.', '_')}_{len(list(tmp_path.iterdir()))}"
        shutil.copytree(run_dir, copy)
        damage(copy / name)
        return copy

    truncated = damaged_copy("last.ckpt", lambda p: p.write_bytes(p.read_bytes()[:1000]))
    line = one_line_error(runner.invoke(cli.app, ["finetune", str(data), "--resume", str(truncated)]))
    assert f"{truncated} is damaged: last.ckpt:" in line

    pickled = damaged_copy("last.ckpt", lambda p: torch.save({"model": Opaque()}, p))
    line = one_line_error(runner.invoke(cli.app, ["finetune", str(data), "--resume", str(pickled)]))
    assert "is damaged: last.ckpt: not a plain checkpoint" in line and "weights_only" not in line

    corrupt = damaged_copy("best.safetensors", lambda p: p.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage"))
    line = one_line_error(runner.invoke(cli.app, ["evaluate", str(data), "--run", str(corrupt)]))
    assert f"{corrupt} is damaged: best.safetensors:" in line

    malformed = damaged_copy("config.json", lambda p: p.write_text("{\"backbone\": "))
    line = one_line_error(runner.invoke(cli.app, ["evaluate", str(data), "--run", str(malformed)]))
    assert f"{malformed} is damaged: config.json:" in line


# --- smaller ---------------------------------------------------------------------------------------------------------
def test_predict_missing_path_exits_2(lenet_run, tmp_path, runner):
    _, onnx_path, _ = lenet_run
    missing = runner.invoke(cli.app, ["predict", str(tmp_path / "nope"), "--onnx", str(onnx_path)])
    assert "not found" in one_line_error(missing)
    assert "no file matches" in one_line_error(runner.invoke(cli.app, ["predict", str(tmp_path / "*.jpg"),
                                                                        "--onnx", str(onnx_path)]))


def test_stale_temp_files_are_cleaned_and_modes_follow_the_umask(lenet_run, tmp_path):
    run_dir, _, data = lenet_run
    output = tmp_path / "model.onnx"
    stale_file = tmp_path / ".model.onnx.deadbeef.transfer-tmp"
    stale_file.write_bytes(b"half a model")
    stale_dir = tmp_path / ".model.onnx.cafe0123.transfer-tmp"
    stale_dir.mkdir()
    bystander = tmp_path / ".model.onnx.user-notes"
    bystander.write_text("not ours")
    previous = os.umask(0o022)
    try:
        export_onnx(output, run=run_dir)
        fresh = tmp_path / "fresh_run"
        finetune(data, FinetuneConfig(backbone="lenet5", epochs_head=1, epochs_finetune=0, workers=0, batch_size=8),
                 output=fresh, device="cpu", log=lambda _: None)
    finally:
        os.umask(previous)
    assert not stale_file.exists() and not stale_dir.exists() and bystander.exists()
    assert output.stat().st_mode & 0o777 == 0o644
    for name in ("config.json", "best.safetensors", "last.ckpt", "metrics.csv", "report.json", "curves.png"):
        assert (fresh / name).stat().st_mode & 0o777 == 0o644, name
    (fresh / ".last.ckpt.0badf00d.transfer-tmp").write_bytes(b"killed mid-write")
    finetune(data, resume=fresh, device="cpu", log=lambda _: None,
             changes={"epochs_head": 2})
    assert not list(fresh.glob("*.transfer-tmp")) and not list(fresh.glob(".*.transfer-tmp"))


# --- property-based: only documented errors ------------------------------------------------------------------------
def test_random_bytes_and_metadata_raise_only_documented_errors(tmp_path):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from transfer.core.images import BadImageError, open_image
    from transfer.core.preprocess import Preprocessing

    png = tmp_path / "seed.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(png)
    header = png.read_bytes()[:40]

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.one_of(st.binary(max_size=300), st.binary(max_size=200).map(lambda tail: header + tail)))
    def loader(blob: bytes):
        path = tmp_path / "x.img"
        path.write_bytes(blob)
        try:
            image = open_image(path)
        except BadImageError:
            return
        assert image.mode == "RGB"

    keys = ["transfer.input_size", "transfer.crop_pct", "transfer.resize", "transfer.crop", "transfer.interpolation",
            "transfer.mean", "transfer.std"]
    values = st.one_of(st.text(max_size=12), st.integers(-10, 10**6).map(str), st.floats().map(repr),
                       st.lists(st.floats(), max_size=4).map(json.dumps),
                       st.sampled_from(["bilinear", "[0.5,0.5,0.5]"]))

    @settings(max_examples=300, deadline=None)
    @given(st.dictionaries(st.sampled_from(keys), values))
    def metadata(meta: dict):
        try:
            prep = Preprocessing.from_metadata(meta)
        except DataError:
            return
        prep.check()

    loader()
    metadata()
