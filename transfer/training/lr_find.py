"""The learning-rate range test (Smith 2015; fastai's `lr_find`): raise the rate exponentially, one batch per step,
from `start` to `end`, and watch the loss; stop once it diverges.

The suggestion is the steepest descent: the rate where the smoothed loss falls fastest against log(rate), taken
before the loss reached its minimum (fastai's `steep` rule; it lands a little below the minimum's rate, where
training is still stable). The test runs on a copy of the model and optimizer, so the run it serves is untouched.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from transfer.core.errors import OptionError, TransferError
from transfer.core.io import write_json
from transfer.core.metrics import save_figure
from transfer.core.progress import SILENT
from transfer.training.device import resolve_device
from transfer.training.loop import Trainer
from transfer.training.model import set_trainable, train_mode
from transfer.training.regularize import stage_lr_groups
from transfer.training.schedules import make_optimizer
from transfer.training.stages import Stage, plan_stages

RULE = "steepest descent of the smoothed loss (fastai's 'steep'), before its minimum"


@dataclass
class LrFindResult:
    """Rates tried, raw and smoothed losses, and the suggestion (always one of the rates tried)."""

    stage: str
    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    suggestion: float
    rule: str = RULE
    stopped: str = "end of range"
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"stage": self.stage, "suggestion": self.suggestion, "rule": self.rule, "stopped": self.stopped,
                "lrs": self.lrs, "losses": self.losses, "smoothed": self.smoothed, **self.extra}


def suggest(lrs: list[float], smoothed: list[float], skip_start: int = 5) -> float:
    """Steepest descent of `smoothed` against log(lr), between the first `skip_start` points (fastai skips them
    too: the average is still settling there) and the minimum; the minimum's rate when nothing falls before it."""
    best = int(np.argmin(smoothed))
    start = min(skip_start, max(0, best - 2))
    if best - start < 2:
        return lrs[best]
    window = slice(start, best + 1)
    slopes = np.gradient(np.asarray(smoothed[window]), np.log(np.asarray(lrs[window])))
    return float(lrs[start + int(np.argmin(slopes))])


def range_test(step: Callable[[float], float], start: float = 1e-7, end: float = 10.0, steps: int = 100,
               beta: float = 0.98, diverge: float = 4.0) -> tuple[list[float], list[float], list[float], str]:
    """Call `step(lr)` (one optimisation step, returns its loss) at `steps` rates from `start` to `end`;
    stop when the smoothed loss exceeds `diverge` x its minimum or turns non-finite."""
    lrs, losses, smoothed = [], [], []
    average, stopped = 0.0, "end of range"
    for index, lr in enumerate(np.geomspace(start, end, steps)):
        loss = step(float(lr))
        if not math.isfinite(loss):
            stopped = f"loss not finite at lr {lr:.3g}"
            break
        average = beta * average + (1 - beta) * loss
        value = average / (1 - beta ** (index + 1))  # bias-corrected exponential average
        lrs.append(float(lr))
        losses.append(float(loss))
        smoothed.append(float(value))
        if index > 5 and value > diverge * min(smoothed):
            stopped = f"loss diverged at lr {lr:.3g}"
            break
    return lrs, losses, smoothed, stopped


def cycle(batches: Callable[[], Iterator]) -> Iterator:
    """Batches without end: a new pass (`batches()`) whenever one ends."""
    while True:
        empty = True
        for batch in batches():
            empty = False
            yield batch
        if empty:
            raise ValueError("no training batches")


def find_lr(trainer, model, stage, steps: int = 100, start: float = 1e-7, end: float = 10.0,
            advance=None) -> LrFindResult:
    """The range test for `stage` of `trainer` on a copy of `model` (the trainer's data, batches and loss)."""
    stage = replace(stage, lr=1.0)  # the rates below are set step by step; 1.0 keeps the groups' ratios
    probe = copy.deepcopy(model)
    set_trainable(probe, list(stage.prefixes))
    groups = stage_lr_groups(probe, trainer.spec, trainer.config, stage)
    optimizer = make_optimizer(stage, probe, trainer.config.weight_decay, groups)
    base = [group["lr"] for group in optimizer.param_groups]
    train_mode(probe, list(stage.prefixes), batchnorm_stats=stage.name == "scratch" or trainer.config.bn_stats)
    forward = probe.head if stage.cached else probe
    if stage.cached:
        features, labels = trainer.cached_features(probe, "train")
        size = trainer.config.batch_size

        def batches():
            order = torch.randperm(len(labels))
            return ((features[i], labels[i]) for i in order.split(size))
    else:
        def batches():
            loader = trainer.image_loader(trainer.train_samples, False, True, 0)
            return trainer.failures.training_batches(loader, trainer.train_samples)
    stream = cycle(batches)

    def step(lr: float) -> float:
        for group, rate in zip(optimizer.param_groups, base, strict=True):
            group["lr"] = lr * rate / base[0]  # discriminative groups keep their ratios
        inputs, targets = next(stream)
        loss_sum, _, targets = trainer.train_step(forward, optimizer, inputs, targets, stage, 0, 0, probe=True)
        if advance is not None:
            advance(1)
        return loss_sum / max(1, len(targets))

    lrs, losses, smoothed, stopped = range_test(step, start, end, steps)
    if len(lrs) < 3:
        raise TransferError(f"lr-find: the loss diverged after {len(lrs)} step(s) from {start:g}; lower the start")
    return LrFindResult(stage.name, lrs, losses, smoothed, suggest(lrs, smoothed), stopped=stopped)


