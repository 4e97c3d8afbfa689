"""The training loop: `Trainer` holds the model, data and run directory, and `fit` walks the stages epoch by epoch.

`fit` is a ladder of short steps (stage -> epoch -> batch): `start_state`, `begin_stage`, `run_epoch`,
`train_epoch`, `train_step`, `validate`. What the loop does not own it is handed: the learning-rate range test as
`choose_lr` (from `transfer.training.lr_find`, wired by `transfer.training.finetune`), progress and epoch hooks,
the --log trackers (`transfer.training.tracking`). The schedule itself is `transfer.training.stages`; see there.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from models.registry import get_backbone
from models.weights import build_architecture, create_backbone
from transfer.core.errors import DataError, NonFiniteLossError, OptionError
from transfer.core.metrics import write_metrics
from transfer.core.preprocess import decode_size
from transfer.core.progress import SILENT, Progress
from transfer.core.world import World
from transfer.data.augment import Augment
from transfer.data.datasets import ImageDataset, epoch_order, eval_dataset, make_loader, train_transform
from transfer.data.labels import LabelsFile, scan_data
from transfer.data.scan import ScanReport
from transfer.data.splits import train_val_samples
from transfer.training import collectives
from transfer.training.batch_size import resolve_auto_batch_size
from transfer.training.checkpoints import STATE_KEYS, checkpoint_payload
from transfer.training.config import FinetuneConfig
from transfer.training.decode_failures import DecodeFailures
from transfer.training.device import autocast, to_device
from transfer.training.epoch_saves import EpochSaves
from transfer.training.model import TransferModel, build_transfer_model, set_trainable, train_mode
from transfer.training.regularize import make_ema, mix_batch, stage_lr_groups
from transfer.training.report import FinetuneResult, write_report
from transfer.training.runs import read_run_metrics, write_config, write_split
from transfer.training.schedules import fresh_tail, make_optimizer, make_scheduler
from transfer.training.stages import Stage, epoch_seed, plan_stages
from transfer.training.targets import Objective, balanced_weights, sampling_weights
from transfer.training.tracking import Trackers, open_trackers

ChooseLr = Callable[["Trainer", TransferModel, Stage], Stage]


class Trainer:
    """Holds the model, data and run directory; `fit` walks the stages epoch by epoch."""

    def __init__(self, config: FinetuneConfig, data_dir: str | os.PathLike, run_dir: Path, device: torch.device,
                 log: Callable[[str], None] = print, on_epoch_end: Callable[[dict], None] | None = None,
                 on_batch: Callable[[str, int, int], None] | None = None, progress: Progress = SILENT,
                 world: World | None = None, choose_lr: ChooseLr | None = None):
        self.config, self.run_dir, self.device, self.log = config, run_dir, device, log
        self.world = world or World()  # under torchrun: this rank; only rank 0 writes the run directory
        self.parallel: nn.Module | None = None  # the stage's trainable module, in DistributedDataParallel if needed
        self.ema = None  # timm ModelEmaV3 of the whole model with --ema
        self.lr_found: dict[str, dict] = {}  # stage name -> the range test's choice, for config.json
        self.lr_results: list = []  # this session's range tests, for lr_find.png
        self.batch_choice: dict | None = None  # how --batch-size auto chose, for config.json
        self.on_batch = on_batch  # (description, batches done, batches in the epoch): a hook for callers
        self.progress = progress
        self.data_dir = Path(data_dir).resolve()
        self.on_epoch_end = on_epoch_end
        self.choose_lr = choose_lr  # a stage whose rate is "auto" gets it from here (the range test)
        self.spec = get_backbone(config.backbone)
        self.scan: ScanReport = scan_data(data_dir, LabelsFile.from_dict(config.labels), strict=config.strict,
                                          progress=progress, decode=False)  # headers; bodies as the work reads them
        self.failures = DecodeFailures()  # bodies that failed to decode during the work: skipped, then reported
        self.scan.check_trainable()
        self.train_samples, self.val_samples = train_val_samples(self.scan, config.val_split, config.seed)
        if not self.val_samples:
            raise DataError(f"{data_dir}: no validation images; use --val-split > 0, a val/ folder or a split column")
        self.multilabel = self.scan.task == "multilabel"
        classes = len(self.scan.classes)
        self.objective = Objective(self.multilabel, balanced_weights(self.train_samples, classes, self.multilabel)
                                   if config.class_weights == "balanced" else None)
        self.sample_weights = sampling_weights(self.train_samples, classes) if config.sampler == "balanced" else None
        base = self.spec.preprocessing
        self.prep = replace(base, input_size=base.input_size if config.input_size is None else config.input_size,
                            crop_pct=base.crop_pct if config.crop_pct is None else config.crop_pct,
                            draft_factor=base.draft_factor if config.decode_floor is None else config.decode_floor)
        self.classes = list(self.scan.classes)
        self.rows: list[dict] = []
        self.saves = EpochSaves(run_dir, writes=self.world.main)  # when last.ckpt and best weights are written
        self.feature_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.cache_seconds = 0.0  # spent caching stage-1 features, reported apart from the epoch's own time
        self.state: dict | None = None  # the schedule's position, for the reports of an interrupted run
        self.model: TransferModel | None = None
        self.tracker = Trackers()  # --log: TensorBoard / MLflow (rank 0), opened when the schedule starts

    # --- model -------------------------------------------------------------------------------------------------
    def build_model(self, resume_state: dict | None) -> tuple[TransferModel, bool, str]:
        """The transfer model; on resume random-initialised then overwritten by the checkpoint."""
        if resume_state is not None:
            backbone, source = build_architecture(self.spec), "resumed checkpoint"
            pretrained = self.config.pretrained is not False and (self.spec.has_pretrained or bool(self.config.weights))
        else:
            backbone, source = create_backbone(self.spec, self.config.pretrained, self.config.weights, seed=None)
            pretrained = not source.startswith("random init")
        model = build_transfer_model(self.spec, backbone, len(self.classes), self.prep.input_size,
                                     self.config.head, self.config.dropout)
        if resume_state is not None:
            model.load_state_dict(resume_state["model"])
        model = model.to(self.device)
        if self.device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        return model, pretrained, source

    # --- data --------------------------------------------------------------------------------------------------
    def image_loader(self, samples, augment: bool, shuffle: bool, epoch: int = 0):
        """Training (`shuffle`): this rank's share of each global batch. Evaluation: the samples given, in order."""
        augmentation = Augment(**self.config.augmentation) if augment else None
        width = len(self.classes) if self.multilabel else None
        size = self.prep.input_size
        dataset = (ImageDataset(samples, train_transform(self.prep, augmentation), draft_size=decode_size(self.prep),
                                multilabel_classes=width, bad_shape=(3, size, size)) if augment
                   else eval_dataset(samples, self.prep, multilabel_classes=width, report_bad=True))
        return make_loader(dataset, self.config.batch_size, shuffle=shuffle, workers=self.config.workers,
                           device=self.device.type, seed=epoch_seed(self.config.seed, epoch),
                           world=self.world if shuffle else None, image_shape=(3, size, size),
                           weights=self.sample_weights if shuffle else None)

    def sharded_forward(self, model: TransferModel, samples, pooled: bool,
                        description: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Outputs for `failures.usable(samples)` in their order: each rank forwards its contiguous block, then all
        gather; images whose body fails to decode are recorded in `failures` and left out."""
        block = self.world.take(samples)
        outputs, labels, reasons = self.forward_all(model, self.image_loader(block, False, False), pooled=pooled,
                                                    description=description)
        failed = [(str(sample.path), reason) for sample, reason in zip(block, reasons, strict=True) if reason]
        if self.world.distributed:
            parts = collectives.all_gather(self.world, (outputs, labels, failed))
            failed = [item for part in parts for item in part[2]]
            parts = [part for part in parts if len(part[1])]
            outputs, labels = torch.cat([part[0] for part in parts]), torch.cat([part[1] for part in parts])
        for path, reason in failed:
            self.failures.record(path, reason)
        keep = self.failures.keep_mask(samples)
        return outputs[keep], labels[keep]

    def cached_features(self, model: TransferModel, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled backbone features of a split, computed once with the evaluation transform."""
        if split not in self.feature_cache:
            samples = self.train_samples if split == "train" else self.val_samples
            started = time.perf_counter()
            features, labels = self.sharded_forward(model, samples, pooled=True,
                                                    description=f"caching {split} features")
            self.feature_cache[split] = (features, labels)
            seconds = time.perf_counter() - started
            self.cache_seconds += seconds
            self.log(f"cached {split} features {tuple(features.shape)} in {seconds:.1f}s")
        return self.feature_cache[split]

    def autocast(self):
        return autocast(self.device)

    @torch.no_grad()
    def forward_all(self, model: TransferModel, loader, pooled: bool = False,
                    description: str = "validating") -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """Outputs, targets and decode failures ("" for a good image) of a reporting loader's items, in order."""
        model.eval()
        outputs, labels, reasons = [], [], []
        with self.progress.task(description, total=len(loader.dataset), unit="images") as advance:
            for images, targets, batch_reasons, _ in loader:
                reasons += batch_reasons
                images = to_device(images, self.device)
                with self.autocast():
                    out = model.pooled_features(images) if pooled else model(images)
                outputs.append(out.float().cpu())
                labels.append(targets)
                advance(len(targets))
        if not outputs:  # a rank whose block is empty (fewer images than processes)
            return torch.empty(0), torch.empty(0, dtype=torch.long), []
        return torch.cat(outputs), torch.cat(labels), reasons

    # --- one epoch ---------------------------------------------------------------------------------------------
    def train_epoch(self, model: TransferModel, stage: Stage, optimizer, epoch: int,
                    label: str = "", batch_scheduler=None) -> tuple[float, float]:
        """One pass over the training images (or cached features); `batch_scheduler` steps after every batch."""
        if stage.cached:  # first: caching runs the model in eval mode and its loader draws from the RNG
            features, labels = self.cached_features(model, "train")
        torch.manual_seed(epoch_seed(self.config.seed, epoch))
        train_mode(model, list(stage.prefixes), batchnorm_stats=stage.name == "scratch" or self.config.bn_stats)
        if stage.cached:
            order = epoch_order(len(labels), epoch_seed(self.config.seed, epoch), self.sample_weights)
            shares = (idx[span.start:span.stop] for idx in order.split(self.config.batch_size)
                      for span in [self.world.block(len(idx))])
            batches = ((features[idx], labels[idx]) for idx in shares)
            total = math.ceil(len(labels) / self.config.batch_size)
        else:
            loader = self.image_loader(self.train_samples, self.config.augment, True, epoch)
            batches, total = self.failures.training_batches(loader, self.train_samples), len(loader)
        forward = self.parallel
        total_loss, correct, count = 0.0, 0, 0
        with self.progress.task(label or f"{stage.name} epoch {epoch}", total=total, unit="batches",
                                min_seconds=0) as advance:
            for step, (inputs, targets) in enumerate(batches):
                loss_sum, logits, targets = self.train_step(forward, optimizer, inputs, targets, stage, epoch, step)
                if batch_scheduler is not None:
                    batch_scheduler.step()
                total_loss += loss_sum
                correct += self.objective.correct(logits, targets)
                count += len(targets)
                advance(1)
                self.tracker.batch_done(epoch, step, total, loss_sum / max(1, len(targets)))
                if self.on_batch is not None:
                    self.on_batch(f"{stage.name} epoch {epoch}", step + 1, total)
        total_loss, correct, count = collectives.all_sum(self.world, [total_loss, correct, count])
        if count == 0:
            raise DataError(f"no training image of {self.data_dir} decoded in epoch {epoch}; see `transfer scan`")
        return total_loss / count, correct / count

    def train_step(self, forward, optimizer, inputs, targets, stage: Stage, epoch: int,
                   step: int, probe: bool = False) -> tuple[float, torch.Tensor, torch.Tensor]:
        """One optimisation step on this rank's share of a global batch; returns the share's summed loss.

        The loss is the global batch's mean: each rank scales its sum by world size / global count, and
        DistributedDataParallel averages the gradients over the ranks. A non-finite loss (summed over the ranks,
        so every rank sees it) stops the run before the weights are touched. A `probe` step (the learning-rate range
        test, on a copy of the model) returns a non-finite loss instead, and leaves the run's EMA alone."""
        inputs, targets = to_device(inputs, self.device), targets.to(self.device)
        config = self.config
        soft = None
        if config.mixup > 0 or config.cutmix > 0 or config.label_smoothing > 0:
            inputs, soft = mix_batch(inputs, targets, len(self.classes), config.mixup, config.cutmix,
                                     config.label_smoothing)
        with self.autocast():
            logits = forward(inputs)
            loss_sum = self.objective.loss_sum(logits.float(), targets if soft is None else soft)
        global_sum, global_count = collectives.all_sum(self.world, [loss_sum.item(), len(targets)])
        if global_count == 0:  # every image of the global batch failed to decode: nothing to learn from
            return 0.0, logits.detach(), targets
        if not math.isfinite(global_sum):
            if probe:
                return global_sum, logits.detach(), targets
            raise NonFiniteLossError(f"non-finite training loss ({global_sum / global_count}) in stage {stage.name}, "
                                     f"epoch {epoch}, batch {step}; {self.saves.kept_message()} (try a lower "
                                     "learning rate)")
        optimizer.zero_grad(set_to_none=True)
        (loss_sum * (self.world.size / global_count)).backward()
        optimizer.step()
        if self.ema is not None and not probe:
            self.ema.update(self.model)
        return loss_sum.item(), logits.detach(), targets

    def validate(self, model: TransferModel, stage: Stage) -> tuple[float, float, torch.Tensor, torch.Tensor]:
        if stage.cached:
            features, labels = self.cached_features(model, "val")
            model.eval()
            with torch.no_grad():
                logits = model.head(features.to(self.device)).float().cpu()
        else:
            logits, labels = self.sharded_forward(model, self.val_samples, pooled=False, description="validating")
        loss = self.objective.mean_loss(logits, labels)
        return loss, self.objective.correct(logits, labels) / max(1, len(labels)), logits, labels

    # --- the run -----------------------------------------------------------------------------------------------
    def fit(self, resume_state: dict | None = None, saved: dict | None = None) -> FinetuneResult:
        """Walk the stages epoch by epoch (the --log trackers told of each); on resume, continue where the checkpoint
        stopped (`saved` is the run's config.json). The last step writes the report of the best weights."""
        model, pretrained, source = self.build_model(resume_state)
        self.model = model
        self.ema = make_ema(model, self.config.ema, resume_state)
        stages = plan_stages(self.config, self.spec, pretrained)
        if saved is not None:
            self.batch_choice = saved.get("batch_size_auto")
        if self.config.batch_size == "auto":
            resolve_auto_batch_size(self, model, stages[-1])
        self.log(f"{self.spec.name}: weights from {source}; {len(self.classes)} classes, "
                 f"{len(self.train_samples)} train / {len(self.val_samples)} val images, "
                 f"{len(self.scan.skipped)} skipped; device {self.device}")
        for note in self.scan.notes:
            self.log(f"note: {note}")
        state = self.state = self.start_state(stages, source, resume_state, saved)
        self.tracker = open_trackers(self, state["epoch"])
        try:
            for stage_index in range(state["stage_index"], len(stages)):
                stage, optimizer, scheduler, start = self.begin_stage(model, stages, stage_index, resume_state, saved)
                for stage_epoch in range(start + 1, stage.epochs + 1):
                    if self.config.out_of_patience(state["bad_epochs"]):
                        self.log(f"stage {stage.name}: no validation-loss gain in {self.config.patience} epoch(s); "
                                 "stopping it early (--patience)")
                        break
                    self.run_epoch(model, stage, stage_index, stage_epoch, optimizer, scheduler, state)
        finally:  # a stopped run keeps every finished epoch of a paced stage (epoch_saves)
            self.saves.flush()
        return write_report(self, model, state)

    def start_state(self, stages: list[Stage], source: str, resume_state: dict | None, saved: dict | None) -> dict:
        """The schedule's position: a fresh run writes config.json and split.json; a resumed one continues from its
        checkpoint and records an extension in config.json when its epoch counts were raised."""
        state = {"stage_index": 0, "stage_epoch": 0, "epoch": 0, "best_val_loss": math.inf, "best_val_acc": 0.0,
                 "bad_epochs": 0}
        if saved is not None:
            self.lr_found = dict(saved.get("lr_find", {}))
        if resume_state is None:
            write_config(self, stages, source)
            if self.world.main:
                write_split(self.run_dir, self.data_dir, self.train_samples, self.val_samples)
            return state
        state.update({key: resume_state[key] for key in STATE_KEYS})
        state["best_source"] = resume_state.get("best_source", "model")
        self.saves.saved_epoch = state["epoch"]
        self.rows = [r for r in read_run_metrics(self.run_dir) if r["epoch"] <= state["epoch"]]
        if saved is not None and [s["epochs"] for s in saved["stages"]] != [s.epochs for s in stages]:
            write_config(self, stages, source, previous=saved)
        return state

    def begin_stage(self, model: TransferModel, stages: list[Stage], stage_index: int, resume_state: dict | None,
                    saved: dict | None):
        """Make the stage's parameters trainable, resolve an "auto" rate, and build its optimizer and schedule (on
        resume: restored, and a fresh tail when the stage was extended). Returns (stage, optimizer, scheduler,
        epochs already done in it)."""
        state = self.state
        stage = stages[stage_index]
        trainable = set_trainable(model, list(stage.prefixes))
        if stage.lr == "auto":
            if self.choose_lr is None:
                raise OptionError(f"stage {stage.name}: learning rate 'auto' needs the range test (transfer.finetune)")
            stage = self.choose_lr(self, model, stage)
        stages[stage_index] = stage
        self.parallel = collectives.data_parallel(model.head if stage.cached else model, self.world, self.device)
        optimizer = make_optimizer(stage, model, self.config.weight_decay,
                                   stage_lr_groups(model, self.spec, self.config, stage))
        steps_per_epoch = math.ceil(len(self.train_samples) / self.config.batch_size)
        scheduler = make_scheduler(stage, optimizer, steps_per_epoch)
        start = 0
        if resume_state is not None and stage_index == resume_state["stage_index"]:
            optimizer.load_state_dict(resume_state["optimizer"])
            scheduler.load_state_dict(resume_state["scheduler"])
            start = resume_state["stage_epoch"]
            saved_epochs = saved["stages"][stage_index]["epochs"] if saved else stage.epochs
            if stage.epochs > saved_epochs:
                scheduler = fresh_tail(stage, optimizer, start, start >= saved_epochs, steps_per_epoch)
                state["bad_epochs"] = 0
                self.log(f"stage {stage.name} extended from {saved_epochs} to {stage.epochs} epochs")
        else:
            state["bad_epochs"] = 0
        self.saves.begin_stage()
        self.log(f"stage {stage.name}: {stage.epochs} epoch(s), {stage.optimizer} lr {stage.lr:g}, "
                 f"{len(trainable)} trainable tensors{', cached features' if stage.cached else ''}")
        return stage, optimizer, scheduler, start

    def run_epoch(self, model, stage: Stage, stage_index: int, stage_epoch: int, optimizer, scheduler,
                  state: dict) -> None:
        """One epoch: train, validate (the EMA too), step the schedule, keep the best weights and the checkpoint."""
        started, cached_before = time.perf_counter(), self.cache_seconds
        epoch = state["epoch"] + 1
        lrs = [group["lr"] for group in optimizer.param_groups]  # every group's, for the trackers
        lr = lrs[0]
        per_batch = stage.schedule == "one-cycle"
        train_loss, train_acc = self.train_epoch(model, stage, optimizer, epoch,
                                                 f"{stage.name} {stage_epoch}/{stage.epochs} (epoch {epoch})",
                                                 batch_scheduler=scheduler if per_batch else None)
        val_loss, val_acc, _, _ = self.validate(model, stage)
        candidate, candidate_loss, candidate_acc, source = model, val_loss, val_acc, "model"
        if self.ema is not None:
            ema_loss, ema_acc, _, _ = self.validate(self.ema.module, stage)
            if math.isfinite(ema_loss) and ema_loss < val_loss:
                candidate, candidate_loss, candidate_acc, source = self.ema.module, ema_loss, ema_acc, "ema"
        if not per_batch:
            scheduler.step()
        caching = self.cache_seconds - cached_before  # stage 1's one-off feature cache, reported apart
        row = {"stage": stage.name, "epoch": epoch, "stage_epoch": stage_epoch, "lr": lr, "train_loss": train_loss,
               "train_acc": train_acc, "val_loss": val_loss, "val_acc": val_acc,
               "seconds": round(time.perf_counter() - started - caching, 3)}
        if not (math.isfinite(train_loss) and math.isfinite(val_loss)):
            raise NonFiniteLossError(f"non-finite validation loss ({val_loss}) in stage {stage.name}, epoch {epoch}; "
                                     f"{self.saves.kept_message()} (try a lower learning rate)")
        improved = candidate_loss < state["best_val_loss"]
        state.update(epoch=epoch, stage_index=stage_index, stage_epoch=stage_epoch,
                     bad_epochs=0 if improved else state["bad_epochs"] + 1)
        if improved:
            state.update(best_val_loss=candidate_loss, best_val_acc=candidate_acc, best_source=source)
        self.rows.append(row)
        self.saves.epoch_end(epoch, lambda: checkpoint_payload(
            model, optimizer, scheduler, state, ema=self.ema.module if self.ema is not None else None),
            candidate if improved else None, stage.cached,
            stage_epoch == stage.epochs or self.config.out_of_patience(state["bad_epochs"]))
        if self.world.main:
            write_metrics(self.run_dir / "metrics.csv", self.rows)
            self.tracker.epoch(row, lrs, stage_index)
        acc = "exact" if self.multilabel else "acc"  # several labels: every label right at probability 0.5
        self.log(f"[{stage.name} {stage_epoch}/{stage.epochs}] epoch {epoch}: train loss {train_loss:.4f} "
                 f"{acc} {train_acc:.3f} | val loss {val_loss:.4f} {acc} {val_acc:.3f} | "
                 + (f"EMA val loss {ema_loss:.4f} {acc} {ema_acc:.3f} | " if self.ema is not None else "")
                 + f"lr {lr:.2e} | {row['seconds']:.1f}s" + (f" (+{caching:.1f}s caching features)" if caching else "")
                 + (" *" if improved else "")
                 + (" (EMA weights)" if improved and source == "ema" else ""))
        if self.on_epoch_end is not None:
            self.on_epoch_end(row)

