"""`transfer finetune`: a frozen pretrained backbone, a new head, staged unfreezing, resumable and atomic.

The schedule in a few lines (see `plan_stages`):
  stage "head"     backbone frozen (no gradients, BatchNorm in eval), head trained with AdamW/RMSprop at lr_head;
                   on cached pooled features when stage 1 runs without augmentation ("bottleneck features").
  stage "finetune" the top `unfreeze` groups + head trained with SGD momentum 0.9 at lr_finetune, cosine schedule.
  stage "scratch"  (classic nets, --no-pretrained) everything trained from the start, AdamW, cosine schedule.
With `--schedule one-cycle` every stage follows fastai's one-cycle curve instead, stepped per batch.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from models.registry import BackboneSpec, get_backbone
from models.weights import build_architecture, create_backbone
from transfer.data import (
    Augment,
    ImageDataset,
    eval_dataset,
    make_loader,
    train_transform,
    train_val_samples,
)
from transfer.distributed import DEFAULT_TIMEOUT_S, World
from transfer.errors import (
    DataError,
    NonFiniteLossError,
    OptionError,
    PeerLostError,
    RunDamagedError,
    TransferError,
)
from transfer.interpret import most_confused, plot_top_losses, top_losses
from transfer.io import atomic_path, display, write_json
from transfer.metrics import classification_report, plot_confusion, plot_curves, read_metrics, write_metrics
from transfer.model import TransferModel, build_transfer_model, group_prefixes, set_trainable, train_mode
from transfer.preprocess import Preprocessing, decode_size
from transfer.progress import SILENT, Progress
from transfer.regularize import discriminative_groups, mix_batch, soft_cross_entropy
from transfer.rundir import CHECKPOINT, SPLIT_FILE, RunDirectory
from transfer.scan import ScanReport, scan_folder


@dataclass
class FinetuneConfig:
    """Every choice of a run; saved as config.json and read back by --resume, evaluate, extract and export."""

    backbone: str
    epochs_head: int = 3
    epochs_finetune: int = 3
    unfreeze: str = "2"
    batch_size: int | str = 32  # or "auto" (transfer.batch_size), replaced by the chosen size when the run starts
    lr_head: float | str = 1e-3  # or "auto": the learning-rate range test picks it when the stage starts
    lr_finetune: float | str = 1e-4
    head_optimizer: str = "adamw"
    head: str = "mlp"
    dropout: float = 0.2
    val_split: float = 0.2
    augment: bool = True
    cache_features: bool | None = None  # None: cache when stage 1 runs without augmentation
    pretrained: bool | None = None
    weights: str | None = None
    input_size: int | None = None
    crop_pct: float | None = None
    seed: int = 0
    patience: int = 5
    weight_decay: float = 1e-4
    bn_stats: bool = False  # let unfrozen BatchNorm layers update their running statistics in stage 2
    workers: int | None = None
    strict: bool = False
    augmentation: dict = field(default_factory=lambda: Augment().to_dict())
    label_smoothing: float = 0.0  # timm's; with mixup/cutmix the mixed targets are smoothed too
    mixup: float = 0.0  # Beta(alpha, alpha) of timm's Mixup; 0 is off
    cutmix: float = 0.0  # the same for CutMix; with both set, each batch uses one of them
    lr_decay: float = 1.0  # stage 2: the k-th unfrozen group from the top trains at lr_finetune * lr_decay**k
    ema: float = 0.0  # decay of timm's model EMA, updated every step; 0 is off
    schedule: str = "cosine"  # or "one-cycle": fastai's warm-up then anneal, per batch, in every stage

    def check(self) -> FinetuneConfig:
        """Every value in range before any work; an `OptionError` names the flag (exit code 2)."""
        from transfer.model import HEADS
        from transfer.options import check_choice, check_float, check_input_size, check_int, parse_unfreeze

        spec = get_backbone(self.backbone)
        check_int(self.epochs_head, "--epochs-head", 0)
        check_int(self.epochs_finetune, "--epochs-finetune", 0)
        if self.epochs_head + self.epochs_finetune < 1:
            raise OptionError("nothing to train: --epochs-head plus --epochs-finetune must be at least 1")
        staged = self.pretrained is not False and (spec.has_pretrained or self.weights is not None)
        if staged:  # from-scratch runs train everything in one stage and ignore --unfreeze
            self.unfreeze = parse_unfreeze(self.unfreeze, [g.name for g in spec.unfreeze_groups])
        if self.batch_size != "auto":
            check_int(self.batch_size, "--batch-size", 1)
        for name in ("lr_head", "lr_finetune"):
            if getattr(self, name) != "auto":
                check_float(getattr(self, name), flag_of(name), 0.0, 10.0, low_open=True)
        check_choice(self.head_optimizer, "--head-optimizer", HEAD_OPTIMIZERS)
        check_choice(self.head, "--head", HEADS)
        check_float(self.dropout, "dropout", 0.0, 0.99)
        check_float(self.val_split, "--val-split", 0.0, 0.9)
        check_input_size(spec.name, self.input_size)
        if self.crop_pct is not None:
            check_float(self.crop_pct, "--crop-pct", 0.1, 1.0)
        check_int(self.seed, "--seed", 0, 2**32 - 1)
        check_int(self.patience, "--patience", 1)
        check_float(self.weight_decay, "weight_decay", 0.0, 1.0)
        check_float(self.label_smoothing, "--label-smoothing", 0.0, 0.5)
        check_float(self.mixup, "--mixup", 0.0, 10.0)
        check_float(self.cutmix, "--cutmix", 0.0, 10.0)
        check_float(self.lr_decay, "--lr-decay", 0.0, 1.0, low_open=True)
        check_float(self.ema, "--ema", 0.0, 0.99999)
        check_choice(self.schedule, "--schedule", SCHEDULES)
        if self.workers is not None:
            check_int(self.workers, "--workers", 0, 64)
        if self.weights is not None and not Path(self.weights).is_file():
            raise OptionError(f"--weights {self.weights}: file not found")
        if self.pretrained and not spec.has_pretrained:
            raise OptionError(f"--pretrained: {spec.name} has no pretrained weights; it trains from scratch")
        return self


HEAD_OPTIMIZERS = ("adamw", "rmsprop", "sgd")
SCHEDULES = ("cosine", "one-cycle")


@dataclass(frozen=True)
class Stage:
    name: str
    epochs: int
    prefixes: tuple[str, ...]  # backbone module prefixes that train ("" = all); the head always trains
    optimizer: str
    lr: float
    schedule: str  # "constant" or "cosine" (stepped per epoch), "one-cycle" (stepped per batch)
    cached: bool


@dataclass
class FinetuneResult:
    run_dir: Path
    best_val_loss: float
    best_val_acc: float
    epochs_run: int
    report: dict
    stopped: str = "completed"


def split_epochs(total: int) -> tuple[int, int]:
    """`--epochs N` as (head, fine-tune) epochs: half, at least one, with the backbone frozen (Keras' guide trains
    the new head first), the rest fine-tuning; 6 gives the defaults 3 + 3. A net trained from scratch runs both
    counts as its one stage, so N stays N."""
    head = max(1, total // 2)
    return head, total - head


def plan_stages(config: FinetuneConfig, spec: BackboneSpec, pretrained: bool) -> list[Stage]:
    """The staged schedule; from-scratch models get a single stage that trains everything."""
    if not pretrained:
        return [Stage("scratch", config.epochs_head + config.epochs_finetune, ("",), config.head_optimizer,
                      config.lr_head, config.schedule, False)]
    mixing = config.mixup > 0 or config.cutmix > 0  # mixes images, so stage 1 runs on them, not on a cache
    cached = config.cache_features if config.cache_features is not None else not (config.augment or mixing)
    return [
        Stage("head", config.epochs_head, (), config.head_optimizer, config.lr_head,
              "one-cycle" if config.schedule == "one-cycle" else "constant", cached),
        Stage("finetune", config.epochs_finetune, tuple(group_prefixes(spec, config.unfreeze)), "sgd",
              config.lr_finetune, config.schedule, False),
    ]


def resolve_device(device: str, world: World | None = None) -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cuda' without CUDA is an error, never a silent fallback.

    Under torchrun, plain 'cuda' is this process's GPU, cuda:LOCAL_RANK."""
    from transfer.errors import DeviceError

    world = World.from_env() if world is None else world
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError("--device cuda: CUDA is not available on this machine (torch.cuda.is_available() is False)")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise DeviceError(f"unknown device {device!r}; use auto, cpu or cuda")
    if device == "cuda" and world.distributed:
        torch.cuda.set_device(world.local_rank)
        return torch.device("cuda", world.local_rank)
    return torch.device(device)


