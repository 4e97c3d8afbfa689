"""The training recipe's interpretation and test-time augmentation: checked against independent computations."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

import cli
from tests.conftest import digits_folder
from transfer.apps.evaluate import evaluate
from transfer.core.interpret import most_confused, top_losses
from transfer.core.preprocess import Preprocessing


def test_most_confused_and_top_losses_by_hand():
    classes = ["cat", "dog", "fox"]
    matrix = [[5, 2, 0], [3, 4, 1], [0, 2, 6]]
    assert most_confused(matrix, classes) == [
        {"true": "dog", "predicted": "cat", "count": 3}, {"true": "cat", "predicted": "dog", "count": 2},
        {"true": "fox", "predicted": "dog", "count": 2}, {"true": "dog", "predicted": "fox", "count": 1}]
    logits = np.log(np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.05, 0.9, 0.05], [0.2, 0.3, 0.5]]))
    worst = top_losses(logits, [0, 1, 0, 1], classes, ["a.jpg", "b.jpg", "c.jpg", "d.jpg"])
    assert [w["path"] for w in worst] == ["c.jpg", "d.jpg"]  # wrong ones only, the surest mistake first
    assert worst[0]["predicted"] == "dog" and abs(worst[0]["probability"] - 0.9) < 1e-9
    assert abs(worst[0]["loss"] + np.log(0.05)) < 1e-9 and abs(worst[1]["true_probability"] - 0.3) < 1e-9


def classifier_file(path, classes: list[str], nodes: list, weights: np.ndarray, size: int) -> None:
    """A tiny ONNX classifier (`nodes` from `input` to `logits`) with transfer's metadata, NCHW float input."""
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", len(classes)])],
        [numpy_helper.from_array(weights, "weights")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    meta = {**Preprocessing(size, 1.0, "bilinear").to_metadata(), "transfer.classes": json.dumps(classes),
            "transfer.layout": "NCHW_float32", "transfer.output_kind": "logits", "transfer.layers": "{}"}
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))


def mirror_symmetric_classifier(path, classes: list[str], size: int = 32) -> None:
    """Global average pool -> linear: its logits cannot change when the image is mirrored."""
    weights = np.random.default_rng(0).standard_normal((3, len(classes))).astype(np.float32)
    classifier_file(path, classes, [helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
                                    helper.make_node("Flatten", ["pooled"], ["flat"]),
                                    helper.make_node("MatMul", ["flat", "weights"], ["logits"])], weights, size)


def linear_classifier(path, classes: list[str], size: int = 8) -> None:
    """Flatten -> linear on a size x size input: every pixel position has its own weights, so mirrored and
    cropped views give different logits."""
    weights = np.random.default_rng(1).standard_normal((3 * size * size, len(classes))).astype(np.float32)
    classifier_file(path, classes, [helper.make_node("Flatten", ["input"], ["flat"]),
                                    helper.make_node("MatMul", ["flat", "weights"], ["logits"])], weights, size)


def test_tta_of_a_mirror_symmetric_model_equals_plain_evaluation(tmp_path):
    data = digits_folder(tmp_path / "digits", per_class=6, size=32, classes=3)
    mirror_symmetric_classifier(tmp_path / "sym.onnx", ["0", "1", "2"])
    report = evaluate(tmp_path / "sym.onnx", data, tta=True, top_losses_plot=tmp_path / "worst.png")
    assert report["tta"]["accuracy"] == report["accuracy"] == report["tta"]["accuracy_without"]
    assert report["tta"]["views"] == ["identity", "horizontal flip"]
    wrong = report["count"] - int(np.trace(np.asarray(report["confusion_matrix"])))
    assert len(report["top_losses"]) == min(9, wrong) and (tmp_path / "worst.png").stat().st_size > 1000


