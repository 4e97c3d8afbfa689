"""`transfer tune`: a budgeted search over the fine-tuning recipe with Optuna, ending in a recipe file.

Each trial is a normal run directory (`DIR/trial_NNN`) trained by `finetune` with the knobs Optuna suggests
(`suggest`, the whole search space on one screen) and judged by its best validation loss on the same seeded split.
Optuna's median pruner stops a trial whose validation loss after an epoch is worse than the median of the earlier
trials at that epoch. The study lives in `DIR/study.db` (SQLite), so a killed `tune` run again with the same
arguments continues it: the trial that was running when it was killed is marked failed and run anew, finished trials
are kept. At the end: `DIR/recipe.json` (the best trial's knobs, which `finetune --recipe FILE` reuses),
`DIR/trials.csv` and `DIR/trials.png`.
"""

from __future__ import annotations

import csv
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from transfer.core.errors import OptionError, TransferError
from transfer.core.io import display, write_atomic, write_json
from transfer.core.progress import SILENT, Progress
from transfer.data.augment import Augment
from transfer.training.config import FinetuneConfig
from transfer.training.recipes import KNOBS as RECIPE_KNOBS

STUDY_NAME = "transfer-tune"
MIXUPS, EMAS = (0.0, 0.2), (0.0, 0.99)


def suggest(trial) -> dict:
    """The search space: rates per stage, stage lengths, unfreeze depth, augmentation and its strength, mixup,
    label smoothing and EMA. Returns FinetuneConfig settings."""
    augment = trial.suggest_categorical("augment", [False, True])
    strength = trial.suggest_float("augment_strength", 0.25, 1.0) if augment else 1.0
    base = Augment()
    return {
        "lr_head": trial.suggest_float("lr_head", 1e-4, 3e-2, log=True),
        "lr_finetune": trial.suggest_float("lr_finetune", 1e-5, 1e-3, log=True),
        "epochs_head": trial.suggest_int("epochs_head", 2, 30),
        "epochs_finetune": trial.suggest_int("epochs_finetune", 0, 6),
        "unfreeze": str(trial.suggest_int("unfreeze", 1, 4)),
        "augment": augment,
        "augmentation": Augment(rotation=base.rotation * strength, shift=base.shift * strength,
                                zoom=base.zoom * strength, hflip=base.hflip,
                                color_jitter=base.color_jitter * strength).to_dict(),
        "mixup": trial.suggest_categorical("mixup", MIXUPS),
        "label_smoothing": trial.suggest_float("label_smoothing", 0.0, 0.2),
        "ema": trial.suggest_categorical("ema", EMAS),
    }


def starting_params(config: FinetuneConfig) -> dict:
    """The trial that runs `config`'s own recipe (the defaults, or the flags given): the study's first, so its best is
    never worse on validation than what `finetune` would have run. A value the space cannot hold ("auto" rates,
    --unfreeze all, a mixup or EMA value off its list) is left to the sampler."""
    params = {"augment": config.augment, "label_smoothing": config.label_smoothing,
              "epochs_head": config.epochs_head, "epochs_finetune": config.epochs_finetune}
    params |= {name: value for name, value, choices in (("mixup", config.mixup, MIXUPS), ("ema", config.ema, EMAS))
               if value in choices}
    if config.augment:
        params["augment_strength"] = 1.0
    if str(config.unfreeze).isdigit():
        params["unfreeze"] = int(config.unfreeze)
    params |= {name: getattr(config, name) for name in ("lr_head", "lr_finetune")
               if isinstance(getattr(config, name), float)}
    return params


@dataclass
class TuneResult:
    study_path: Path
    recipe_path: Path
    best: dict  # the best trial: number, value (validation loss), accuracy, run directory, knobs
    trials: list[dict]
    continued: int  # trials kept from an earlier, interrupted tune