def make_optimizer(stage: Stage, model: nn.Module, weight_decay: float,
                   groups: list[dict] | None = None) -> torch.optim.Optimizer:
    """The stage's optimizer over the trainable parameters, or over `groups` (each with its own lr)."""
    params = groups or [p for p in model.parameters() if p.requires_grad]
    if stage.optimizer == "sgd":
        return torch.optim.SGD(params, lr=stage.lr, momentum=0.9)
    if stage.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=stage.lr)
    if stage.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=stage.lr, weight_decay=weight_decay)
    raise TransferError(f"unknown optimizer {stage.optimizer!r}; use adamw, rmsprop or sgd")


def make_scheduler(stage: Stage, optimizer: torch.optim.Optimizer,
                   steps_per_epoch: int = 1) -> torch.optim.lr_scheduler.LRScheduler:
    """Cosine from the stage's rate down to 1% of it (per epoch), or one-cycle over the stage's batches; with
    discriminative rates (several parameter groups) each group follows the curve from its own rate, so the groups
    keep their ratios."""
    if stage.schedule == "one-cycle":
        return one_cycle(optimizer, max(1, stage.epochs) * steps_per_epoch)
    if stage.schedule == "cosine":
        if len(optimizer.param_groups) > 1:
            return cosine_to_one_percent(optimizer, max(1, stage.epochs))
        return torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=max(1, stage.epochs), eta_min=stage.lr * 0.01)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _epoch: 1.0)