def test_tta_crops_average_the_ten_views_cut_by_hand(tmp_path):
    """--tta-crops: each view's accuracy and the averaged one equal plain evaluations of folders whose images
    were cut (numpy slicing of 28 of 32 pixels at each corner) and mirrored beforehand."""
    from PIL import Image

    from exporters.runtime import OnnxModel
    from transfer.core.interpret import softmax

    data = digits_folder(tmp_path / "digits", per_class=6, size=32, classes=3)
    linear_classifier(tmp_path / "linear.onnx", ["0", "1", "2"])
    report = evaluate(tmp_path / "linear.onnx", data, tta_crops=True)
    assert len(report["tta"]["views"]) == 10 and report["tta"]["per_view"]["identity"] == report["accuracy"]
    model = OnnxModel(tmp_path / "linear.onnx")
    paths = sorted(data.rglob("*.png"))
    labels = np.array([int(p.parent.name) for p in paths])
    cuts = {"top-left": (slice(0, 28), slice(0, 28)), "top-right": (slice(0, 28), slice(4, 32)),
            "bottom-left": (slice(4, 32), slice(0, 28)), "bottom-right": (slice(4, 32), slice(4, 32))}
    probabilities = []
    for name in report["tta"]["views"]:
        corner, mirrored = name.replace(" flipped", "").replace("horizontal flip", "identity"), "flip" in name
        rows = []
        for path in paths:
            pixels = np.asarray(Image.open(path).convert("RGB"))
            pixels = pixels[cuts[corner]] if corner in cuts else pixels
            rows.append(Image.fromarray(pixels))
        logits = model.logits(rows, mirror=mirrored)
        assert report["tta"]["per_view"][name] == pytest.approx(float((logits.argmax(1) == labels).mean())), name
        probabilities.append(softmax(logits.astype(np.float64)))
    averaged = np.mean(probabilities, 0)
    assert report["tta"]["accuracy"] == pytest.approx(float((averaged.argmax(1) == labels).mean()))
    assert len(set(report["tta"]["per_view"].values())) > 1  # the views really differ
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    result = CliRunner().invoke(cli.app, ["predict", *map(str, paths), str(tmp_path / "broken.png"), "--onnx",
                                          str(tmp_path / "linear.onnx"), "--tta-crops", "--top-k", "2", "-o",
                                          str(tmp_path / "p.json"), "-q"])
    assert result.exit_code == 0, result.output
    predicted = json.loads((tmp_path / "p.json").read_text())
    assert predicted[-1]["error"] and "1 unreadable image(s)" in result.output
    for row, record in enumerate(predicted[:-1]):
        order = np.argsort(-averaged[row])[:2]
        assert record["indices"] == order.tolist()
        assert record["probabilities"] == pytest.approx(averaged[row][order].tolist(), rel=1e-5)


def test_finetune_and_evaluate_report_their_mistakes(tmp_path, runner):
    """report.json and top_losses.png at the end of finetune; evaluate --tta -o: both accuracies and the plot."""
    from transfer.training import FinetuneConfig, finetune

    data = digits_folder(tmp_path / "digits", per_class=8, size=32, classes=3)
    finetune(data, FinetuneConfig(backbone="lenet5", epochs_head=3, epochs_finetune=0, augment=False, workers=0,
                                  batch_size=8), output=tmp_path / "run", device="cpu", log=lambda _: None)
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["most_confused"] == most_confused(report["confusion_matrix"], ["0", "1", "2"])
    assert len(report["top_losses"]) == min(9, report["count"] - int(np.trace(np.asarray(report["confusion_matrix"]))))
    assert (tmp_path / "run" / "top_losses.png").stat().st_size > 1000
    result = runner.invoke(cli.app, ["evaluate", str(data), "--run", str(tmp_path / "run"), "--tta", "-o",
                                     str(tmp_path / "worst.png"), "--json", str(tmp_path / "e.json"), "-q"])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "e.json").read_text())
    assert f"with test-time augmentation (image + mirror): accuracy {record['tta']['accuracy']:.4f}" in result.output
    assert record["accuracy"] == record["tta"]["accuracy_without"] and (tmp_path / "worst.png").exists()
    crops = runner.invoke(cli.app, ["evaluate", str(data), "--run", str(tmp_path / "run"), "--tta-crops",
                                    "--json", str(tmp_path / "c.json"), "-q"])
    assert crops.exit_code == 0, crops.output
    record = json.loads((tmp_path / "c.json").read_text())
    assert "image, 4 corners and their mirrors" in crops.output and len(record["tta"]["per_view"]) == 10
    assert record["tta"]["per_view"]["horizontal flip"] == json.loads((tmp_path / "e.json").read_text())[
        "tta"]["per_view"]["horizontal flip"]
    bad = runner.invoke(cli.app, ["evaluate", str(data), "--run", str(tmp_path / "run"), "-o", str(tmp_path / "x.jpg")])
    assert bad.exit_code == 2 and "is a .png file" in bad.output


