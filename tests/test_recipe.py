"""The training recipe's interpretation and test-time augmentation: checked against independent computations."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import cli
from tests.conftest import digits_folder
from transfer.evaluate import evaluate
from transfer.interpret import most_confused, top_losses
from transfer.preprocess import Preprocessing


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


def mirror_symmetric_classifier(path, classes: list[str], size: int = 32) -> None:
    """Global average pool -> linear: its logits cannot change when the image is mirrored."""
    weights = np.random.default_rng(0).standard_normal((3, len(classes))).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
         helper.make_node("Flatten", ["pooled"], ["flat"]),
         helper.make_node("MatMul", ["flat", "weights"], ["logits"])],
        "symmetric", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", len(classes)])],
        [numpy_helper.from_array(weights, "weights")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    meta = {**Preprocessing(size, 1.0, "bilinear").to_metadata(), "transfer.classes": json.dumps(classes),
            "transfer.layout": "NCHW_float32", "transfer.output_kind": "logits", "transfer.layers": "{}"}
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))


def test_tta_of_a_mirror_symmetric_model_equals_plain_evaluation(tmp_path):
    data = digits_folder(tmp_path / "digits", per_class=6, size=32, classes=3)
    mirror_symmetric_classifier(tmp_path / "sym.onnx", ["0", "1", "2"])
    report = evaluate(tmp_path / "sym.onnx", data, tta=True, top_losses_plot=tmp_path / "worst.png")
    assert report["tta"]["accuracy"] == report["accuracy"] == report["tta"]["accuracy_without"]
    assert report["tta"]["views"] == ["identity", "horizontal flip"]
    wrong = report["count"] - int(np.trace(np.asarray(report["confusion_matrix"])))
    assert len(report["top_losses"]) == min(9, wrong) and (tmp_path / "worst.png").stat().st_size > 1000


def test_finetune_and_evaluate_report_their_mistakes(tmp_path, runner):
    """report.json and top_losses.png at the end of finetune; evaluate --tta -o: both accuracies and the plot."""
    from transfer.train import FinetuneConfig, finetune

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
    bad = runner.invoke(cli.app, ["evaluate", str(data), "--run", str(tmp_path / "run"), "-o", str(tmp_path / "x.jpg")])
    assert bad.exit_code == 2 and "is a .png file" in bad.output


def test_mixup_and_cutmix_targets_and_images():
    import torch

    from transfer.regularize import mix_batch, smoothed_one_hot

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
    from transfer.train import FinetuneConfig, finetune, load_checkpoint

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

    from transfer.train import FinetuneConfig, Stage, Trainer, resolve_device

    data = digits_folder(tmp_path / "digits", per_class=4, size=32, classes=2)
    config = FinetuneConfig(backbone="lenet5", ema=0.5, workers=0).check()
    trainer = Trainer(config, data, tmp_path / "run", resolve_device("cpu"), log=lambda _: None)
    from timm.utils import ModelEmaV3

    model, _, _ = trainer.build_model(None)
    trainer.model, trainer.ema = model, ModelEmaV3(model, decay=0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    stage = Stage("scratch", 1, ("",), "sgd", 0.1, False, False)
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


def test_a_resumed_run_with_ema_equals_the_straight_run(tmp_path):
    from safetensors.torch import load_file

    from transfer.train import FinetuneConfig, finetune, load_checkpoint

    data = digits_folder(tmp_path / "digits", per_class=6, size=32, classes=3)
    config = FinetuneConfig(backbone="lenet5", epochs_head=3, epochs_finetune=0, ema=0.9, workers=0, batch_size=6,
                            augment=False)
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


def test_lr_find_suggests_the_steepest_descent_inside_the_range():
    from transfer.lr_find import range_test, suggest

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
    from transfer.train import load_checkpoint

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