def cosine_to_one_percent(optimizer: torch.optim.Optimizer, epochs: int) -> torch.optim.lr_scheduler.LambdaLR:
    """CosineAnnealingLR's curve with eta_min = 1% of each group's own starting rate."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda epoch: 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(epoch, epochs) / epochs)))


def one_cycle(optimizer: torch.optim.Optimizer, steps: int, warmup: float = 0.25, div: float = 25.0,
              div_final: float = 1e5) -> torch.optim.lr_scheduler.LambdaLR:
    """fastai's `fit_one_cycle` rate: cosine up from lr/div to lr over the first `warmup` of the steps, then cosine
    down to lr/div_final; a factor of each group's own rate. (fastai also cycles momentum; we keep SGD's 0.9.)"""
    warm = max(1, round(steps * warmup))

    def cosine(start: float, end: float, position: float) -> float:
        return start + (1 + math.cos(math.pi * (1 - position))) * (end - start) / 2

    def factor(step: int) -> float:
        if step < warm:
            return cosine(1 / div, 1.0, step / warm)
        return cosine(1.0, 1 / div_final, min(1.0, (step - warm) / max(1, steps - warm)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def epoch_seed(seed: int, epoch: int) -> int:
    """One seed per (run seed, global epoch): shuffling, augmentation and dropout repeat exactly after --resume."""
    return seed * 100_003 + epoch


class Trainer:
    """Holds the model, data and run directory; `fit` walks the stages epoch by epoch."""

    def __init__(self, config: FinetuneConfig, data_dir: str | os.PathLike, run_dir: Path, device: torch.device,
                 log: Callable[[str], None] = print, on_epoch_end: Callable[[dict], None] | None = None,
                 on_batch: Callable[[str, int, int], None] | None = None, progress: Progress = SILENT,
                 world: World | None = None):
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
        self.spec = get_backbone(config.backbone)
        self.scan: ScanReport = scan_folder(data_dir, strict=config.strict, progress=progress)
        self.scan.check_trainable()
        self.train_samples, self.val_samples = train_val_samples(self.scan, config.val_split, config.seed)
        if not self.val_samples:
            raise DataError(f"{data_dir}: no validation images; use --val-split > 0 or a val/ folder")
        base = self.spec.preprocessing
        self.prep = replace(base, input_size=base.input_size if config.input_size is None else config.input_size,
                            crop_pct=base.crop_pct if config.crop_pct is None else config.crop_pct)
        self.classes = list(self.scan.classes)
        self.rows: list[dict] = []
        self.last_good_epoch: int | None = None  # epoch of the checkpoint on disk
        self.feature_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.cache_seconds = 0.0  # spent caching stage-1 features, reported apart from the epoch's own time
        self.state: dict | None = None  # the schedule's position, for the reports of an interrupted run
        self.model: TransferModel | None = None

    def write_interrupted_reports(self) -> None:
        """report.json, curves.png and confusion.png for the epochs an interrupted run completed (a second Ctrl-C
        skips them); report.json says `finished: false`."""
        if self.state is None or self.model is None:
            return
        try:
            self.log("writing the report of the epochs done (Ctrl-C again to skip)")
            self.finish(self.model, self.state, finished=False)
        except KeyboardInterrupt:
            self.log("report skipped")

    def kept_message(self) -> str:
        """What survives a failed or interrupted run, truthfully."""
        if self.last_good_epoch is None:
            return "no epoch had finished, so nothing was kept"
        kept = display(self.run_dir / "last.ckpt")
        return f"the last good checkpoint, epoch {self.last_good_epoch}, is kept in {kept}"

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
        dataset = ImageDataset(samples, train_transform(self.prep, augmentation),
                               draft_size=decode_size(self.prep)) if augment else eval_dataset(samples, self.prep)
        size = self.prep.input_size
        return make_loader(dataset, self.config.batch_size, shuffle=shuffle, workers=self.config.workers,
                           device=self.device.type, seed=epoch_seed(self.config.seed, epoch),
                           world=self.world if shuffle else None, image_shape=(3, size, size))

    def sharded_forward(self, model: TransferModel, samples, pooled: bool,
                        description: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Outputs for `samples` in their order: each rank forwards its contiguous block, then all gather."""
        outputs, labels = self.forward_all(model, self.image_loader(self.world.take(samples), False, False),
                                           pooled=pooled, description=description)
        if not self.world.distributed:
            return outputs, labels
        parts = [part for part in self.world.gather((outputs, labels)) if len(part[1])]
        return torch.cat([part[0] for part in parts]), torch.cat([part[1] for part in parts])

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

    @torch.no_grad()
    def forward_all(self, model: TransferModel, loader, pooled: bool = False,
                    description: str = "validating") -> tuple[torch.Tensor, torch.Tensor]:
        model.eval()
        outputs, labels = [], []
        with self.progress.task(description, total=len(loader.dataset), unit="images") as advance:
            for images, targets in loader:
                images = self.to_device(images)
                with self.autocast():
                    out = model.pooled_features(images) if pooled else model(images)
                outputs.append(out.float().cpu())
                labels.append(targets)
                advance(len(targets))
        if not outputs:  # a rank whose block is empty (fewer images than processes)
            return torch.empty(0), torch.empty(0, dtype=torch.long)
        return torch.cat(outputs), torch.cat(labels)

    def to_device(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        if self.device.type == "cuda" and images.ndim == 4:
            return images.to(memory_format=torch.channels_last)
        return images

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    # --- one epoch ---------------------------------------------------------------------------------------------
    def train_epoch(self, model: TransferModel, stage: Stage, optimizer, epoch: int,
                    label: str = "", batch_scheduler=None) -> tuple[float, float]:
        """One pass over the training images (or cached features); `batch_scheduler` steps after every batch."""
        torch.manual_seed(epoch_seed(self.config.seed, epoch))
        train_mode(model, list(stage.prefixes), batchnorm_stats=stage.name == "scratch" or self.config.bn_stats)
        if stage.cached:
            features, labels = self.cached_features(model, "train")
            order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(
                epoch_seed(self.config.seed, epoch)))
            shares = (idx[span.start:span.stop] for idx in order.split(self.config.batch_size)
                      for span in [self.world.block(len(idx))])
            batches = ((features[idx], labels[idx]) for idx in shares)
            total = math.ceil(len(labels) / self.config.batch_size)
        else:
            batches = self.image_loader(self.train_samples, self.config.augment, True, epoch)
            total = len(batches)
        forward = self.parallel
        total_loss, correct, count = 0.0, 0, 0
        with self.progress.task(label or f"{stage.name} epoch {epoch}", total=total, unit="batches",
                                min_seconds=0) as advance:
            for step, (inputs, targets) in enumerate(batches):
                loss_sum, logits, targets = self.train_step(forward, optimizer, inputs, targets, stage, epoch, step)
                if batch_scheduler is not None:
                    batch_scheduler.step()
                total_loss += loss_sum
                correct += int((logits.argmax(1) == targets).sum())
                count += len(targets)
                advance(1)
                if self.on_batch is not None:
                    self.on_batch(f"{stage.name} epoch {epoch}", step + 1, total)
        total_loss, correct, count = self.world.sum([total_loss, correct, count])
        return total_loss / count, correct / count

    def train_step(self, forward, optimizer, inputs, targets, stage: Stage, epoch: int,
                   step: int, probe: bool = False) -> tuple[float, torch.Tensor, torch.Tensor]:
        """One optimisation step on this rank's share of a global batch; returns the share's summed loss.

        The loss is the global batch's mean: each rank scales its sum by world size / global count, and
        DistributedDataParallel averages the gradients over the ranks. A non-finite loss (summed over the ranks,
        so every rank sees it) stops the run before the weights are touched. A `probe` step (the learning-rate range
        test, on a copy of the model) returns a non-finite loss instead, and leaves the run's EMA alone."""
        inputs, targets = self.to_device(inputs), targets.to(self.device)
        config = self.config
        soft = None
        if config.mixup > 0 or config.cutmix > 0 or config.label_smoothing > 0:
            inputs, soft = mix_batch(inputs, targets, len(self.classes), config.mixup, config.cutmix,
                                     config.label_smoothing)
        with self.autocast():
            logits = forward(inputs)
            loss_sum = (F.cross_entropy(logits.float(), targets, reduction="sum") if soft is None
                        else soft_cross_entropy(logits.float(), soft))
        global_sum, global_count = self.world.sum([loss_sum.item(), len(targets)])
        if not math.isfinite(global_sum):
            if probe:
                return global_sum, logits.detach(), targets
            raise NonFiniteLossError(f"non-finite training loss ({global_sum / global_count}) in stage {stage.name}, "
                                     f"epoch {epoch}, batch {step}; {self.kept_message()} (try a lower learning rate)")
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
        loss = F.cross_entropy(logits, labels).item()
        return loss, float((logits.argmax(1) == labels).float().mean()), logits, labels

    def resolve_lr(self, model: TransferModel, stage: Stage) -> Stage:
        """A stage whose rate is "auto" gets the range test's suggestion (or, resumed, the one it got before),
        recorded in config.json with the rule, and plotted to lr_find.png."""
        if stage.lr != "auto":
            return stage
        from transfer.lr_find import find_lr, plot

        found = self.lr_found.get(stage.name)  # a resumed run keeps the rate it found before
        if found is None:
            result = find_lr(self, model, stage)
            found = {"suggestion": result.suggestion, "rule": result.rule, "stopped": result.stopped,
                     "tried": [result.lrs[0], result.lrs[-1]]}
            self.lr_results.append(result)
            if self.world.main:
                plot(self.lr_results, self.run_dir / "lr_find.png")
            self.log(f"stage {stage.name}: learning rate {found['suggestion']:.2e} from the range test ({result.rule})")
            self.lr_found[stage.name] = found
            if self.world.main:  # the chosen rate goes into config.json, next to the setting "auto"
                record = json.loads((self.run_dir / "config.json").read_text())
                record["stages"] = [{**saved_stage, "lr": found["suggestion"]} if saved_stage["name"] == stage.name
                                    else saved_stage for saved_stage in record["stages"]]
                record["lr_find"] = self.lr_found
                write_json(self.run_dir / "config.json", record)
        return replace(stage, lr=found["suggestion"])

    def choose_batch_size(self, model: TransferModel, widest: Stage) -> None:
        """Resolve `--batch-size auto` before the first stage (see transfer.batch_size); every rank takes the
        smallest of the ranks' choices. The choice becomes the run's batch size, kept on resume."""
        from transfer.batch_size import choose_batch_size, cuda_fits

        fits = None
        if self.device.type == "cuda":
            set_trainable(model, list(widest.prefixes))
            train_mode(model, list(widest.prefixes), batchnorm_stats=widest.name == "scratch" or self.config.bn_stats)
            fits = cuda_fits(model, self.prep.input_size, self.device, self.autocast)
        choice = choose_batch_size(self.device, len(self.train_samples), self.world.size, fits)
        choice["batch_size"] = min(self.world.gather(choice["batch_size"]))
        self.batch_choice, self.config.batch_size = choice, choice["batch_size"]
        self.log(f"--batch-size auto: {choice['batch_size']} ({choice['rule']})")

    def lr_groups(self, model: TransferModel, stage: Stage) -> list[dict] | None:
        """Stage 2 with --lr-decay below 1: one parameter group per unfrozen group, lower rates further down."""
        if stage.name != "finetune" or self.config.lr_decay == 1.0:
            return None
        groups = self.spec.unfreeze_groups
        count = len(groups) if self.config.unfreeze == "all" else int(self.config.unfreeze)
        return discriminative_groups(model, [list(g.modules) for g in groups[:count]], stage.lr,
                                     self.config.lr_decay)

    def data_parallel(self, module: nn.Module) -> nn.Module:
        """`module` wrapped in DistributedDataParallel under torchrun (gradients averaged over ranks), else itself."""
        if not self.world.distributed:
            return module
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=device_ids, broadcast_buffers=False)

    # --- the run -----------------------------------------------------------------------------------------------
    def fit(self, resume_state: dict | None = None, saved: dict | None = None) -> FinetuneResult:
        """Walk the stages epoch by epoch; on resume, continue where the checkpoint stopped.

        A stage whose epoch count was raised on resume (`saved` is the run's config.json) gets a fresh cosine
        tail over its added epochs and its early-stopping patience reset.
        """
        model, pretrained, source = self.build_model(resume_state)
        self.model = model
        if self.config.ema > 0:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(model, decay=self.config.ema)
            if resume_state is not None and "ema" in resume_state:
                self.ema.module.load_state_dict(resume_state["ema"])
        stages = plan_stages(self.config, self.spec, pretrained)
        if saved is not None:
            self.batch_choice = saved.get("batch_size_auto")
        if self.config.batch_size == "auto":
            self.choose_batch_size(model, stages[-1])
        self.log(f"{self.spec.name}: weights from {source}; {len(self.classes)} classes, "
                 f"{len(self.train_samples)} train / {len(self.val_samples)} val images, "
                 f"{len(self.scan.skipped)} skipped; device {self.device}")
        state = {"stage_index": 0, "stage_epoch": 0, "epoch": 0, "best_val_loss": math.inf, "best_val_acc": 0.0,
                 "bad_epochs": 0}
        if saved is not None:
            self.lr_found = dict(saved.get("lr_find", {}))
        if resume_state is None:
            self.write_config(stages, source)
            self.write_split()
        else:
            state.update({key: resume_state[key] for key in STATE_KEYS})
            state["best_source"] = resume_state.get("best_source", "model")
            self.last_good_epoch = state["epoch"]
            self.rows = [r for r in read_run_metrics(self.run_dir) if r["epoch"] <= state["epoch"]]
            if saved is not None and [s["epochs"] for s in saved["stages"]] != [s.epochs for s in stages]:
                self.write_config(stages, source, previous=saved)
        self.state = state
        for stage_index in range(state["stage_index"], len(stages)):
            stage = stages[stage_index]
            trainable = set_trainable(model, list(stage.prefixes))
            stage = stages[stage_index] = self.resolve_lr(model, stage)
            self.parallel = self.data_parallel(model.head if stage.cached else model)
            optimizer = make_optimizer(stage, model, self.config.weight_decay, self.lr_groups(model, stage))
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
            self.log(f"stage {stage.name}: {stage.epochs} epoch(s), {stage.optimizer} lr {stage.lr:g}, "
                     f"{len(trainable)} trainable tensors{', cached features' if stage.cached else ''}")
            for stage_epoch in range(start + 1, stage.epochs + 1):
                if state["bad_epochs"] >= self.config.patience:
                    self.log(f"stage {stage.name}: no validation-loss gain in {self.config.patience} epoch(s); "
                             "stopping it early (--patience)")
                    break
                self.run_epoch(model, stage, stage_index, stage_epoch, optimizer, scheduler, state)
        return self.finish(model, state)

    def run_epoch(self, model, stage: Stage, stage_index: int, stage_epoch: int, optimizer, scheduler,
                  state: dict) -> None:
        started, cached_before = time.perf_counter(), self.cache_seconds
        epoch = state["epoch"] + 1
        lr = optimizer.param_groups[0]["lr"]
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
                                     f"{self.kept_message()} (try a lower learning rate)")
        improved = candidate_loss < state["best_val_loss"]
        state.update(epoch=epoch, stage_index=stage_index, stage_epoch=stage_epoch,
                     bad_epochs=0 if improved else state["bad_epochs"] + 1)
        if improved:
            state.update(best_val_loss=candidate_loss, best_val_acc=candidate_acc, best_source=source)
        self.rows.append(row)
        if self.world.main:
            if improved:
                save_weights(candidate, self.run_dir / "best.safetensors")
            save_checkpoint(self.run_dir / "last.ckpt", model, optimizer, scheduler, state,
                            ema=self.ema.module if self.ema is not None else None)
            write_metrics(self.run_dir / "metrics.csv", self.rows)
        self.last_good_epoch = epoch
        self.log(f"[{stage.name} {stage_epoch}/{stage.epochs}] epoch {epoch}: train loss {train_loss:.4f} "
                 f"acc {train_acc:.3f} | val loss {val_loss:.4f} acc {val_acc:.3f} | "
                 + (f"EMA val loss {ema_loss:.4f} acc {ema_acc:.3f} | " if self.ema is not None else "")
                 + f"lr {lr:.2e} | {row['seconds']:.1f}s" + (f" (+{caching:.1f}s caching features)" if caching else "")
                 + (" *" if improved else "")
                 + (" (EMA weights)" if improved and source == "ema" else ""))
        if self.on_epoch_end is not None:
            self.on_epoch_end(row)

    def finish(self, model: TransferModel, state: dict, finished: bool = True) -> FinetuneResult:
        """Reload the best weights, then write report.json, confusion.png and curves.png (rank 0). An interrupted
        run (`finished=False`) writes them too, for the epochs it completed, and says so in report.json."""
        self.world.barrier()  # rank 0's best.safetensors is complete
        load_weights(model, self.run_dir / "best.safetensors")
        logits, labels = self.sharded_forward(model, self.val_samples, pooled=False,
                                              description="report: validating the best weights")
        predictions = logits.argmax(1)
        report = classification_report(labels.tolist(), predictions.tolist(), self.classes)
        paths = [s.path for s in self.val_samples]
        worst = top_losses(logits.numpy(), labels.numpy(), self.classes, paths)
        report.update(split="validation", finished=finished, epochs=state["epoch"],
                      best_val_loss=state["best_val_loss"],
                      best_weights=state.get("best_source", "model"),
                      most_confused=most_confused(report["confusion_matrix"], self.classes), top_losses=worst,
                      skipped=[{"path": s.path, "reason": s.reason} for s in self.scan.skipped])
        result = FinetuneResult(self.run_dir, state["best_val_loss"], report["accuracy"], state["epoch"], report)
        if not self.world.main:
            return result
        write_json(self.run_dir / "report.json", report)
        import numpy as np

        name = f"{self.spec.name} on {self.data_dir.name} ({self.run_dir.name})"
        plot_confusion(np.asarray(report["confusion_matrix"]), self.classes, self.run_dir / "confusion.png",
                       title=f"{name}: validation confusion matrix")
        plot_curves(self.rows, self.run_dir / "curves.png", title=f"{name}: loss and accuracy per epoch")
        plot_top_losses(worst, self.run_dir / "top_losses.png", title=f"{name}: most confidently wrong (validation)")
        kept = " (kept the EMA weights: they validated better)" if report["best_weights"] == "ema" else ""
        self.log(f"best val loss {state['best_val_loss']:.4f}{kept}, val accuracy {report['accuracy']:.4f}; "
                 f"run saved in {self.run_dir}")
        return result

    def write_split(self) -> None:
        """split.json: which images trained and which validated (paths relative to the data folder), so evaluate
        can say when it is given training images, and evaluate --split val can take the validation ones."""
        if not self.world.main:
            return
        write_json(self.run_dir / SPLIT_FILE, {
            "data_dir": str(self.data_dir),
            **{name: [os.path.relpath(Path(s.path).resolve(), self.data_dir) for s in samples]
               for name, samples in (("train", self.train_samples), ("val", self.val_samples))}})

    def write_config(self, stages: list[Stage], source: str, previous: dict | None = None) -> None:
        """config.json; `previous` (the config a resumed run was read from) adds an entry to its extensions."""
        if not self.world.main:
            return
        import timm

        from transfer import __version__

        history = []
        if previous is not None:
            history = previous.get("extensions", []) + [{
                "at_epoch": self.last_good_epoch, "when": datetime.now().isoformat(timespec="seconds"),
                "stage_epochs_before": {s["name"]: s["epochs"] for s in previous["stages"]},
                "stage_epochs_after": {s.name: s.epochs for s in stages}}]
        write_json(self.run_dir / "config.json", {
            "backbone": self.spec.name,
            "timm_model": self.spec.timm_name,
            "classes": self.classes,
            "data_dir": str(self.data_dir),
            "preprocessing": self.prep.to_dict(),
            "head": {"kind": self.config.head, "dropout": self.config.dropout},
            "stages": [asdict(s) for s in stages],
            "weights_source": source,
            "settings": asdict(self.config),
            "created": datetime.now().isoformat(timespec="seconds"),
            "versions": {"transfer": __version__, "torch": torch.__version__, "timm": timm.__version__},
            **({"extensions": history} if history else {}),
            **({"lr_find": self.lr_found} if self.lr_found else {}),
            **({"batch_size_auto": self.batch_choice} if self.batch_choice else {}),
        })