def test_mixup_and_cutmix_targets_and_images():
    import torch

    from transfer.training.regularize import mix_batch, smoothed_one_hot

    soft = smoothed_one_hot(torch.tensor([0, 2]), 4, 0.1)
    assert torch.allclose(soft, torch.tensor([[0.925, 0.025, 0.025, 0.025], [0.025, 0.025, 0.925, 0.025]]))
    images = torch.stack([torch.full((3, 8, 8), float(v)) for v in (1, 2, 3, 4, 5)])  # an odd batch
    targets = torch.tensor([0, 1, 2, 1, 3])
    torch.manual_seed(0)
    mixed, mixed_targets = mix_batch(images, targets, 4, mixup=0.4)
    assert torch.allclose(mixed_targets.sum(1), torch.ones(5))
    lam = float(mixed_targets[0, 0])  # image 0 (class 0) is paired with image 4 (class 3)
    assert abs(lam + float(mixed_targets[0, 3]) - 1) < 1e-6
    assert torch.allclose(mixed[0], lam * images[0] + (1 - lam) * images[4])
    assert torch.allclose(mixed[2], images[2])  # the middle image pairs with itself
    torch.manual_seed(1)
    cut, cut_targets = mix_batch(images, targets, 4, cutmix=1.0, smoothing=0.1)
    assert torch.allclose(cut_targets.sum(1), torch.ones(5))
    pasted = float((cut[0] == 5).float().mean())  # share of image 0's pixels that now come from image 4
    expected = smoothed_one_hot(targets, 4, 0.1)
    assert torch.allclose(cut_targets[0], (1 - pasted) * expected[0] + pasted * expected[4], atol=1e-6)
    features = torch.randn(6, 10)  # cached feature rows: cutmix needs images, so they pass unmixed
    same, _ = mix_batch(features, torch.zeros(6, dtype=torch.long), 2, cutmix=1.0)
    assert torch.equal(same, features)


def test_discriminative_rates_per_unfrozen_group(tmp_path):
    """--unfreeze 2 --lr-decay 0.5: the optimizer holds the head at lr, the top group at lr/2, the next at lr/4
    (the cosine schedule starts each group from those); every trainable tensor is in exactly one group."""
    from tests.test_finetune import random_weights_file
    from transfer.training import FinetuneConfig, finetune
    from transfer.training.checkpoints import load_checkpoint

    data = digits_folder(tmp_path / "digits", per_class=4, size=32, classes=2)
    weights = random_weights_file(tmp_path, "efficientnet_lite0", size=64)
    config = FinetuneConfig(backbone="efficientnet_lite0", input_size=64, epochs_head=1, epochs_finetune=2,
                            unfreeze="2", lr_decay=0.5, label_smoothing=0.1, mixup=0.2, workers=0, batch_size=4,
                            weights=str(weights))
    finetune(data, config, output=tmp_path / "run", device="cpu", log=lambda _: None)
    state = load_checkpoint(tmp_path / "run" / "last.ckpt")
    groups = state["optimizer"]["param_groups"]
    rates = [group["initial_lr"] for group in groups]
    assert [group["name"] for group in groups] == ["head", "conv_head,bn2", "blocks.6"]
    assert rates == [config.lr_finetune, config.lr_finetune / 2, config.lr_finetune / 4]
    final = [group["lr"] for group in groups]  # after the whole cosine: 1% of each group's own rate
    assert final == pytest.approx([rate * 0.01 for rate in rates])
    assert sum(len(group["params"]) for group in groups) == len({i for g in groups for i in g["params"]})
    settings = json.loads((tmp_path / "run" / "config.json").read_text())["settings"]
    assert (settings["lr_decay"], settings["label_smoothing"], settings["mixup"]) == (0.5, 0.1, 0.2)
    stages = json.loads((tmp_path / "run" / "config.json").read_text())["stages"]
    assert stages[0]["cached"] is False  # mixup mixes images: stage 1 cannot run on cached features