def _open_study(output: Path, base: dict, trials: int):
    """The study in `output/study.db`, created or continued; a study of other data or settings is refused, and a
    trial left running by a killed process is marked failed (its run directory stays, a new trial redoes it)."""
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    output.mkdir(parents=True, exist_ok=True)
    storage = f"sqlite:///{(output / 'study.db').resolve()}"
    # no pruning before epoch 5: the defaults' head stage is still falling steeply there, and pruning from epoch 2
    # stopped 144 of 147 trials in benchmarks/tune.py, leaving the sampler almost nothing finished to learn from
    pruner = optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=5)
    sampler = optuna.samplers.TPESampler(seed=base["seed"], n_startup_trials=min(5, max(1, trials // 3)))
    study = optuna.create_study(study_name=STUDY_NAME, storage=storage, load_if_exists=True, direction="minimize",
                                pruner=pruner, sampler=sampler)
    fingerprint = json.dumps({k: v for k, v in base.items() if k not in ("workers", "log")}, sort_keys=True,
                             default=str)
    saved = study.user_attrs.get("base")
    if saved is None:
        study.set_user_attr("base", fingerprint)
    elif saved != fingerprint:
        raise OptionError(f"{display(output)} holds a study of other data or settings; give another -o DIR")
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(trial.number, state=TrialState.FAIL)
    return study


def tune(data_dir: str | os.PathLike, base: FinetuneConfig, output: str | os.PathLike, trials: int = 20,
         budget_minutes: float | None = None, device: str = "auto", log: Callable[[str], None] = print,
         progress: Progress = SILENT) -> TuneResult:
    """Search the recipe for `base` (the backbone, data settings and seed stay) on `data_dir`: up to `trials`
    trials in all (earlier ones of the same study count), for at most `budget_minutes` in this call."""
    import optuna
    from optuna.trial import TrialState

    from transfer.training.finetune import finetune

    if trials < 1:
        raise OptionError(f"--trials {trials}: must be at least 1")
    if budget_minutes is not None and budget_minutes <= 0:
        raise OptionError(f"--budget {budget_minutes}: must be above 0 minutes")
    cache_choice = base.cache_features  # None: each trial's own rule (stage 1 on images when it mixes)
    base.check()
    output = Path(output)
    settings = {k: v for k, v in vars(base).items() if k not in RECIPE_KNOBS}
    study = _open_study(output, settings | {"data_dir": str(Path(data_dir).resolve())}, trials)
    done = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    continued = len(done)
    if not study.trials:
        study.enqueue_trial(starting_params(base), skip_if_exists=True)
    if continued:
        log(f"continuing the study in {display(output / 'study.db')}: {continued} trial(s) done")

    def objective(trial) -> float:
        knobs = suggest(trial)
        config = replace(base, **knobs, cache_features=cache_choice)
        run_dir = output / f"trial_{trial.number:03d}"
        trial.set_user_attr("run_dir", str(run_dir))

        def report(row: dict) -> None:
            trial.report(row["val_loss"], row["epoch"])
            if trial.should_prune():
                raise optuna.TrialPruned(f"validation loss {row['val_loss']:.4f} after epoch {row['epoch']}")

        started = time.perf_counter()
        try:
            result = finetune(data_dir, config, output=run_dir, device=device, log=lambda _: None,
                              on_epoch_end=report)
        finally:
            trial.set_user_attr("seconds", round(time.perf_counter() - started, 1))
        trial.set_user_attr("val_accuracy", result.best_val_acc)
        log(f"trial {trial.number}: val loss {result.best_val_loss:.4f}, accuracy {result.best_val_acc:.4f} "
            f"({trial.user_attrs['seconds']} s)")
        return result.best_val_loss

    remaining = trials - continued
    if remaining > 0:
        with progress.task("tuning", total=remaining, unit="trials") as advance:
            study.optimize(objective, n_trials=remaining, callbacks=[lambda *_: advance(1)],
                           timeout=None if budget_minutes is None else budget_minutes * 60,
                           catch=(TransferError,))
    return _finish(study, output, continued)


def _rows(study) -> list[dict]:
    from optuna.trial import TrialState

    rows = []
    for trial in study.trials:
        if trial.state == TrialState.RUNNING:
            continue
        last = max(trial.intermediate_values) if trial.intermediate_values else None
        rows.append({"trial": trial.number, "state": trial.state.name.lower(),
                     "val_loss": trial.value if trial.value is not None else
                     (trial.intermediate_values[last] if last is not None else None),
                     "val_accuracy": trial.user_attrs.get("val_accuracy"), "epochs": last,
                     "seconds": trial.user_attrs.get("seconds"), "run_dir": trial.user_attrs.get("run_dir"),
                     **{f"knob_{name}": value for name, value in trial.params.items()}})
    return rows


def _finish(study, output: Path, continued: int) -> TuneResult:
    """recipe.json of the best finished trial, trials.csv and trials.png."""
    from optuna.trial import TrialState

    finished = [t for t in study.trials if t.state == TrialState.COMPLETE]
    if not finished:
        raise TransferError(f"no trial finished in {display(output)} (every one failed or was pruned); see "
                            "trials.csv, and give a larger --budget or --trials")
    best = study.best_trial
    knobs = {name: value for name, value in json.loads(
        (Path(best.user_attrs["run_dir"]) / "config.json").read_text())["settings"].items() if name in RECIPE_KNOBS}
    record = {"trial": best.number, "val_loss": best.value, "val_accuracy": best.user_attrs.get("val_accuracy"),
              "run_dir": best.user_attrs["run_dir"], "knobs": knobs}
    source = {key: value for key, value in record.items() if key != "knobs"}
    recipe_path = write_json(output / "recipe.json", {"recipe": knobs, "from": source,
                                                      "study": str(output / "study.db")})
    rows = _rows(study)
    _write_csv(output / "trials.csv", rows)
    _plot(rows, output / "trials.png", best.number)
    return TuneResult(output / "study.db", recipe_path, record, rows, continued)


def _write_csv(path: Path, rows: list[dict]) -> None:
    columns = list(dict.fromkeys(key for row in rows for key in row))

    def write(temporary: Path) -> None:
        with temporary.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)

    write_atomic(path, write)


def _plot(rows: list[dict], path: Path, best: int) -> None:
    """Each trial's validation loss in order (pruned ones hollow, at their last epoch), the best so far as a line."""
    from matplotlib.figure import Figure

    from transfer.core.metrics import save_figure

    figure = Figure(figsize=(7, 4))
    axis = figure.subplots()
    shown = [r for r in rows if r["val_loss"] is not None]
    for state, marker in (("complete", "o"), ("pruned", "x")):
        picked = [r for r in shown if r["state"] == state]
        axis.scatter([r["trial"] for r in picked], [r["val_loss"] for r in picked], marker=marker, label=state)
    running, line = float("inf"), []
    for row in shown:
        if row["state"] == "complete":
            running = min(running, row["val_loss"])
        line.append(running)
    axis.step([r["trial"] for r in shown], line, where="post", color="grey", label="best so far")
    axis.set_xlabel("trial")
    axis.set_ylabel("validation loss")
    axis.set_title(f"transfer tune: {len(rows)} trials, best trial {best}")
    axis.legend()
    save_figure(figure, path)