def resolve_lr(trainer: Trainer, model, stage: Stage) -> Stage:
    """A stage whose rate is "auto" gets the range test's suggestion (or, resumed, the one it got before),
    recorded in config.json with the rule, and plotted to lr_find.png."""
    if stage.lr != "auto":
        return stage
    found = trainer.lr_found.get(stage.name)  # a resumed run keeps the rate it found before
    if found is None:
        result = find_lr(trainer, model, stage)
        found = {"suggestion": result.suggestion, "rule": result.rule, "stopped": result.stopped,
                 "tried": [result.lrs[0], result.lrs[-1]]}
        trainer.lr_results.append(result)
        if trainer.world.main:
            plot(trainer.lr_results, trainer.run_dir / "lr_find.png")
        trainer.log(f"stage {stage.name}: learning rate {found['suggestion']:.2e} from the range test ({result.rule})")
        trainer.lr_found[stage.name] = found
        if trainer.world.main:  # the chosen rate goes into config.json, next to the setting "auto"
            record = json.loads((trainer.run_dir / "config.json").read_text())
            record["stages"] = [{**saved_stage, "lr": found["suggestion"]} if saved_stage["name"] == stage.name
                                else saved_stage for saved_stage in record["stages"]]
            record["lr_find"] = trainer.lr_found
            write_json(trainer.run_dir / "config.json", record)
    return replace(stage, lr=found["suggestion"])


def lr_find(data_dir: str | os.PathLike, config, stages: tuple[str, ...] | None = None,
            output: str | os.PathLike | None = None, device: str = "auto", log=print, progress=None) -> list:
    """`transfer lr-find`: the range test for each of `stages` (default: every stage the run would have): the head
    stage, stage 2 after training the head for `config.epochs_head` epochs at `config.lr_head` (or at the head
    test's suggestion when that is "auto"), or the single stage of a net trained from scratch.
    Each stage's test starts from `config.seed`, so a stage gets the same suggestion whether it is tested alone or
    after another (the test draws random batches: another seed may suggest another rate). Nothing is written but
    the plot at `output`."""
    import tempfile

    config.check()
    target = resolve_device(device)
    torch.manual_seed(config.seed)
    with tempfile.TemporaryDirectory() as scratch:
        trainer = Trainer(config, data_dir, scratch, target, log=log, progress=progress or SILENT)
        model, pretrained, _ = trainer.build_model(None)
        planned = {stage.name: stage for stage in plan_stages(config, trainer.spec, pretrained)}
        results = []
        names = list(dict.fromkeys(stages or tuple(planned)))  # a stage named twice is tested once
        for name in names:
            if name not in planned:
                raise OptionError(f"--stage {name}: {config.backbone} trains in stage(s) {', '.join(planned)}")
        for name in names:
            torch.manual_seed(config.seed)  # the same start whether this stage is tested alone or after another
            stage = planned[name]
            if name == "finetune" and "head" in planned and planned["head"].epochs:
                head = planned["head"]
                if head.lr == "auto":
                    tested = [r.suggestion for r in results if r.stage == "head"]
                    head = replace(head, lr=tested[0] if tested else find_lr(trainer, model, head).suggestion)
                set_trainable(model, list(head.prefixes))
                trainer.parallel = model.head if head.cached else model
                optimizer = make_optimizer(head, model, config.weight_decay)
                for epoch in range(1, head.epochs + 1):
                    trainer.train_epoch(model, head, optimizer, epoch, f"training the head first ({epoch})")
            set_trainable(model, list(stage.prefixes))
            with trainer.progress.task(f"range test, stage {name}", total=100, unit="steps") as advance:
                results.append(find_lr(trainer, model, stage, advance=advance))
    if output is not None:
        plot(results, output, title=f"learning-rate range test: {config.backbone} on {Path(data_dir).name}")
    return results


def plot(results: list[LrFindResult], path: str | os.PathLike, title: str = "learning-rate range test") -> None:
    """Loss against learning rate (log scale) per stage, the suggestion marked; the whole smoothed curve shows."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6 * len(results), 4.6), layout="constrained")
    figure.suptitle(title)
    for index, result in enumerate(results):
        axes = figure.add_subplot(1, len(results), index + 1)
        axes.plot(result.lrs, result.losses, alpha=0.3, label="loss")
        axes.plot(result.lrs, result.smoothed, label="smoothed")
        axes.axvline(result.suggestion, color="red", linestyle="--", label=f"suggestion {result.suggestion:.2e}")
        axes.set_xscale("log")
        low, high = min(result.smoothed), max(result.smoothed)
        margin = 0.05 * (high - low) or 0.05 * abs(high) or 0.05
        axes.set_ylim(low - margin, high + margin)  # every smoothed point; raw spikes above may be cut
        axes.set_xlabel("learning rate")
        axes.set_ylabel("training loss")
        axes.set_title(f"stage {result.stage}: {result.stopped}")
        axes.grid(alpha=0.3)
        axes.legend()
    save_figure(figure, path)