def test_ema_follows_the_decay_formula_for_two_steps(tmp_path):
    import torch

    from transfer.training import FinetuneConfig
    from transfer.training.device import resolve_device
    from transfer.training.loop import Trainer
    from transfer.training.stages import Stage

    data = digits_folder(tmp_path / "digits", per_class=4, size=32, classes=2)
    config = FinetuneConfig(backbone="lenet5", ema=0.5, workers=0).check()
    trainer = Trainer(config, data, tmp_path / "run", resolve_device("cpu"), log=lambda _: None)
    from timm.utils import ModelEmaV3

    model, _, _ = trainer.build_model(None)
    trainer.model, trainer.ema = model, ModelEmaV3(model, decay=0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    stage = Stage("scratch", 1, ("",), "sgd", 0.1, "constant", False)
    snapshots = [{k: v.clone() for k, v in model.state_dict().items()}]
    for step in range(2):
        inputs, targets = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 0, 1])
        trainer.train_step(model, optimizer, inputs, targets, stage, 1, step)
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
    ema = trainer.ema.module.state_dict()
    for name in ema:  # ema_2 = d * (d * p0 + (1 - d) * p1) + (1 - d) * p2, with d = 0.5
        expected = 0.25 * snapshots[0][name] + 0.25 * snapshots[1][name] + 0.5 * snapshots[2][name]
        assert torch.allclose(ema[name], expected, atol=1e-6), name
    assert not torch.allclose(ema["head.fc3.weight"], snapshots[2]["head.fc3.weight"])