def fresh_tail(stage: Stage, optimizer: torch.optim.Optimizer, done: int, stage_finished: bool,
               steps_per_epoch: int = 1):
    """The schedule for a stage extended on resume: a new cosine over its remaining epochs, from the stage's base
    rate when the stage had finished (a warm restart), else from the rate it had reached. Constant-rate stages
    simply continue; a one-cycle stage runs a new cycle over its remaining epochs, up to each group's own rate."""
    if stage.schedule == "constant":
        return make_scheduler(stage, optimizer)
    if stage.schedule == "one-cycle":
        return one_cycle(optimizer, max(1, stage.epochs - done) * steps_per_epoch)
    if len(optimizer.param_groups) > 1:  # discriminative rates: every group restarts in proportion
        factor = 1.0 if stage_finished else optimizer.param_groups[0]["lr"] / optimizer.param_groups[0]["initial_lr"]
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] = group["initial_lr"] * factor
        return cosine_to_one_percent(optimizer, max(1, stage.epochs - done))
    start_lr = stage.lr if stage_finished else optimizer.param_groups[0]["lr"]
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] = start_lr
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, stage.epochs - done),
                                                      eta_min=stage.lr * 0.01)


# --- weights and checkpoints (atomic) -------------------------------------------------------------------------------
def save_weights(model: nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as temp:
        save_file(tensors, str(temp))


def load_weights(model: nn.Module, path: Path) -> None:
    """best.safetensors into `model`; unreadable or mismatched weights are a `RunDamagedError`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(path), device=str(next(model.parameters()).device))
        model.load_state_dict(state)
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise RunDamagedError(display(path.parent), path.name, _first_line(exc)) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


STATE_KEYS = ("stage_index", "stage_epoch", "epoch", "best_val_loss", "best_val_acc", "bad_epochs")


def save_checkpoint(path: Path, model: nn.Module, optimizer, scheduler, state: dict,
                    ema: nn.Module | None = None) -> None:
    """last.ckpt: weights, optimizer, scheduler, position in the schedule, RNG, and the EMA weights with --ema;
    readable with weights_only=True."""
    payload = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
               "rng": torch.get_rng_state(), **{key: state[key] for key in STATE_KEYS},
               "best_source": state.get("best_source", "model"), **({"ema": ema.state_dict()} if ema else {})}
    with atomic_path(path) as temp:
        torch.save(payload, temp)


def load_checkpoint(path: Path) -> dict:
    """last.ckpt with `weights_only=True`; a truncated, corrupt or unsafe file is a `RunDamagedError`."""
    import pickle

    run_dir = display(path.parent)
    if not path.is_file():
        raise TransferError(f"--resume {run_dir}: no checkpoint ({path.name}); the run never finished an epoch, so "
                            "start it again without --resume")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise RunDamagedError(run_dir, path.name, "not a plain checkpoint: it holds Python objects besides tensors, "
                                                  "and loading it could run code, so it is refused") from None
    except (RuntimeError, OSError, EOFError, ValueError, KeyError) as exc:
        detail = _first_line(exc).split(". ")[0]
        raise RunDamagedError(run_dir, path.name, f"truncated or corrupt ({detail})") from None
    missing = [key for key in ("model", "optimizer", "scheduler", *STATE_KEYS) if not isinstance(state, dict)
               or key not in state]
    if missing:
        raise RunDamagedError(run_dir, path.name, f"missing {', '.join(missing)}")
    return state


# --- entry point ---------------------------------------------------------------------------------------------------
def default_run_dir(backbone: str) -> Path:
    return Path("runs") / f"{backbone}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def finetune(
    data_dir: str | os.PathLike | None,
    config: FinetuneConfig | None = None,
    output: str | os.PathLike | None = None,
    resume: str | os.PathLike | None = None,
    device: str = "auto",
    log: Callable[[str], None] = print,
    on_epoch_end: Callable[[dict], None] | None = None,
    on_batch: Callable[[str, int, int], None] | None = None,
    changes: dict | None = None,
    progress: Progress = SILENT,
    dist_timeout: float = DEFAULT_TIMEOUT_S,
) -> FinetuneResult:
    """Fine-tune on `data_dir` into a new run directory, or continue `resume` from its last.ckpt.

    On resume the run's saved settings apply; `changes` holds the settings given anew: raised `epochs_head` /
    `epochs_finetune` train the extra epochs, `workers`/`patience` may change, any other difference is an
    `OptionError` naming the flag. The run directory is locked while training; a fresh run that fails or is
    interrupted before its first checkpoint leaves nothing behind. Under torchrun a process that stops answering
    for `dist_timeout` seconds ends every other one with a `PeerLostError`; the last checkpoint stays resumable.
    """
    if data_dir is None:
        if resume is None:
            raise OptionError("finetune needs a data folder (one sub-folder per class)")
        data_dir = load_run_config(resume).get("data_dir") or ""
        if not Path(data_dir).is_dir():
            raise DataError(f"--resume {display(resume)}: its data folder {data_dir or '(not recorded)'} is gone; "
                            "give the data folder as the first argument")
    if not Path(data_dir).is_dir():
        raise DataError(f"folder not found: {data_dir}")
    world = World.from_env()
    target = resolve_device(device, world)
    if resume is None:
        if config is None:
            raise TransferError("finetune needs a config (at least the backbone)")
        config.check()
        run_dir = Path(output) if output is not None else default_run_dir(config.backbone)
    else:
        run_dir = Path(resume)
    if world.distributed and output is None and resume is None:
        raise TransferError("under torchrun give the run directory with --output RUN (every process must name it)")
    joined = world.join(target.type, dist_timeout)
    if not world.main:  # rank 0 alone writes and reports; the others train their share and stay quiet
        log, progress = (lambda _: None), SILENT
    try:
        with RunDirectory(run_dir, fresh=resume is None) if world.main else contextlib.nullcontext():
            resume_state, saved = None, None
            if resume is not None:
                saved = load_run_config(run_dir)
                config = resumed_config(saved, changes or {}, run_dir)
                resume_state = load_checkpoint(run_dir / CHECKPOINT)
                check_extension(saved, config, resume_state, run_dir)
                finished = finished_result(run_dir, saved, config)
                if finished is not None:
                    log(f"{display(run_dir)} already finished its {finished.epochs_run} epoch(s); nothing new to "
                        "train (raise --epochs-head/--epochs-finetune, or --epochs, to train more)")
                    return finished
            torch.manual_seed(config.seed)
            trainer = Trainer(config, data_dir, run_dir, target, log, on_epoch_end, on_batch, progress, world)
            if saved is not None and trainer.classes != saved["classes"]:
                raise DataError(f"{data_dir} has classes {trainer.classes}, the run was trained on {saved['classes']}")
            try:
                return trainer.fit(resume_state, saved)
            except RuntimeError as exc:
                lost = world.lost_peer(exc, dist_timeout)
                if lost is None:
                    raise
                kept = (f"its last checkpoint is kept: resume with --resume {display(run_dir)}"
                        if (run_dir / CHECKPOINT).exists() or trainer.last_good_epoch is not None
                        else "no epoch had finished, so nothing was kept")
                raise PeerLostError(f"{lost}; {kept}") from None
            except KeyboardInterrupt:
                if trainer.last_good_epoch is None:
                    log("interrupted before the first epoch finished; nothing was kept")
                    raise
                if not world.distributed:
                    trainer.write_interrupted_reports()
                log(f"interrupted; epoch {trainer.last_good_epoch} is saved: resume with "
                    f"transfer finetune {display(data_dir)} --resume {display(run_dir)}")
                raise
    finally:
        if joined:
            world.leave()


RESUME_CHANGEABLE = ("epochs_head", "epochs_finetune", "workers", "patience")


def flag_of(setting: str) -> str:
    """The command-line flag of a FinetuneConfig field: epochs_finetune -> --epochs-finetune."""
    return "--" + setting.replace("_", "-")


def resumed_config(saved: dict, changes: dict, run_dir: Path) -> FinetuneConfig:
    """The run's saved settings with the allowed `changes` applied; any other difference is an `OptionError`."""
    try:
        config = FinetuneConfig(**saved["settings"])
    except TypeError as exc:
        raise RunDamagedError(display(run_dir), "config.json", f"settings: {exc}") from None
    for key, value in changes.items():
        if not hasattr(config, key):
            raise OptionError(f"unknown setting {key!r}")
        if getattr(config, key) == value or (key == "batch_size" and value == "auto" and saved.get("batch_size_auto")):
            continue  # `--batch-size auto` again names the size auto chose for this run
        if key not in RESUME_CHANGEABLE:
            raise OptionError(f"{flag_of(key)} {value!r} differs from the run's {getattr(config, key)!r}; a resumed "
                              f"run keeps its settings (only {', '.join(map(flag_of, RESUME_CHANGEABLE))} may change)")
        setattr(config, key, value)
    return config.check()


def check_extension(saved: dict, config: FinetuneConfig, state: dict, run_dir: Path) -> None:
    """Raised epoch counts must belong to a stage the run has not left; lowered ones are refused."""
    before = {"epochs_head": saved["settings"]["epochs_head"], "epochs_finetune": saved["settings"]["epochs_finetune"]}
    for key, old in before.items():
        new = getattr(config, key)
        if new < old:
            raise OptionError(f"{flag_of(key)} {new}: the run was planned with {old}; a resumed run can only add "
                              "epochs")
    stage_names = [s["name"] for s in saved["stages"]]
    current = stage_names[state["stage_index"]]
    if config.epochs_head > before["epochs_head"] and current == "finetune":
        raise OptionError(f"--epochs-head {config.epochs_head}: {display(run_dir)} is already in stage finetune; "
                          "raise --epochs-finetune instead")


def finished_result(run_dir: Path, saved: dict, config: FinetuneConfig) -> FinetuneResult | None:
    """The result of a run that completed its schedule, when resuming it adds no epoch; else None."""
    import json

    added = (config.epochs_head > saved["settings"]["epochs_head"]
             or config.epochs_finetune > saved["settings"]["epochs_finetune"])
    try:
        report = json.loads((run_dir / "report.json").read_text())
    except (OSError, ValueError):
        return None
    if added or not isinstance(report, dict) or report.get("finished") is not True:
        return None
    return FinetuneResult(run_dir, float(report.get("best_val_loss", math.nan)), float(report.get("accuracy", 0.0)),
                          int(report.get("epochs", 0)), report, stopped="already finished")


def load_run_config(run_dir: str | os.PathLike) -> dict:
    """config.json of a run directory; missing, malformed or incomplete is a clear error, never a traceback."""
    import json

    path = Path(run_dir) / "config.json"
    if not Path(run_dir).is_dir() or not path.is_file():
        raise TransferError(f"{display(run_dir)} is not a run directory (no config.json)")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise RunDamagedError(display(run_dir), "config.json", _first_line(exc)) from None
    required = {"backbone": str, "classes": list, "preprocessing": dict, "head": dict, "settings": dict,
                "stages": list}
    for key, kind in required.items():
        if not isinstance(config, dict) or not isinstance(config.get(key), kind):
            raise RunDamagedError(display(run_dir), "config.json", f"{key!r} is missing or not a {kind.__name__}")
    try:
        Preprocessing.from_dict(config["preprocessing"])
        get_backbone(config["backbone"])
    except TransferError as exc:
        raise RunDamagedError(display(run_dir), "config.json", str(exc)) from None
    return config


def read_run_metrics(run_dir: Path) -> list[dict]:
    try:
        return read_metrics(run_dir / "metrics.csv")
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise RunDamagedError(display(run_dir), "metrics.csv", _first_line(exc)) from None


def load_run(run_dir: str | os.PathLike, weights: str = "best.safetensors") -> tuple[TransferModel, dict]:
    """The fine-tuned model of a run directory (best weights) and its config; no download needed."""
    config = load_run_config(run_dir)
    spec = get_backbone(config["backbone"])
    prep = Preprocessing.from_dict(config["preprocessing"])
    head = config["head"]
    model = build_transfer_model(spec, build_architecture(spec), len(config["classes"]), prep.input_size,
                                 head.get("kind", "mlp"), head.get("dropout", 0.0))
    path = Path(run_dir) / weights
    if not path.is_file():
        raise TransferError(f"{display(run_dir)} has no {weights}: the run has not finished an epoch")
    load_weights(model, path)
    return model.eval(), config
