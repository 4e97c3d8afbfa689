"""A fine-tuning run's settings: `FinetuneConfig` (saved as config.json), its checks, and the rules for resuming.

`check` consults the backbone registry and, for --input-size, the architecture itself (its smallest usable input).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from models.layers import check_input_size
from models.registry import get_backbone
from transfer.core.errors import OptionError, RunDamagedError
from transfer.core.io import display
from transfer.core.options import check_choice, check_float, check_int, parse_unfreeze
from transfer.data.augment import Augment
from transfer.training.model import HEADS
from transfer.training.tracking import check_trackers, probe_trackers


@dataclass
class FinetuneConfig:
    """Every choice of a run; saved as config.json and read back by --resume, evaluate, extract and export."""

    backbone: str
    epochs_head: int | None = None  # None here and in `augment`: the default of the run's kind (DEFAULTS), set by
    epochs_finetune: int | None = None  # `check`
    unfreeze: str = "2"
    batch_size: int | str = 32  # or "auto" (training.batch_size), replaced by the chosen size when the run starts
    lr_head: float | str = 1e-3  # or "auto": the learning-rate range test picks it when the stage starts
    lr_finetune: float | str = 1e-3  # the Keras guide's 1e-4 let stage 2 beat stage 1 less often (defaults.py)
    head_optimizer: str = "adamw"
    head: str = "mlp"
    dropout: float = 0.2
    val_split: float = 0.2
    augment: bool | None = None
    cache_features: bool | None = None  # stage 1 on cached features; None: yes unless mixup/cutmix, set by `check`
    pretrained: bool | None = None
    weights: str | None = None
    input_size: int | None = None
    crop_pct: float | None = None
    decode_floor: float | None = None  # JPEGs decode to >= this x the resize length; None: DRAFT_FACTOR (3.0)
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
    labels: dict | None = None  # a labels file (`transfer.data.labels.LabelsFile` as a dict); None: class folders
    class_weights: str = "none"  # or "balanced": scikit-learn's inverse-frequency weights in the training loss
    sampler: str = "shuffle"  # or "balanced": draw training images in inverse proportion to their class's size
    log: list[str] = field(default_factory=list)  # experiment trackers: "tensorboard", "mlflow" (training.tracking)

    def check(self) -> FinetuneConfig:
        """Every value in range before any work; an `OptionError` names the flag (exit code 2)."""
        spec = get_backbone(self.backbone)
        staged = self.pretrained is not False and (spec.has_pretrained or self.weights is not None)
        for name, value in DEFAULTS["staged" if staged else "scratch"].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.cache_features is None:  # mixing needs images; augmentation alone then applies from stage 2 on
            self.cache_features = not (self.mixup > 0 or self.cutmix > 0)
        check_int(self.epochs_head, "--epochs-head", 0)
        check_int(self.epochs_finetune, "--epochs-finetune", 0)
        if self.epochs_head + self.epochs_finetune < 1:
            raise OptionError("nothing to train: --epochs-head plus --epochs-finetune must be at least 1")
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
        if self.decode_floor is not None:
            check_float(self.decode_floor, "--decode-floor", 1.0, 8.0)
        check_int(self.seed, "--seed", 0, 2**32 - 1)
        check_int(self.patience, "--patience", 1)
        check_float(self.weight_decay, "weight_decay", 0.0, 1.0)
        check_float(self.label_smoothing, "--label-smoothing", 0.0, 0.5)
        check_float(self.mixup, "--mixup", 0.0, 10.0)
        check_float(self.cutmix, "--cutmix", 0.0, 10.0)
        check_float(self.lr_decay, "--lr-decay", 0.0, 1.0, low_open=True)
        check_float(self.ema, "--ema", 0.0, 0.99999)
        check_choice(self.schedule, "--schedule", SCHEDULES)
        check_choice(self.class_weights, "--class-weights", CLASS_WEIGHTS)
        check_choice(self.sampler, "--sampler", SAMPLERS)
        if self.sampler == "balanced" and self.class_weights == "balanced":
            raise OptionError("--sampler balanced and --class-weights balanced both correct the class imbalance: "
                              "together they over-correct it (the majority classes then lose); choose one")
        if self.workers is not None:
            check_int(self.workers, "--workers", 0, 64)
        if self.weights is not None and not Path(self.weights).is_file():
            raise OptionError(f"--weights {self.weights}: file not found")
        if self.pretrained and not spec.has_pretrained:
            raise OptionError(f"--pretrained: {spec.name} has no pretrained weights; it trains from scratch")
        self.log = list(dict.fromkeys(self.log))
        check_trackers(self.log)
        probe_trackers(self.log)  # the store answers and takes a write, or exit 2 before any work
        return self

    def out_of_patience(self, bad_epochs: int) -> bool:
        """--patience's rule: a stage ends after this many epochs in a row without a new best validation loss."""
        return bad_epochs >= self.patience


# The recipe's defaults by kind of run. A pretrained backbone: up to 25 head epochs on cached features (--patience
# ends the stage when the validation loss stops improving), then 3 with the top groups unfrozen, no augmentation:
# best or within noise of the best of benchmarks/defaults.py's candidates on every dataset, in less time than the
# 3 + 3 augmented epochs before it (README, "Choosing a recipe"). From scratch the one stage trains both counts,
# augmented, as before: no measurement here says otherwise.
DEFAULTS = {"staged": {"epochs_head": 25, "epochs_finetune": 3, "augment": False},
            "scratch": {"epochs_head": 3, "epochs_finetune": 3, "augment": True}}
HEAD_OPTIMIZERS = ("adamw", "rmsprop", "sgd")
SCHEDULES = ("cosine", "one-cycle")
CLASS_WEIGHTS = ("none", "balanced")
SAMPLERS = ("shuffle", "balanced")


def split_epochs(total: int) -> tuple[int, int]:
    """`--epochs N` as (head, fine-tune) epochs: half, at least one, with the backbone frozen (Keras' guide trains
    the new head first), the rest fine-tuning (6 gives 3 + 3). A net trained from scratch runs both counts as its one
    stage, so N stays N."""
    head = max(1, total // 2)
    return head, total - head



RESUME_CHANGEABLE = ("epochs_head", "epochs_finetune", "workers", "patience", "log")


def flag_of(setting: str) -> str:
    """The command-line flag of a FinetuneConfig field: epochs_finetune -> --epochs-finetune."""
    return "--" + setting.replace("_", "-")


def resumed_config(saved: dict, changes: dict, run_dir: Path) -> FinetuneConfig:
    """The run's saved settings with the allowed `changes` applied; any other difference is an `OptionError`."""
    settings = dict(saved["settings"])
    if settings.get("cache_features", False) is None:  # a run from before check() set it: the rule it ran under
        settings["cache_features"] = not (settings.get("augment", True) or settings.get("mixup", 0) > 0
                                          or settings.get("cutmix", 0) > 0)
    try:
        config = FinetuneConfig(**settings)
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