def test_a_resumed_run_with_ema_and_one_cycle_equals_the_straight_run(tmp_path):
    from safetensors.torch import load_file

    from transfer.training import FinetuneConfig, finetune
    from transfer.training.checkpoints import load_checkpoint

    data = digits_folder(tmp_path / "digits", per_class=6, size=32, classes=3)
    config = FinetuneConfig(backbone="lenet5", epochs_head=3, epochs_finetune=0, ema=0.9, workers=0, batch_size=6,
                            augment=False, schedule="one-cycle")
    straight = finetune(data, config, output=tmp_path / "straight", device="cpu", log=lambda _: None)

    def stop(row):
        if row["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(data, config, output=tmp_path / "resumed", device="cpu", log=lambda _: None, on_epoch_end=stop)
    assert "ema" in load_checkpoint(tmp_path / "resumed" / "last.ckpt")
    resumed = finetune(data, resume=tmp_path / "resumed", device="cpu", log=lambda _: None)
    a, b = (load_checkpoint(tmp_path / run / "last.ckpt") for run in ("straight", "resumed"))
    for key in a["ema"]:
        assert np.allclose(a["ema"][key].numpy(), b["ema"][key].numpy(), atol=1e-6), key
    best_a, best_b = (load_file(str(tmp_path / run / "best.safetensors")) for run in ("straight", "resumed"))
    assert all(np.allclose(best_a[k].numpy(), best_b[k].numpy(), atol=1e-6) for k in best_a)
    assert straight.report["best_weights"] == resumed.report["best_weights"]
    assert straight.best_val_loss == pytest.approx(resumed.best_val_loss, abs=1e-6)
    assert a["optimizer"]["param_groups"][0]["lr"] == b["optimizer"]["param_groups"][0]["lr"]


def fastai_one_cycle(step: int, total: int, lr: float) -> float:
    """fastai's combined_cos(0.25, lr/25, lr, lr/1e5), written out independently."""
    warm = round(total * 0.25)
    if step < warm:
        position, start, end = step / warm, lr / 25, lr
    else:
        position, start, end = (step - warm) / (total - warm), lr, lr / 1e5
    return start + (1 + np.cos(np.pi * (1 - position))) * (end - start) / 2


def test_one_cycle_follows_fastai_per_batch_in_every_stage():
    """--schedule one-cycle: each stage's rate, read per batch from the optimizer, is fastai's curve over the
    stage's steps, for every parameter group (discriminative rates keep their ratio)."""
    import torch

    from models.registry import get_backbone
    from transfer.training import FinetuneConfig
    from transfer.training.schedules import make_scheduler
    from transfer.training.stages import plan_stages

    parameters = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.SGD([{"params": [parameters[0]], "lr": 0.1}, {"params": [parameters[1]], "lr": 0.05}],
                                momentum=0.9)
    config = FinetuneConfig(backbone="efficientnet_lite0", schedule="one-cycle", epochs_head=2, epochs_finetune=3,
                            workers=0).check()
    stages = plan_stages(config, get_backbone("efficientnet_lite0"), True)
    assert [stage.schedule for stage in stages] == ["one-cycle", "one-cycle"]
    scheduler = make_scheduler(stages[1], optimizer, steps_per_epoch=4)
    seen = []
    for _ in range(12):
        seen.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    assert [row[0] for row in seen] == pytest.approx([fastai_one_cycle(step, 12, 0.1) for step in range(12)])
    assert [row[1] for row in seen] == pytest.approx([fastai_one_cycle(step, 12, 0.05) for step in range(12)])
    assert max(row[0] for row in seen) == pytest.approx(0.1) and seen[0][0] == pytest.approx(0.004)


def test_one_cycle_run_records_its_rates_per_epoch(tmp_path, runner):
    """A from-scratch run with --schedule one-cycle: each epoch's row starts at the curve's value after the
    batches before it; config.json says which schedule each stage had."""
    data = digits_folder(tmp_path / "digits", per_class=8, size=32, classes=2)
    result = runner.invoke(cli.app, ["finetune", str(data), "-b", "lenet5", "-o", str(tmp_path / "run"),
                                     "--epochs-head", "3", "--epochs-finetune", "0", "--batch-size", "4",
                                     "--schedule", "one-cycle", "--workers", "0", "-q"])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "run" / "config.json").read_text())
    assert record["settings"]["schedule"] == "one-cycle" and record["stages"][0]["schedule"] == "one-cycle"
    rows = [line.split(",") for line in (tmp_path / "run" / "metrics.csv").read_text().splitlines()]
    lrs = [float(row[rows[0].index("lr")]) for row in rows[1:]]
    steps = -(-12 // 4)  # 12 training images (val split 0.2 of 16), batch 4
    lr = record["stages"][0]["lr"]
    assert lrs == pytest.approx([fastai_one_cycle(epoch * steps, 3 * steps, lr) for epoch in range(3)])
    bad = runner.invoke(cli.app, ["finetune", str(data), "-b", "lenet5", "--schedule", "linear"])
    assert bad.exit_code == 2 and "linear" in bad.output


def test_lr_find_suggests_the_steepest_descent_inside_the_range():
    from transfer.training.lr_find import range_test, suggest

    centre = 1e-3  # the loss falls fastest here (a sigmoid in log10(lr)), then explodes past 0.1

    def loss_at(lr: float) -> float:
        x = np.log10(lr)
        return float(2 - 1.5 / (1 + np.exp(-(x - np.log10(centre)) * 2)) + (np.exp((x + 1) * 8) if x > -1 else 0))

    lrs, losses, smoothed, stopped = range_test(loss_at, 1e-7, 10.0, 100, beta=0.0)
    assert stopped.startswith("loss diverged") and lrs[-1] < 10.0 and losses == smoothed
    suggestion = suggest(lrs, smoothed)
    grid = np.asarray(lrs)
    assert lrs[0] <= suggestion <= lrs[-1] and abs(np.log10(suggestion) - np.log10(centre)) <= np.log10(grid[1] /
                                                                                                      grid[0]) + 1e-9


def test_lr_find_command_and_finetune_auto_rates(tmp_path, runner):
    from transfer.training.checkpoints import load_checkpoint

    data = digits_folder(tmp_path / "digits", per_class=6, size=32, classes=2)
    result = runner.invoke(cli.app, ["lr-find", str(data), "-b", "lenet5", "-o", str(tmp_path / "lr.png"),
                                     "--json", str(tmp_path / "lr.json"), "--batch-size", "4", "--workers", "0", "-q"])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "lr.json").read_text())
    assert [r["stage"] for r in record] == ["scratch"] and (tmp_path / "lr.png").stat().st_size > 1000
    assert min(record[0]["lrs"]) <= record[0]["suggestion"] <= max(record[0]["lrs"])
    assert f"suggested learning rate {record[0]['suggestion']:.2e}" in result.output
    bad = runner.invoke(cli.app, ["lr-find", str(data), "-b", "lenet5", "--stage", "head", "-o",
                                  str(tmp_path / "x.png")])
    assert bad.exit_code == 2 and "lenet5 trains in stage(s) scratch" in bad.output

    result = runner.invoke(cli.app, ["finetune", str(data), "-b", "lenet5", "--lr-head", "auto", "--epochs-head",
                                     "2", "--epochs-finetune", "0", "-o", str(tmp_path / "run"), "--workers", "0",
                                     "--batch-size", "4", "-q"])
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    chosen = config["lr_find"]["scratch"]["suggestion"]
    assert config["settings"]["lr_head"] == "auto" and config["stages"][0]["lr"] == chosen
    assert load_checkpoint(tmp_path / "run" / "last.ckpt")["optimizer"]["param_groups"][0]["initial_lr"] == chosen
    assert (tmp_path / "run" / "lr_find.png").exists()
    more = runner.invoke(cli.app, ["finetune", str(data), "--resume", str(tmp_path / "run"), "--epochs-head", "3",
                                   "-q"])
    assert more.exit_code == 0, more.output
    assert json.loads((tmp_path / "run" / "config.json").read_text())["lr_find"]["scratch"]["suggestion"] == chosen
    bad = runner.invoke(cli.app, ["finetune", str(data), "-b", "lenet5", "--lr-head", "fast"])
    assert bad.exit_code == 2 and "--lr-head 'fast': give a number such as 1e-3, or auto" in bad.output


def test_batch_size_probe_doubles_then_backs_off():
    """The CUDA probe's search, with a stand-in for 'this batch fits the card' (the real one is a gpu test)."""
    from transfer.core.errors import DeviceError
    from transfer.training.batch_size import choose_batch_size, probe_batch_size

    assert probe_batch_size(lambda batch: batch <= 48, limit=256) == (32, [
        {"batch_size": 8, "fits": True}, {"batch_size": 16, "fits": True}, {"batch_size": 32, "fits": True},
        {"batch_size": 64, "fits": False}])
    assert probe_batch_size(lambda batch: True, limit=100)[0] == 64  # capped, a power of two
    assert probe_batch_size(lambda batch: batch <= 3, limit=256)[0] == 2  # 8 and 4 ran out of memory
    with pytest.raises(DeviceError, match="not even a batch of 1"):
        probe_batch_size(lambda batch: False, limit=256)
    import torch

    cuda = torch.device("cuda", 0)
    choice = choose_batch_size(cuda, 10_000, world_size=2, fits=lambda batch: batch <= 100)
    assert choice["batch_size"] == 128 and choice["tried"][-1] == {"batch_size": 128, "fits": False}
    assert choose_batch_size(torch.device("cpu"), 10_000, 1)["batch_size"] == 32
    assert choose_batch_size(torch.device("cpu"), 200, 1)["batch_size"] == 16  # 200 / 8 = 25 -> 16
    assert choose_batch_size(torch.device("cpu"), 20, 1)["batch_size"] == 8  # never below 8


def test_batch_size_auto_on_cpu_is_recorded_and_kept_on_resume(tmp_path, runner):
    data = digits_folder(tmp_path / "digits", per_class=40, size=32, classes=4)  # 128 training images -> 16
    run = tmp_path / "run"
    result = runner.invoke(cli.app, ["finetune", str(data), "-b", "lenet5", "-o", str(run), "--epochs-head", "1",
                                     "--epochs-finetune", "0", "--batch-size", "auto", "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert "--batch-size auto: 16 (CPU: 32" in result.output
    record = json.loads((run / "config.json").read_text())
    assert record["settings"]["batch_size"] == 16 and record["batch_size_auto"]["device"] == "cpu"
    more = runner.invoke(cli.app, ["finetune", str(data), "--resume", str(run), "--epochs-head", "2", "-q"])
    assert more.exit_code == 0, more.output
    record = json.loads((run / "config.json").read_text())
    assert record["settings"]["batch_size"] == 16 and record["batch_size_auto"]["batch_size"] == 16
    bad = runner.invoke(cli.app, ["finetune", str(data), "-b", "lenet5", "--batch-size", "big"])
    assert bad.exit_code == 2 and "--batch-size 'big': give a positive integer such as 32, or auto" in bad.output
