"""The `transfer` command line: parse, call one library function, print. Errors become exit codes here only.

Exit codes: 0 success; 2 bad usage or bad input (`TransferError`, one line naming what is wrong); 1 anything else.
"""

from __future__ import annotations

import functools
import re
import signal
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from transfer.core.errors import NonFiniteLossError, OptionError, PeerLostError, TransferError, VerificationError
from transfer.core.io import display, os_error_message

try:  # typer >= 0.20 vendors click; its exceptions are not the `click` package's
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover - older typer
    from click import exceptions as click_errors


class OneLineErrors(TyperGroup):
    """Usage errors (bad flag, value out of range, unknown choice) as one line and exit code 2, like our own."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        plain_switches(self)
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except click_errors.NoArgsIsHelpError as exc:
            exc.show()
            sys.exit(0)
        except click_errors.UsageError as exc:
            where = exc.ctx.command_path if exc.ctx is not None else "transfer"
            typer.echo(f"error: {exc.format_message()} (see '{where} --help')", err=True)
            sys.exit(2)
        except click_errors.ClickException as exc:
            typer.echo(f"error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        sys.exit(code if isinstance(code, int) else 0)


def plain_switches(group) -> None:
    """Help shows switches (`--tta`, `-q`, `-h`) as bare flags, not `<bool>`: they take no value."""
    context = typer.Context(group, info_name="transfer", **group.context_settings)
    for command in [group, *group.commands.values()]:
        for param in [*command.params, command.get_help_option(context)]:
            if param is not None and getattr(param, "is_flag", False):
                param.metavar = ""


app = typer.Typer(
    name="transfer",
    cls=OneLineErrors,
    help="Transfer learning on image folders with timm backbones, Keras layer names and self-describing ONNX.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def show_version(value: bool) -> None:
    if value:
        from transfer import __version__

        typer.echo(f"transfer {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[bool, typer.Option("--version", callback=show_version, is_eager=True,
                                          help="print the version and exit")] = False,
) -> None:
    """Transfer learning on image folders with timm backbones, Keras layer names and self-describing ONNX."""
# Wide tables when output is piped or captured, so module paths and shapes stay on one line.
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)


def progress_for(quiet: bool):
    """Bars on a terminal, plain periodic lines on stderr when piped or logged, nothing with --quiet."""
    from transfer.core.progress import Progress

    return Progress.for_stream(sys.stderr, quiet=quiet, console=err_console)


def say(text: str, err: bool = False) -> None:
    """Print user data (paths, reasons) verbatim: no rich markup, no highlighting, no wrapping; names that are
    not valid UTF-8 print as \\xNN escapes instead of crashing."""
    (err_console if err else console).print(display(text), markup=False, highlight=False, soft_wrap=True)


SKIPPED_SHOWN = 20  # more skipped files than this: a summary by reason and the first rows of each kind


def tool_command(name: str) -> str:
    """How to start a tool installed with transfer: its script beside this Python (the venv `make` builds, whose bin
    folder need not be on PATH), else its bare name."""
    script = Path(sys.executable).parent / name
    return display(script) if script.is_file() else name


def say_skipped(items, noun: str = "file(s)", json_hint: bool = True) -> None:
    """Every skipped file with its reason, or past SKIPPED_SHOWN a count per kind of reason and the first three of
    each (a million-row labels file must not print a million lines); the whole list is in the --json record."""
    rows = [(item["path"], item["reason"]) if isinstance(item, dict) else (item.path, item.reason) for item in items]
    if len(rows) <= SKIPPED_SHOWN:
        for where, reason in rows:
            say(f"skipped {where}: {reason}")
        return
    kinds: dict[str, list[tuple[str, str]]] = {}
    for where, reason in rows:
        kinds.setdefault(re.sub(r"\d+", "N", reason.split(":")[0]), []).append((where, reason))
    for kind, members in sorted(kinds.items(), key=lambda pair: -len(pair[1])):
        say(f"{len(members)} skipped: {kind}")
        for where, reason in members[:3]:
            say(f"  {where}: {reason}")
    if json_hint:
        say(f"{len(rows)} {noun} skipped in all; --json FILE lists every one with its reason")


def cli_errors(command):
    """Turn the library's errors into a one-line message and an exit code, without a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except TransferError as exc:
            say(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        except (VerificationError, NonFiniteLossError, PeerLostError) as exc:
            say(f"error: {exc}", err=True)
            raise typer.Exit(1) from None
        except OSError as exc:  # an ordinary OS condition at a user's path: read-only, full disk, a loop
            say(f"error: {os_error_message(exc)}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print("interrupted", highlight=False)
            raise typer.Exit(130) from None

    return wrapper


# --- the shared vocabulary (README: "Flags shared by all commands") -------------------------------------------------
class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Pool(str, Enum):
    none = "none"
    avg = "avg"
    max = "max"


class Split(str, Enum):
    all = "all"
    val = "val"


class Layout(str, Enum):
    nchw = "nchw"
    nhwc = "nhwc"


class Head(str, Enum):
    mlp = "mlp"
    linear = "linear"


class Schedule(str, Enum):
    cosine = "cosine"
    one_cycle = "one-cycle"


class ClassWeights(str, Enum):
    none = "none"
    balanced = "balanced"


class Sampler(str, Enum):
    shuffle = "shuffle"
    balanced = "balanced"


class TrackerName(str, Enum):
    tensorboard = "tensorboard"
    mlflow = "mlflow"


class Int8Method(str, Enum):
    nncf = "nncf"
    onnxruntime = "onnxruntime"


class CamClasses(str, Enum):
    top = "top"
    all = "all"


class CamMethod(str, Enum):
    gradcam = "gradcam"
    gradcam_pp = "gradcam++"
    hirescam = "hirescam"
    xgradcam = "xgradcam"
    layercam = "layercam"
    eigencam = "eigencam"
    scorecam = "scorecam"


class HeadOptimizer(str, Enum):
    adamw = "adamw"
    rmsprop = "rmsprop"
    sgd = "sgd"


BACKBONE_HELP = "a curated backbone or any timm name or tag (`transfer backbones [--all]`)"
BackboneOpt = Annotated[str, typer.Option("--backbone", "-b", help=BACKBONE_HELP)]
RunOpt = Annotated[Path | None, typer.Option("--run", help="a run directory written by `transfer finetune`")]
OnnxOpt = Annotated[Path | None, typer.Option("--onnx", help="a .onnx file written by `transfer export`")]
JsonOpt = Annotated[Path | None, typer.Option("--json", help="also write the machine-readable record to FILE")]
DeviceOpt = Annotated[Device, typer.Option(help="cuda never falls back to cpu silently")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="no progress output")]
DistTimeoutOpt = Annotated[float, typer.Option(min=1, max=86_400, help="under torchrun: seconds a process waits for "
                                                "the others before the job ends with a message")]
WorkersOpt = Annotated[int | None, typer.Option(min=0, help="decoding processes (default min(4, cores))")]
DecodeFloorOpt = Annotated[float | None, typer.Option(
    min=1.0, max=8.0, help="JPEGs decode at a reduced scale to no less than this many times the resize length: 1 is "
    "fastest, 3 (default) agrees with a full decode on 0.99 of photos, 8 is in effect a full decode (README)")]
WeightsOpt = Annotated[Path | None, typer.Option(help="backbone weights (.safetensors or a state dict)")]
PretrainedOpt = Annotated[bool | None, typer.Option("--pretrained/--no-pretrained",
                                                    help="default: pretrained where weights exist")]


LabelsOpt = Annotated[Path | None, typer.Option(
    "--labels", help="a CSV or TSV of image paths (relative to DATA) and labels, instead of class folders",
    rich_help_panel="Labels in a file")]
PathColumnOpt = Annotated[str | None, typer.Option(
    help="the labels file's path column (default: image, path, file, filename, ... or the first column)",
    rich_help_panel="Labels in a file")]
LabelColumnOpt = Annotated[str | None, typer.Option(
    help="its label column (default: label, labels, tags, class, ... or the second column)",
    rich_help_panel="Labels in a file")]
SplitColumnOpt = Annotated[str | None, typer.Option(
    help="its split column: train/val/test, or true/false as fastai's is_valid (default: split or is_valid if "
         "present)", rich_help_panel="Labels in a file")]
LabelSepOpt = Annotated[str | None, typer.Option(
    help="several labels per cell, separated by this (default: detected when a cell holds ';' or '|')",
    rich_help_panel="Labels in a file")]
MultiLabelOpt = Annotated[bool | None, typer.Option(
    "--multi-label/--single-label", help="several labels per image (a sigmoid per label) or one (default: "
                                         "multi-label when a separator is given or detected)",
    rich_help_panel="Labels in a file")]


def labels_file(labels: Path | None, path_column: str | None = None, label_column: str | None = None,
                split_column: str | None = None, label_sep: str | None = None, multi_label: bool | None = None):
    """The labels-file options as one `LabelsFile` (None without --labels, where the other options mean nothing)."""
    from transfer.data.labels import LabelsFile

    if labels is None:
        given = [flag for flag, value in (("--path-column", path_column), ("--label-column", label_column),
                                          ("--split-column", split_column), ("--label-sep", label_sep),
                                          ("--multi-label/--single-label", multi_label)) if value is not None]
        if given:
            raise OptionError(f"{given[0]} reads a labels file: add --labels FILE.csv")
        return None
    return LabelsFile(str(labels.resolve()), path_column, label_column, split_column, label_sep, multi_label)


def examples(*lines: str) -> str:
    """The epilog every command's --help ends with: copy-pasteable examples."""
    return "Examples:\n\n" + "\n\n".join(f"  $ {line}" for line in lines)


def check_json_path(path: Path | None) -> None:
    if path is not None:
        from transfer.core.io import check_writable

        check_writable(path, "--json")


def write_record(path: Path | None, record) -> None:
    """The --json record, written atomically under the file's lock, and said (every command says what it wrote)."""
    if path is not None:
        from transfer.core.io import output_lock, write_json

        with output_lock(path, "--json"):
            write_json(path, record)
        say(f"wrote {path}")


def model_flag_hint(items: list[str], flag: str = "--onnx") -> str:
    """When the model was given as a positional argument, say which flag takes it."""
    first = items[0] if items else ""
    if first.endswith(".onnx") or (Path(first) / "config.json").is_file():
        flag = "--onnx" if first.endswith(".onnx") else "--run"
        return f"name the model with {flag} {first} (positional arguments are images)"
    return f"name the model with {flag} MODEL"


@app.command(epilog=examples("transfer backbones", "transfer backbones --all 'convnext*'",
                             "transfer backbones --json backbones.json"))
@cli_errors
def backbones(
    pattern: Annotated[str | None, typer.Argument(help="with --all: timm names matching this (fnmatch, e.g. "
                                                       "'convnext*')")] = None,
    all_models: Annotated[bool, typer.Option("--all", help="list every timm architecture, with its pretrained "
                                                           "tags (any of them is a --backbone)")] = False,
    json_out: JsonOpt = None,
) -> None:
    """The curated backbones (Keras names, the seeds' recipes): timm model, input size, parameters, default feature
    layer, weights; with --all, every timm architecture, which -b also takes."""
    from transfer.apps.catalog import backbone_table, timm_table

    check_json_path(json_out)
    if pattern is not None and not all_models:
        raise OptionError(f"{pattern!r}: a name pattern lists timm's architectures; add --all")
    if all_models:
        rows = timm_table(pattern)
        table = Table()
        for column in ("timm architecture", "pretrained tags"):
            table.add_column(column, overflow="fold")
        for row in rows:
            tags = row["pretrained_tags"]
            table.add_row(row["name"], ", ".join(tags[:4]) + (f" (+{len(tags) - 4})" if len(tags) > 4 else "")
                          if tags else "none (random init only)")
        console.print(table)
        say(f"{len(rows)} architecture(s); `-b NAME` or `-b NAME.TAG` takes any of them")
        write_record(json_out, rows)
        return
    rows = backbone_table()
    table = Table()
    for column in ("name", "timm model", "input", "params", "feature layer", "weights from", "available now"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["name"], row["timm_model"], str(row["input_size"]), f"{row['params'] / 1e6:.1f}M",
                      row["feature_layer"], row["weights_source"],
                      ("yes (no weights needed)" if row["weights_source"].startswith("none") else "yes")
                      if row["available"] else "no (--weights FILE, or online)")
    console.print(table)
    write_record(json_out, rows)


@app.command(epilog=examples("transfer layers -b vgg16",
                             "transfer layers -b inception_v3 --layer mixed7 --layer mixed10",
                             "transfer layers -b resnet50 --input-size 160 --json layers.json"))
@cli_errors
def layers(
    backbone: BackboneOpt,
    input_size: Annotated[int | None, typer.Option(help="input side in pixels (default: the backbone's)")] = None,
    layer: Annotated[list[str] | None, typer.Option(help="show only these layers (Keras alias or module path)")] = None,
    json_out: JsonOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Every addressable layer in forward order: Keras alias, module path, output shape, params, unfreeze group."""
    from models.registry import get_backbone
    from transfer.apps.catalog import layer_summary

    check_json_path(json_out)
    with progress_for(quiet).task(f"building {backbone} and running one image through it"):
        rows, size = layer_summary(backbone, input_size, layer)
    say(f"{backbone} at {size}x{size} (shapes from a forward pass, batch of 1)")
    spec = get_backbone(backbone)
    if not spec.curated:
        say(f"no Keras names: layers are timm's module paths; its feature layers (feature_info) come first: "
            f"{', '.join(spec.feature_layers) or 'none'} (extract's default: {spec.feature_layer or 'none'})")
    table = Table()
    for column in ("keras name", "module", "type", "output shape", "params", "unfreeze group"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(row.alias, row.path, row.kind, row.shape_text, f"{row.params:,}", row.group)
    console.print(table)
    write_record(json_out, [{"alias": r.alias, "module": r.path, "type": r.kind, "shape": list(r.shape or ()),
                             "params": r.params, "unfreeze_group": r.group} for r in rows])


@app.command(epilog=examples("transfer scan ./mydata", "transfer scan ./mydata --strict --json scan.json",
                             "transfer scan ./images --labels labels.csv"))
@cli_errors
def scan(
    data_dir: Annotated[Path, typer.Argument(help="folder of class sub-folders, train/val/test splits, or images")],
    strict: Annotated[bool, typer.Option(help="treat any unusable file as an error")] = False,
    labels: LabelsOpt = None,
    path_column: PathColumnOpt = None,
    label_column: LabelColumnOpt = None,
    split_column: SplitColumnOpt = None,
    label_sep: LabelSepOpt = None,
    multi_label: MultiLabelOpt = None,
    json_out: JsonOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Check a data folder (or a labels file) before a long run: classes, counts per split, every skipped file and
    why."""
    from transfer.data.labels import scan_data

    check_json_path(json_out)
    source = labels_file(labels, path_column, label_column, split_column, label_sep, multi_label)
    report = scan_data(data_dir, source, strict=strict, progress=progress_for(quiet))
    counts = report.counts()
    task = "; several labels per image" if report.task == "multilabel" else ""
    say(f"{data_dir}: {report.layout} layout{f' from {labels}' if labels else ''}, {len(report.samples)} usable "
        f"images{task}")
    table = Table()
    table.add_column("class")
    for split in counts:
        table.add_column(split, justify="right")
    for name in report.classes or ["(unlabelled)"]:
        table.add_row(display(name), *(str(counts[split].get(name, 0)) for split in counts))
    console.print(table)
    say_skipped(report.skipped, "row(s)" if labels else "file(s)", json_hint=False)
    for note in report.notes:
        say(f"note: {note}")
    say(f"{len(report.skipped)} {'row(s)' if labels else 'file(s)'} skipped"
        + (" (--json FILE lists every one with its reason)" if len(report.skipped) > SKIPPED_SHOWN else ""))
    write_record(json_out, report.to_dict())
    if report.empty_classes:
        from transfer.core.errors import DataError

        raise DataError(f"empty class(es) with no usable image: {', '.join(report.empty_classes)}")


def _raise_interrupt(_signum, _frame) -> None:
    raise KeyboardInterrupt


@app.command(epilog=examples(
    "transfer finetune ./mydata -b efficientnet_lite0 -o runs/flowers",
    "transfer finetune ./mydata -b inception_v3 --head-optimizer rmsprop --unfreeze 2 --lr-finetune 1e-4",
    "transfer finetune ./mydata --resume runs/flowers --epochs-finetune 6",
    "torchrun --nproc-per-node 8 $(which transfer) finetune ./mydata -b resnet50 -o runs/big --batch-size 256"))
@cli_errors
def finetune(
    ctx: typer.Context,
    data_dir: Annotated[Path | None, typer.Argument(help="one sub-folder per class, or train/ and val/ splits "
                                                         "(with --resume: the run's own folder by default)")] = None,
    backbone: BackboneOpt = "efficientnet_lite0",
    output: Annotated[Path | None, typer.Option("--output", "-o",
                                                help="the run directory (default runs/BACKBONE-TIME)")] = None,
    epochs: Annotated[int | None, typer.Option(min=1, help="the whole schedule's epochs, split by the staged rule: "
                                               "half (at least 1) with the backbone frozen, the rest fine-tuning "
                                               "(6 = 3 + 3); one stage for nets trained from scratch")
                      ] = None,
    epochs_head: Annotated[int | None, typer.Option(
        min=0, help="stage 1: epochs with the backbone frozen, on cached features [default: 25, ended early by "
                    "--patience; from scratch: 3]")] = None,
    epochs_finetune: Annotated[int | None, typer.Option(
        min=0, help="stage 2: epochs with the top groups unfrozen [default: 3]")] = None,
    unfreeze: Annotated[str, typer.Option(help="stage 2 trains the top K unfreeze groups (0..K), or all")] = "2",
    batch_size: Annotated[str, typer.Option(help="the global batch (under torchrun each process takes its share, "
                                                 "and the learning rate is not rescaled), or auto: the largest that "
                                                 "fits the GPU, 32 on CPU")] = "32",
    lr_head: Annotated[str, typer.Option(help="stage 1 learning rate, or auto (the range test picks it)")] = "1e-3",
    lr_finetune: Annotated[str, typer.Option(help="stage 2 learning rate (SGD, momentum 0.9), or auto")] = "1e-3",
    head_optimizer: Annotated[HeadOptimizer, typer.Option(
        help="stage 1 optimizer (the only stage's for nets trained from scratch)")] = HeadOptimizer.adamw,
    head: Annotated[Head, typer.Option(help="mlp: pool, dropout, Dense 1024 ReLU, Dense; linear: one Dense")
                    ] = Head.mlp,
    val_split: Annotated[float, typer.Option(min=0.0, max=0.9)] = 0.2,
    augment: Annotated[bool | None, typer.Option(
        "--augment/--no-augment", help="rotation, shifts, zoom, flips, colour jitter, from stage 2 on (stage 1 too "
                                       "with --no-cache-features) [default: off; on for nets trained from scratch]")
                       ] = None,
    cache_features: Annotated[bool | None, typer.Option(
        "--cache-features/--no-cache-features",
        help="stage 1 on cached backbone features, augmentation (if any) from stage 2 on (default: yes, unless "
             "--mixup/--cutmix)")] = None,
    weights: WeightsOpt = None,
    pretrained: PretrainedOpt = None,
    input_size: Annotated[int | None, typer.Option(help="train at this size instead of the backbone's")] = None,
    crop_pct: Annotated[float | None, typer.Option(help="centre-crop fraction, 0.1..1 (1.0 keeps the whole image)")
                        ] = None,
    decode_floor: DecodeFloorOpt = None,
    device: DeviceOpt = Device.auto,
    seed: Annotated[int, typer.Option(min=0)] = 0,
    patience: Annotated[int, typer.Option(min=1, help="stop a stage after this many epochs without val-loss gain")
                        ] = 5,
    workers: WorkersOpt = None,
    strict: Annotated[bool, typer.Option(help="stop on any unusable image instead of skipping it")] = False,
    bn_stats: Annotated[bool, typer.Option(help="stage 2: unfrozen BatchNorm layers update running stats")] = False,
    label_smoothing: Annotated[float, typer.Option(min=0.0, max=0.5, help="spread this share of each target "
                                                                          "over all classes")] = 0.0,
    mixup: Annotated[float, typer.Option(min=0.0, help="mixup alpha (timm's; 0.2-0.4 typical, 0 off)")] = 0.0,
    cutmix: Annotated[float, typer.Option(min=0.0, help="cutmix alpha (timm's; 1.0 typical, 0 off)")] = 0.0,
    lr_decay: Annotated[float, typer.Option(min=0.0, max=1.0, help="stage 2: the k-th unfrozen group from the "
                                                                   "top trains at lr-finetune x lr-decay^k")] = 1.0,
    ema: Annotated[float, typer.Option(min=0.0, max=0.99999, help="keep an exponential moving average of the "
                                       "weights with this decay (0.99-0.9999; 0 off); the better of the two is kept")
                   ] = 0.0,
    schedule: Annotated[Schedule, typer.Option(help="cosine: stage 2 anneals per epoch (stage 1 constant); "
                                                    "one-cycle: fastai's warm-up and anneal per batch, every stage")
                        ] = Schedule.cosine,
    resume: Annotated[Path | None, typer.Option(
        help="continue RUN_DIR from its last.ckpt; raise --epochs-head/--epochs-finetune to train more")] = None,
    labels: LabelsOpt = None,
    path_column: PathColumnOpt = None,
    label_column: LabelColumnOpt = None,
    split_column: SplitColumnOpt = None,
    label_sep: LabelSepOpt = None,
    multi_label: MultiLabelOpt = None,
    class_weights: Annotated[ClassWeights, typer.Option(
        help="balanced: weight the training loss by inverse class frequency (scikit-learn's rule)")
                             ] = ClassWeights.none,
    sampler: Annotated[Sampler, typer.Option(
        help="balanced: draw training images in inverse proportion to their class's size")] = Sampler.shuffle,
    log: Annotated[list[TrackerName] | None, typer.Option(
        "--log", help="experiment logs while it trains: tensorboard (event files in RUN/tensorboard) or mlflow "
                      "(MLFLOW_TRACKING_URI, else MLflow's default ./mlflow.db); repeat for both")] = None,
    recipe: Annotated[Path | None, typer.Option(
        help="a recipe.json written by `transfer tune`: its rates, epochs, unfreeze depth and regularisers (flags "
             "given here win)")] = None,
    dist_timeout: DistTimeoutOpt = 600.0,
    json_out: JsonOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Fine-tune a pretrained backbone with a new head: stage 1 head only, stage 2 top groups unfrozen."""
    from transfer.core.errors import OptionError
    from transfer.training.config import FinetuneConfig, split_epochs
    from transfer.training.finetune import finetune as run_finetune

    check_json_path(json_out)
    if epochs is not None:
        given = [flag for flag, name in (("--epochs-head", "epochs_head"), ("--epochs-finetune", "epochs_finetune"))
                 if ctx.get_parameter_source(name).name == "COMMANDLINE"]
        if given:
            raise OptionError(f"--epochs {epochs} and {given[0]} exclude each other: --epochs is the whole schedule")
        epochs_head, epochs_finetune = split_epochs(epochs)
    settings = dict(
        backbone=backbone, epochs_head=epochs_head, epochs_finetune=epochs_finetune, unfreeze=unfreeze,
        batch_size=parse_batch_size(batch_size), lr_head=parse_lr(lr_head, "--lr-head"),
        lr_finetune=parse_lr(lr_finetune, "--lr-finetune"), head_optimizer=head_optimizer.value,
        head=head.value, val_split=val_split, augment=augment, cache_features=cache_features, pretrained=pretrained,
        weights=str(weights) if weights else None, input_size=input_size, crop_pct=crop_pct,
        decode_floor=decode_floor, seed=seed, patience=patience, workers=workers, strict=strict, bn_stats=bn_stats,
        label_smoothing=label_smoothing, mixup=mixup, cutmix=cutmix, lr_decay=lr_decay, ema=ema,
        schedule=schedule.value,
        labels=source.to_dict() if (source := labels_file(labels, path_column, label_column, split_column, label_sep,
                                                          multi_label)) else None,
        class_weights=class_weights.value, sampler=sampler.value, log=[tracker.value for tracker in log or []])
    if recipe is not None:
        from transfer.training.recipes import read_recipe

        given = {name for name in settings if ctx.get_parameter_source(name).name == "COMMANDLINE"}
        if epochs is not None:
            given |= {"epochs_head", "epochs_finetune"}
        settings |= {name: value for name, value in read_recipe(recipe).items() if name not in given}
    changes = None
    if resume is not None:
        if output is not None:
            raise OptionError("--output: a resumed run continues in its own folder; give only --resume RUN_DIR")
        given = {name for name in settings if ctx.get_parameter_source(name).name == "COMMANDLINE"}
        if epochs is not None:
            given |= {"epochs_head", "epochs_finetune"}
        changes = {name: settings[name] for name in given}
    config = None if resume else FinetuneConfig(**settings)
    progress = progress_for(quiet)
    signal.signal(signal.SIGTERM, _raise_interrupt)  # `kill` is handled like Ctrl-C: nothing half-written stays
    result = run_finetune(data_dir, config, output=output, resume=resume, device=device.value, log=progress.log,
                          changes=changes, progress=progress, dist_timeout=dist_timeout)
    from transfer.core.world import World

    if not World.from_env().main:  # under torchrun rank 0 reports for all
        return
    report = result.report
    if report.get("task") == "multilabel":
        say(f"validation macro F1 {report['macro_f1']:.4f}, exact match {result.best_val_acc:.4f} "
            f"({result.epochs_run} epochs) -> {result.run_dir}")
    else:
        say(f"validation accuracy {result.best_val_acc:.4f} ({result.epochs_run} epochs) -> {result.run_dir}")
    per_class = {name: row for name, row in report.get("per_class", {}).items() if row["support"]}
    if per_class:
        worst = min(per_class, key=lambda name: per_class[name]["recall"])
        say(f"lowest recall: {display(worst)} {per_class[worst]['recall']:.3f} of {per_class[worst]['support']} "
            f"validation images (every class in report.json)")
    import json

    tracked = json.loads((result.run_dir / "config.json").read_text())["settings"].get("log", [])
    if "tensorboard" in tracked:
        say(f"TensorBoard: {tool_command('tensorboard')} --logdir {display(result.run_dir / 'tensorboard')}")
    if "mlflow" in tracked:
        try:  # the store the run wrote to (tracking.json), so the command shows that run wherever it is typed
            store = json.loads((result.run_dir / "tracking.json").read_text())["mlflow"]["tracking_uri"]
        except (OSError, ValueError, KeyError, TypeError):
            store = None
        say(f"MLflow: {tool_command('mlflow')} ui" + (f" --backend-store-uri {store}" if store else ""))
    write_record(json_out, {"run_dir": str(result.run_dir), "best_val_loss": result.best_val_loss,
                            "best_val_accuracy": result.best_val_acc, "epochs": result.epochs_run,
                            "stopped": result.stopped})


@app.command(epilog=examples("transfer tune ./mydata -b efficientnet_lite0 --trials 20 --budget 10 -o tuned",
                             "transfer finetune ./mydata -b efficientnet_lite0 --recipe tuned/recipe.json"))
@cli_errors
def tune(
    data_dir: Annotated[Path, typer.Argument(help="one sub-folder per class, or train/ and val/ splits")],
    backbone: BackboneOpt = "efficientnet_lite0",
    output: Annotated[Path, typer.Option("--output", "-o", help="the study's folder: study.db, a run per trial, "
                                         "recipe.json, trials.csv and trials.png")] = Path("tune"),
    trials: Annotated[int, typer.Option(min=1, help="trials in all (a continued study counts its earlier ones)")
                      ] = 20,
    budget: Annotated[float | None, typer.Option(min=0.1, help="minutes for this call; trials running at the "
                                                 "limit finish")] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
    head: Annotated[Head, typer.Option(help="the head every trial trains")] = Head.mlp,
    val_split: Annotated[float, typer.Option(min=0.01, max=0.9)] = 0.2,
    weights: WeightsOpt = None,
    pretrained: PretrainedOpt = None,
    input_size: Annotated[int | None, typer.Option(help="train at this size instead of the backbone's")] = None,
    crop_pct: Annotated[float | None, typer.Option(help="centre-crop fraction, 0.1..1")] = None,
    device: DeviceOpt = Device.auto,
    seed: Annotated[int, typer.Option(min=0, help="the split and every trial's randomness")] = 0,
    workers: WorkersOpt = None,
    labels: LabelsOpt = None,
    path_column: PathColumnOpt = None,
    label_column: LabelColumnOpt = None,
    split_column: SplitColumnOpt = None,
    label_sep: LabelSepOpt = None,
    multi_label: MultiLabelOpt = None,
    json_out: JsonOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Search the recipe (rates, epochs, unfreeze depth, augmentation, regularisers) within a budget, with Optuna."""
    from transfer.training.config import FinetuneConfig
    from transfer.training.tune import tune as run_tune

    check_json_path(json_out)
    source = labels_file(labels, path_column, label_column, split_column, label_sep, multi_label)
    base = FinetuneConfig(backbone=backbone, batch_size=batch_size, head=head.value, val_split=val_split,
                          pretrained=pretrained, weights=str(weights) if weights else None, input_size=input_size,
                          crop_pct=crop_pct, seed=seed, workers=workers,
                          labels=source.to_dict() if source else None)
    progress = progress_for(quiet)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    result = run_tune(data_dir, base, output, trials=trials, budget_minutes=budget, device=device.value,
                      log=progress.log, progress=progress)
    states = {}
    for row in result.trials:
        states[row["state"]] = states.get(row["state"], 0) + 1
    say(f"{len(result.trials)} trial(s): " + ", ".join(f"{count} {state}" for state, count in sorted(states.items()))
        + (f" ({result.continued} from earlier calls)" if result.continued else ""))
    best = result.best
    say(f"best: trial {best['trial']}, val loss {best['val_loss']:.4f}, accuracy {best['val_accuracy']:.4f} "
        f"({display(best['run_dir'])})")
    say(f"wrote {display(result.recipe_path)}: transfer finetune {display(data_dir)} -b {backbone} --recipe "
        f"{display(result.recipe_path)}")
    write_record(json_out, {"study": str(result.study_path), "recipe": str(result.recipe_path), "best": best,
                            "trials": result.trials, "continued": result.continued})


@app.command(epilog=examples("transfer runs", "transfer runs experiments/ --json runs.json"))
@cli_errors
def runs(
    folder: Annotated[Path, typer.Argument(help="where the run directories are (searched 4 levels deep)")] = Path(
        "runs"),
    json_out: JsonOpt = None,
) -> None:
    """The runs under a folder: backbone, data, epochs, best validation loss and accuracy, created (a resume keeps
    it), status (running, finished, interrupted, damaged, with the problem named) and whether --resume can continue
    it. Reads the run directories only."""
    from transfer.apps.run_list import list_runs

    check_json_path(json_out)
    rows = list_runs(folder)
    table = Table()
    for column in ("run", "backbone", "data", "epochs", "best val loss", "best val acc", "created", "status",
                   "resumable"):
        table.add_column(column, overflow="fold")
    for row in rows:
        planned = "?" if row["planned_epochs"] is None else row["planned_epochs"]
        table.add_row(row["run"], row["backbone"] or "?", display(row["data"] or "?"), f"{row['epochs']}/{planned}",
                      "-" if row["best_val_loss"] is None else f"{row['best_val_loss']:.4f}",
                      "-" if row["best_val_accuracy"] is None else f"{row['best_val_accuracy']:.4f}",
                      row["created"] or "?", row["status"], "yes" if row["resumable"] else "no")
    if rows:
        console.print(table)
    say(f"{len(rows)} run(s) under {display(folder)}" if rows else
        f"no run directories under {display(folder)} (a run directory holds config.json)")
    write_record(json_out, rows)


def parse_batch_size(text: str) -> int | str:
    """A positive batch size, or "auto"."""
    if text.strip().lower() == "auto":
        return "auto"
    if not text.strip().isdigit() or int(text) < 1:
        from transfer.core.errors import OptionError

        raise OptionError(f"--batch-size {text!r}: give a positive integer such as 32, or auto")
    return int(text)


def parse_lr(text: str, flag: str) -> float | str:
    """A learning rate, or "auto"."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        from transfer.core.errors import OptionError

        raise OptionError(f"{flag} {text!r}: give a number such as 1e-3, or auto") from None


@app.command("lr-find", epilog=examples("transfer lr-find ./mydata -b efficientnet_lite0",
                                        "transfer lr-find ./mydata -b resnet50 --stage finetune --epochs-head 2 "
                                        "-o lr.png --json lr.json"))
@cli_errors
def lr_find_command(
    data_dir: Annotated[Path, typer.Argument(help="one sub-folder per class, or train/ and val/ splits")],
    backbone: BackboneOpt = "efficientnet_lite0",
    stage: Annotated[list[str] | None, typer.Option(help="head, finetune (default both), or scratch")] = None,
    epochs_head: Annotated[int, typer.Option(min=0, help="for the finetune test: head epochs to train first")] = 1,
    lr_head: Annotated[str, typer.Option(help="the head's rate for those epochs, or auto")] = "1e-3",
    unfreeze: Annotated[str, typer.Option(help="stage 2: top K unfreeze groups (0..K), or all")] = "2",
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
    input_size: Annotated[int | None, typer.Option(help="train at this size instead of the backbone's")] = None,
    crop_pct: Annotated[float | None, typer.Option(help="centre-crop fraction, 0.1..1 (as finetune)")] = None,
    weights: WeightsOpt = None,
    pretrained: PretrainedOpt = None,
    seed: Annotated[int, typer.Option(min=0, help="the test draws random batches; each stage starts from this seed")
                    ] = 0,
    output: Annotated[Path, typer.Option("--output", "-o", help="the plot (PNG)")] = Path("lr_find.png"),
    labels: LabelsOpt = None,
    path_column: PathColumnOpt = None,
    label_column: LabelColumnOpt = None,
    split_column: SplitColumnOpt = None,
    label_sep: LabelSepOpt = None,
    multi_label: MultiLabelOpt = None,
    device: DeviceOpt = Device.auto,
    workers: WorkersOpt = None,
    quiet: QuietOpt = False,
    json_out: JsonOpt = None,
) -> None:
    """The learning-rate range test: loss against an exponentially rising rate, and a suggested rate per stage."""
    from transfer.core.io import check_writable
    from transfer.training.config import FinetuneConfig
    from transfer.training.lr_find import lr_find

    check_writable(output, "--output")
    check_json_path(json_out)
    source = labels_file(labels, path_column, label_column, split_column, label_sep, multi_label)
    config = FinetuneConfig(backbone=backbone, epochs_head=epochs_head, epochs_finetune=1, unfreeze=unfreeze,
                            batch_size=batch_size, lr_head=parse_lr(lr_head, "--lr-head"), input_size=input_size,
                            crop_pct=crop_pct, weights=str(weights) if weights else None, pretrained=pretrained,
                            augment=False, workers=workers, seed=seed,
                            labels=source.to_dict() if source else None)
    progress = progress_for(quiet)
    results = lr_find(data_dir, config, tuple(stage) if stage else None, output=output, device=device.value,
                      log=progress.log, progress=progress)
    for result in results:
        after = (f", after training the head {epochs_head} epoch(s) at {lr_head}" if result.stage == "finetune"
                 and epochs_head else "")
        say(f"stage {result.stage}: suggested learning rate {result.suggestion:.2e} ({result.rule}; "
            f"{result.stopped}; {len(result.lrs)} steps from {result.lrs[0]:.1e}{after}; seed {seed})")
    say(f"wrote {output}")
    write_record(json_out, [result.to_dict() for result in results])


def one_model(run: Path | None, onnx: Path | None) -> Path | None:
    """At most one of --run / --onnx."""
    if run is not None and onnx is not None:
        from transfer.core.errors import OptionError

        raise OptionError("--run and --onnx exclude each other; give one model")
    return run if run is not None else onnx


def model_path(run: Path | None, onnx: Path | None, positional: list[str], need: str = "a model") -> Path:
    """Exactly one of --run / --onnx."""
    model = one_model(run, onnx)
    if model is None:
        from transfer.core.errors import OptionError

        raise OptionError(f"{need}: {model_flag_hint(positional, '--run RUN_DIR or --onnx')}")
    return model


@app.command(epilog=examples("transfer evaluate ./mydata_test --run runs/flowers",
                             "transfer evaluate ./mydata_test --onnx model.onnx --json report.json",
                             "transfer evaluate ./mydata_test --run runs/flowers --tta-crops"))
@cli_errors
def evaluate(
    data_dir: Annotated[Path, typer.Argument(help="labelled folder (class sub-folders; its test/ split if present)")],
    run: RunOpt = None,
    onnx: OnnxOpt = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
    tta: Annotated[bool, typer.Option("--tta", help="also report the accuracy with test-time augmentation "
                                                    "(each image averaged with its mirror image)")] = False,
    tta_crops: Annotated[bool, typer.Option("--tta-crops", help="test-time augmentation over ten views: the "
                                            "image, its four corners (87.5% of each side) and their mirrors")
                         ] = False,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="plot the most confidently wrong images "
                                                                       "to this .png")] = None,
    split: Annotated[Split, typer.Option(help="all: every labelled image; val: only the run's validation images "
                                               "(never trained on)")] = Split.all,
    labels: LabelsOpt = None,
    path_column: PathColumnOpt = None,
    label_column: LabelColumnOpt = None,
    split_column: SplitColumnOpt = None,
    label_sep: LabelSepOpt = None,
    multi_label: MultiLabelOpt = None,
    decode_floor: DecodeFloorOpt = None,
    device: DeviceOpt = Device.auto,
    workers: WorkersOpt = None,
    json_out: JsonOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Accuracy, per-class precision/recall/F1, the confusion matrix and the worst mistakes of a run or an ONNX
    classifier (several labels per image: F1, mean average precision and exact match at its thresholds)."""
    from transfer.apps.evaluate import evaluate as run_evaluate
    from transfer.core.io import check_writable

    model = model_path(run, onnx, [str(data_dir)], "evaluate needs a model")
    check_json_path(json_out)
    if output is not None:
        if output.suffix.lower() != ".png":
            raise TransferError(f"--output {output}: the plot of the worst mistakes is a .png file")
        check_writable(output, "--output")
    source = labels_file(labels, path_column, label_column, split_column, label_sep, multi_label)
    report = run_evaluate(model, data_dir, batch_size=batch_size, device=device.value, progress=progress_for(quiet),
                          tta=tta, top_losses_plot=output, tta_crops=tta_crops, split=split.value, workers=workers,
                          labels=source, decode_floor=decode_floor)
    which = " of the run's validation split" if split == Split.val else ""
    if report.get("task") == "multilabel":
        say(f"{model} on {data_dir}: macro F1 {report['macro_f1']:.4f}, micro F1 {report['micro_f1']:.4f}, mean "
            f"average precision {report['mean_average_precision']:.4f}, exact match {report['exact_match']:.4f} "
            f"({report['count']} images{which}, several labels each, at the model's thresholds)")
    else:
        say(f"{model} on {data_dir}: accuracy {report['accuracy']:.4f} ({report['count']} images{which})")
    if report["training_images"]:
        say(f"warning: {report['training_images']} of these {report['count']} images trained the run, so this "
            "accuracy is optimistic; --split val evaluates only its validation images", err=True)
    if "tta" in report:
        views = "image + mirror" if len(report["tta"]["views"]) == 2 else "image, 4 corners and their mirrors"
        say(f"with test-time augmentation ({views}): accuracy {report['tta']['accuracy']:.4f}")
    table = Table()
    for column in ("class", "precision", "recall", "f1", "support"):
        table.add_column(column, justify="right")
    for name, row in report["per_class"].items():
        table.add_row(display(name), f"{row['precision']:.3f}", f"{row['recall']:.3f}", f"{row['f1']:.3f}",
                      str(row["support"]))
    console.print(table)
    if report.get("task") == "multilabel":
        say_skipped(report["skipped"])
        write_record(json_out, report)
        return
    say("confusion matrix (rows true, columns predicted):")
    width = max(len(name) for name in report["per_class"])
    for name, counts in zip(report["per_class"], report["confusion_matrix"], strict=True):
        say(f"  {name:>{width}} " + " ".join(f"{c:5d}" for c in counts))
    if report["most_confused"]:
        say("most confused (true -> predicted: count): " + ", ".join(
            f"{pair['true']} -> {pair['predicted']}: {pair['count']}" for pair in report["most_confused"][:5]))
    say_skipped(report["skipped"])
    if output is not None:
        say(f"wrote {output} ({len(report['top_losses'])} most confidently wrong images)")
    write_record(json_out, report)


@app.command(epilog=examples(
    "transfer extract ./photos -b vgg16",
    "transfer extract ./photos cat.jpg 'more/*.png' -b resnet50 --layer conv4_block6_out --layer avg_pool -o f.npz",
    "transfer extract ./photos --run runs/flowers --layer predictions --pool avg -o logits.npy",
    "torchrun --nproc-per-node 4 $(which transfer) extract ./photos -b vgg16 --layer block4_pool -o f.npy"))
@cli_errors
def extract(
    images: Annotated[list[str], typer.Argument(help="a folder (class sub-folders give labels), files or globs")],
    layer: Annotated[list[str] | None, typer.Option(
        help="Keras alias or timm module path; repeat for several (default: the backbone's feature layer)")] = None,
    backbone: BackboneOpt = "efficientnet_lite0",
    run: RunOpt = None,
    onnx: OnnxOpt = None,
    pool: Annotated[Pool, typer.Option(help="none keeps C x H x W; avg or max pool the spatial axes")] = Pool.none,
    layout: Annotated[Layout, typer.Option(help="nchw, or nhwc (Keras' array order)")] = Layout.nchw,
    weights: WeightsOpt = None,
    pretrained: PretrainedOpt = None,
    input_size: Annotated[int | None, typer.Option(help="input side (default: the model's)")] = None,
    decode_floor: DecodeFloorOpt = None,
    output: Annotated[Path | None, typer.Option("--output", "-o",
                                                help=".npy (one layer) or .npz; default features.npy/.npz")] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
    device: DeviceOpt = Device.auto,
    workers: WorkersOpt = None,
    seed: Annotated[int, typer.Option(min=0, help="seeds the random init of a backbone without pretrained weights "
                                                  "(recorded in the sidecar)")] = 0,
    labels: LabelsOpt = None,
    path_column: PathColumnOpt = None,
    label_column: LabelColumnOpt = None,
    split_column: SplitColumnOpt = None,
    label_sep: LabelSepOpt = None,
    multi_label: MultiLabelOpt = None,
    dist_timeout: DistTimeoutOpt = 600.0,
    json_out: JsonOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Features of intermediate layers, streamed to disk with a JSON sidecar (paths, labels, metadata)."""
    from transfer.apps.extract import default_layers, sidecar_path
    from transfer.apps.extract import extract as run_extract
    from transfer.core.world import World

    one_model(run, onnx)
    check_json_path(json_out)
    layers = layer or default_layers(backbone, run, onnx)
    output = output or Path("features.npy" if len(layers) == 1 else "features.npz")
    source = labels_file(labels, path_column, label_column, split_column, label_sep, multi_label)
    result = run_extract(images if len(images) > 1 else images[0], backbone=backbone, layers=layers,
                         pool=pool.value, layout=layout.value, weights=weights, run=run, onnx=onnx,
                         pretrained=pretrained, input_size=input_size, output=output, batch_size=batch_size,
                         device=device.value, workers=workers, progress=progress_for(quiet), seed=seed,
                         dist_timeout=dist_timeout, labels=source, decode_floor=decode_floor)
    if not World.from_env().main:  # under torchrun rank 0 reports for all
        return
    if result.not_continued:
        say(f"started {display(output)} afresh: an interrupted run's features are there, but {result.not_continued}")
    for name, shape in result.metadata["shapes"].items():
        module = result.metadata["layers"][name]
        say(f"{name} ({module}): {tuple(shape)}")
    say_skipped(result.skipped)
    kept = f"; {result.continued} kept from the interrupted run" if result.continued else ""
    say(f"wrote {output} and {sidecar_path(output)} ({len(result.paths)} images{kept})")
    write_record(json_out, {"output": str(output), "sidecar": str(sidecar_path(output)), "images": len(result.paths),
                            "continued": result.continued,
                            "shapes": result.metadata["shapes"], "layers": result.metadata["layers"],
                            "skipped": [{"path": s.path, "reason": s.reason} for s in result.skipped]})


@app.command(epilog=examples("transfer export --run runs/flowers -o flowers.onnx --json record.json",
                             "transfer export -b vgg16 --layer block4_pool -o vgg_block4.onnx",
                             "transfer export --run runs/flowers --int8 --calibration ./mydata -o f.int8.onnx"))
@cli_errors
def export(
    run: RunOpt = None,
    backbone: Annotated[str | None, typer.Option("--backbone", "-b", help=BACKBONE_HELP)] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="the .onnx file to write")] = Path("model.onnx"),
    weights: WeightsOpt = None,
    layer: Annotated[list[str] | None, typer.Option(help="feature extractor: one output per layer")] = None,
    pretrained: PretrainedOpt = None,
    opset: Annotated[int, typer.Option(help="ONNX opset")] = 18,
    fp16: Annotated[bool, typer.Option(help="half-precision weights and compute (for GPU); float32 I/O")] = False,
    int8: Annotated[bool, typer.Option(help="static QDQ int8 (for CPU), calibrated on --calibration")] = False,
    calibration: Annotated[Path | None, typer.Option(help="folder of representative images for --int8")] = None,
    int8_method: Annotated[Int8Method, typer.Option(
        help="who quantizes: NNCF (measured best, benchmarks/RESULTS.md) or onnxruntime's own quantizer")
    ] = Int8Method.nncf,
    max_accuracy_loss: Annotated[float | None, typer.Option(
        help="with --run: refuse the int8 file when its accuracy on the run's held-out validation images is more "
             "than this many points below fp32's (default: refuse below 0.9 top-1 agreement)")] = None,
    embed_preprocessing: Annotated[bool, typer.Option(help="input uint8 NHWC RGB; normalization in the graph")] = False,
    input_size: Annotated[int | None, typer.Option(help="input side (default: the model's)")] = None,
    decode_floor: DecodeFloorOpt = None,
    verify_images: Annotated[Path | None, typer.Option(help="folder of images to verify against PyTorch")] = None,
    cam: Annotated[bool, typer.Option("--cam", help="add the class activation map as a second output `cam` (for a "
                                      "head of global pooling then one linear layer, where it is exact)")] = False,
    cam_classes: Annotated[CamClasses | None, typer.Option(
        help="with --cam: the top class's map, or every class's (default: top; all for several labels per image)")
    ] = None,
    json_out: JsonOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Export a verified, self-describing ONNX file: a run's classifier, an ImageNet classifier or an extractor."""
    from exporters.export import export_onnx

    if run is None and backbone is None:
        from transfer.core.errors import OptionError

        raise OptionError("export needs --run RUN_DIR or --backbone NAME")
    check_json_path(json_out)
    record = export_onnx(output, run=run, backbone=backbone, weights=weights, layers=layer or [],
                         pretrained=pretrained, opset=opset, fp16=fp16, int8=int8, calibration=calibration,
                         embed_preprocessing=embed_preprocessing, input_size=input_size, verify_images=verify_images,
                         progress=progress_for(quiet), int8_method=int8_method.value,
                         max_accuracy_loss=max_accuracy_loss, decode_floor=decode_floor,
                         cam=(cam_classes.value if cam_classes else "auto") if cam or cam_classes else None)
    size_mib = record.size_bytes / 2**20
    say(f"wrote {record.path} ({size_mib:.1f} MiB, {record.precision}, opset {record.opset}, {record.exporter})")
    say(f"input {record.input_name} {record.input_dtype} {record.input_shape}; outputs "
        + ", ".join(f"{n} {record.output_shapes[n]}" for n in record.output_names))
    say(f"onnx.checker: {record.checker}")
    for name in record.output_names:
        within = record.max_rel_diff[name] <= record.tolerance
        verdict = (f"within the tolerance {record.tolerance:g}" if within else
                   f"over {record.tolerance:g}, so int8 is judged by its answers below")
        say(f"max difference vs PyTorch ({name}, batch {record.batch_sizes_checked}, {record.verify_images}): "
            f"relative {record.max_rel_diff[name]:.3g}, {verdict} (absolute {record.max_abs_diff[name]:.3g}, "
            "for reference)")
    if "transfer.cam" in record.metadata:
        say(f"cam: the {record.metadata['transfer.cam']} class activation map(s) at the input size; the logits are "
            "their spatial mean (checked), so the map is exact (`transfer predict --cam DIR` draws it)")
    if record.preprocessing_in_graph is not None:
        check = record.preprocessing_in_graph
        same = f"; same top-1 on {check['same_top1']}" if check["same_top1"] else ""
        say(f"preprocessing in the graph vs the Python path ({check['images']}): abs {check['max_abs_diff']:.3g}, "
            f"relative {check['max_rel_diff']:.3g} (tolerance {check['tolerance']:g}){same}")
    if record.mlflow_run_id is not None:
        say(f"logged the file and this record to MLflow run {record.mlflow_run_id} (artifacts under onnx/)")
    if record.mlflow_error is not None:
        say(f"warning: the file is written, but logging it to the run's MLflow run failed ({record.mlflow_error})",
            err=True)
    if record.int8 is not None:
        report = record.int8
        say(f"int8 made by {report.method}")
        if report.top1_agreement is not None:
            confident = ("" if report.confident_agreement is None else f" ({report.confident_agreement:.4f} on the "
                         f"{report.confident_images} fp32 is confident about)")
            say(f"int8 vs fp32 on {report.agreement_images}: top-1 agreement {report.top1_agreement:.4f}{confident}, "
                f"logit cosine {report.logit_cosine:.4f}")
        if report.accuracy_loss is not None:
            say(f"accuracy on {report.accuracy_images} held-out validation images: fp32 "
                f"{100 * report.fp32_accuracy:.2f}%, int8 {100 * report.int8_accuracy:.2f}% "
                f"(loss {report.accuracy_loss:.2f} points)")
        say(f"int8: {report.speedup:.2f}x the fp32 file's speed on this CPU, "
            f"{record.fp32_size_bytes / record.size_bytes:.2f}x smaller; {report.kernel}")
    write_record(json_out, record.to_dict())


@app.command(epilog=examples("transfer predict cat.jpg cup.png --onnx model.onnx",
                             "transfer predict ./new_images 'more/*.jpg' --onnx model.onnx --top-k 3 -o preds.csv",
                             "transfer predict ./new_images --onnx model.onnx --tta-crops",
                             "transfer predict ./huge --onnx model.onnx --shard $SLURM_ARRAY_TASK_ID/16 -o preds.csv"))
@cli_errors
def predict(
    images: Annotated[list[str], typer.Argument(help="image files, folders or glob patterns")],
    onnx: OnnxOpt = None,
    top_k: Annotated[int, typer.Option(min=1)] = 5,
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
    device: DeviceOpt = Device.auto,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="write the predictions to a .csv, .jsonl or "
                                                ".json file, each batch as it finishes; run the same command again "
                                                "after a kill and it continues there")] = None,
    show: Annotated[bool, typer.Option("--show", help="with -o, print the whole table too (without -o it is "
                                       "always printed)")] = False,
    shard: Annotated[str | None, typer.Option(
        metavar="K/N", help="predict only block K (from 0) of N, for array jobs; the shard that finishes last "
                            "merges all N into --output, in input order (under torchrun: RANK/WORLD_SIZE)")] = None,
    tta: Annotated[bool, typer.Option("--tta", help="average each image's probabilities with its mirror's")] = False,
    tta_crops: Annotated[bool, typer.Option("--tta-crops", help="average ten views: the image, its four corners "
                                            "and their mirrors (10x the work)")] = False,
    workers: Annotated[int | None, typer.Option(min=0, max=64, help="decoding threads (default min(8, cores))")
                       ] = None,
    decode_floor: DecodeFloorOpt = None,
    cam: Annotated[Path | None, typer.Option("--cam", metavar="DIR", help="also draw each image's class activation "
                                             "map (a file exported with --cam) into DIR, with DIR/heatmaps.json")
                   ] = None,
    json_out: JsonOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Top-k labels of images with onnxruntime only; unreadable images are listed, not fatal."""
    from exporters.runtime import OnnxModel
    from transfer.core.errors import OptionError
    from transfer.core.preprocess import tta_views
    from transfer.core.world import World, parse_shard
    from transfer.data.scan import expand_inputs
    from transfer.serving.predict import (
        check_predictions_path,
        foreign_parts,
        predict_to_file,
        shard_fingerprint,
        write_shard,
    )
    from transfer.serving.predictions_file import label_columns

    if onnx is None:
        raise OptionError(f"predict needs a model: {model_flag_hint(images)}")
    if output is not None:
        check_predictions_path(output)
    check_json_path(json_out)
    world = World.from_env()
    index, shards = parse_shard(shard) or (world.rank, world.size)
    onnx_model = OnnxModel(onnx, device=device.value, decode_workers=workers or None, decode_floor=decode_floor)
    onnx_model.require_classifier()
    if cam is not None:
        predict_cam_checks(onnx_model, shard, world.size, tta or tta_crops)
    all_paths = expand_inputs(images)
    block = World(index, shards).batch_block(len(all_paths), batch_size)
    paths = all_paths[block.start:block.stop]
    where = f"shard {index}/{shards}: " if shards > 1 else ""
    say(f"{onnx}: {onnx_model.provider}, {where}{len(paths)} image(s)", err=True)
    views = tta_views(tta, tta_crops)
    if output is not None and shards == 1:
        written = predict_to_file(onnx_model, onnx, paths, output, top_k, batch_size, views, progress_for(quiet),
                                  keep=show)
        if written.not_continued:
            say(f"started {display(output)} afresh: an interrupted run's rows are there, but {written.not_continued}")
        if show:
            print_predictions(written.results, onnx_model.multilabel, top_k)
        for item in written.unreadable[:SKIPPED_SHOWN]:
            say(f"unreadable {display(item.path)}: {item.error}")
        if written.unreadable:
            say(f"{len(written.unreadable)} unreadable image(s): each has its row in {display(output)}, with the "
                "reason in its error field")
        kept = f"; {written.continued} kept from the interrupted run" if written.continued else ""
        say(f"wrote {output} ({written.rows} rows{kept})")
        heatmaps = draw_cam(onnx_model, paths, cam, top_k, batch_size, quiet)
        write_record(json_out, {"model": str(onnx), "images": written.rows, "continued": written.continued,
                                "unreadable": [{"path": item.path, "reason": item.error}
                                               for item in written.unreadable], "top_k": top_k,
                                "views": [name for name, _, _ in views], "output": str(output),
                                **({"cam": heatmaps} if cam is not None else {})})
        return
    with progress_for(quiet).task("predicting", total=len(paths) * len(views), unit="images") as advance:
        results = onnx_model.predict(paths, top_k=top_k, batch_size=batch_size, progress=advance, views=views)
    if shards > 1 and output is not None:
        fingerprint = shard_fingerprint(onnx, all_paths, top_k, batch_size, shards, len(views))
        columns = label_columns(len(onnx_model.classes), top_k, onnx_model.multilabel)
        missing = write_shard(output, results, index, shards, fingerprint, columns)
        unreadable = sum(1 for r in results if r.error)
        done = f"{where}{len(paths)} image(s)" + (f" ({unreadable} unreadable)" if unreadable else "")
        target = display(output)
        say(f"{done}; waiting for {missing} more shard(s) to merge into {target}" if missing
            else f"{done}; merged {shards} shards into {target}")
        others = foreign_parts(output, fingerprint)
        if others:
            say(f"{len(others)} part file(s) beside {target} come from another job (another model, inputs or "
                f"settings) and are not merged, e.g. {display(others[0].name)}")
        return
    print_predictions(results, onnx_model.multilabel, top_k)
    bad = [r for r in results if r.error]
    if bad:
        say(f"{len(bad)} unreadable image(s)")
    heatmaps = draw_cam(onnx_model, paths, cam, top_k, batch_size, quiet)
    write_record(json_out, {"model": str(onnx), "images": len(results), "unreadable": len(bad), "top_k": top_k,
                            "views": [name for name, _, _ in views], "output": None,
                            "predictions": [r.__dict__ for r in results],
                            **({"cam": heatmaps} if cam is not None else {})})


def predict_cam_checks(model, shard: str | None, world_size: int, tta: bool) -> None:
    """--cam: a file with the map, one process, the plain view."""
    from transfer.serving.cam import require_cam

    require_cam(model)
    if shard is not None or world_size > 1:
        raise OptionError("--cam draws every image in one process: leave out --shard (and torchrun)")
    if tta:
        raise OptionError("--cam draws the plain view's map: leave out --tta and --tta-crops")


def draw_cam(model, paths: list, folder: Path | None, top_k: int, batch_size: int, quiet: bool) -> list[dict]:
    """predict --cam: the overlays and heatmaps.json in `folder` (nothing without it)."""
    if folder is None:
        return []
    from transfer.serving.cam import write_cam_folder

    with progress_for(quiet).task("drawing class activation maps", total=len(paths), unit="images") as advance:
        records = write_cam_folder(model, paths, folder, top_k, min(batch_size, 8), advance)
    drawn = sum(len(r.get("files", [])) for r in records)
    say(f"wrote {drawn} heatmap(s) of {len(records)} image(s) to {display(folder)} (peaks and boxes in "
        f"{display(folder / 'heatmaps.json')})")
    return records


def print_predictions(results: list, multilabel: bool, top_k: int) -> None:
    """The predictions as a table: one row per image, unreadable ones with their reason."""
    table = Table()
    columns = (("image", "labels (at the model's thresholds)", "probabilities") if multilabel
               else ("image", "label", "probability", f"top-{top_k}"))
    for column in columns:
        table.add_column(column, overflow="fold")
    for item in results:
        if item.error:
            table.add_row(display(item.path), "unreadable", "-", item.error)
        elif multilabel:
            table.add_row(display(item.path), ", ".join(item.labels) or "(none)",
                          " | ".join(f"{p:.3f}" for p in item.probabilities))
        else:
            others = " | ".join(f"{label} {p:.3f}" for label, p in zip(item.labels, item.probabilities, strict=True))
            table.add_row(display(item.path), item.labels[0], f"{item.probabilities[0]:.4f}", others)
    console.print(table)


@app.command(epilog=examples("transfer serve --onnx model.onnx",
                             "transfer serve --onnx model.onnx --port 8080 --max-batch 32 --max-wait-ms 10",
                             "transfer serve --onnx extractor.onnx --index photos.idx"))
@cli_errors
def serve(
    onnx: OnnxOpt = None,
    host: Annotated[str, typer.Option(help="address to listen on (0.0.0.0: every interface)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8000,
    max_batch: Annotated[int, typer.Option(min=1, max=1024, help="images per model run, at most")] = 16,
    max_wait_ms: Annotated[float, typer.Option(min=0, max=1000,
                                               help="how long an image also waits for others to batch with "
                                                    "(0: it runs with those queued meanwhile)")] = 0.0,
    max_upload_mb: Annotated[float, typer.Option(min=0.001, max=4096, help="largest upload per image")] = 20.0,
    max_request_mb: Annotated[float, typer.Option(min=0.001, max=65536, help="largest request body; a longer one "
                                                  "is cut off with 413 while it streams")] = 100.0,
    max_pixels: Annotated[int, typer.Option(min=1, help="largest image (width x height)")] = 40_000_000,
    max_aspect_ratio: Annotated[float, typer.Option(help="longest side over shortest, 1..50; a thinner image would "
                                                    "make a huge resize (413)")] = 50.0,
    max_images: Annotated[int, typer.Option(min=1, max=10_000, help="images per request")] = 64,
    read_timeout: Annotated[float, typer.Option(min=0.1, max=3600, help="seconds a stalled request body is "
                                                "waited for (then 408)")] = 30.0,
    shutdown_timeout: Annotated[float, typer.Option(min=0.1, max=3600, help="seconds SIGTERM/Ctrl-C waits for "
                                                    "requests in flight")] = 10.0,
    docs: Annotated[bool, typer.Option(help="serve Swagger UI at /docs (its assets load from a CDN, so it needs "
                                       "the browser online)")] = False,
    index: Annotated[Path | None, typer.Option(help="an index built with this --onnx file: adds POST /similar")] = None,
    decode_floor: DecodeFloorOpt = None,
    device: DeviceOpt = Device.auto,
) -> None:
    """HTTP inference: POST /predict or /embed (dynamic batching), /health, /metadata, a page at /.

    Exit codes: 143 after SIGTERM, 130 after Ctrl-C; 2 for a bad model, index or option, or a port that cannot be
    bound."""
    from transfer.core.errors import OptionError
    from transfer.serving.limits import ServeLimits
    from transfer.serving.serve import serve as run_serve

    if onnx is None:
        raise OptionError("serve needs a model: --onnx MODEL.onnx (written by `transfer export`)")
    limits = ServeLimits(max_upload_bytes=int(max_upload_mb * 1024 * 1024), max_pixels=max_pixels,
                         max_images=max_images, max_request_bytes=int(max_request_mb * 1024 * 1024),
                         max_aspect=max_aspect_ratio, read_timeout_s=read_timeout, shutdown_timeout_s=shutdown_timeout)
    pages = "page /, API docs /docs" if docs else "page /"
    run_serve(onnx, host=host, port=port, device=device.value, max_batch=max_batch, max_wait_ms=max_wait_ms,
              limits=limits, index=index, docs=docs, decode_floor=decode_floor,
              announce=lambda: say(f"serving {onnx} on http://{host}:{port} ({pages}); Ctrl-C stops", err=True))


@app.command("index", epilog=examples("transfer index ./photos -o photos.idx",
                                      "transfer index ./photos --onnx extractor.onnx -o photos.idx",
                                      "transfer index ./photos --run runs/flowers -o flowers.idx",
                                      "transfer index ./photos -o photos.idx --add --remove",
                                      "torchrun --nproc-per-node 4 $(which transfer) index ./photos -o photos.idx",
                                      "transfer index -o photos.idx --milvus http://milvus:19530 --collection photos"))
@cli_errors
def index_command(
    images: Annotated[list[str] | None, typer.Argument(
        help="a folder (class sub-folders give labels), files or globs (optional with --remove)")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="the index folder (new, or an index to "
                                                "replace; with --add/--remove the index to update)")] = None,
    add: Annotated[bool, typer.Option("--add", help="keep the index and embed only the images it does not hold yet "
                                      "(or whose file changed), with the index's own model")] = False,
    remove: Annotated[bool, typer.Option("--remove", help="drop the rows whose image files are gone")] = False,
    backbone: Annotated[str | None, typer.Option("--backbone", "-b", help=f"{BACKBONE_HELP}; default "
                                                 "efficientnet_lite0")] = None,
    run: RunOpt = None,
    onnx: OnnxOpt = None,
    layer: Annotated[str | None, typer.Option(help="the one layer whose pooled output is the vector; default: "
                                              "avg_pool (the backbone's feature layer where it has none), a run's "
                                              "avg_pool, an extractor's output")] = None,
    input_size: Annotated[int | None, typer.Option(help="input side (default: the model's)")] = None,
    decode_floor: DecodeFloorOpt = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
    exact: Annotated[bool, typer.Option("--exact", help="no approximate-search file, whatever the size (from "
                                        "20,000 images the index gets one, with its measured recall@10)")] = False,
    milvus: Annotated[str | None, typer.Option("--milvus", help="also copy the index into Milvus (a server URI, "
                                               "token in MILVUS_TOKEN, or a milvus-lite .db file); similar and serve "
                                               "then search there. Without IMAGES: copy an existing index")] = None,
    collection: Annotated[str | None, typer.Option(help="the Milvus collection (default: the index folder's "
                                                   "name)")] = None,
    labels: LabelsOpt = None,
    path_column: PathColumnOpt = None,
    label_column: LabelColumnOpt = None,
    split_column: SplitColumnOpt = None,
    label_sep: LabelSepOpt = None,
    multi_label: MultiLabelOpt = None,
    device: DeviceOpt = Device.auto,
    workers: WorkersOpt = None,
    quiet: QuietOpt = False,
    json_out: JsonOpt = None,
) -> None:
    """Build a similar-image index: avg-pooled, L2-normalised features of every image, with paths and labels (and,
    for large collections, a FAISS approximate-search file); --add / --remove update one without re-embedding it."""
    from transfer.apps.index import build_index, publish_index, update_index

    if output is None:
        raise OptionError("--output DIR is required: the index folder to write (or, with --add/--remove, update)")
    if collection is not None and milvus is None:
        raise OptionError("--collection names a Milvus collection: give --milvus URI too")
    if not images and not remove and not milvus:
        raise OptionError("give the images to index (a folder, files or globs); only --remove and --milvus work "
                          "without them")
    if images and remove and not add:
        raise OptionError("--remove alone drops the rows of gone files; add --add to embed the images given too")
    one_model(run, onnx)
    check_json_path(json_out)
    source = labels_file(labels, path_column, label_column, split_column, label_sep, multi_label)
    inputs = None if not images else images if len(images) > 1 else images[0]
    database = None if milvus is None else (milvus, collection)
    copy_only = milvus and not (images or add or remove)
    if (copy_only or add or remove) and (backbone or run or onnx or layer or input_size or decode_floor):
        why = ("--milvus without IMAGES copies the index as it is" if copy_only else
               "--add/--remove embed with the index's own model")
        raise OptionError(f"{why}; drop -b/--run/--onnx/--layer/--input-size/--decode-floor")
    if copy_only:
        record = publish_index(output, milvus, collection, progress=progress_for(quiet))
    elif add or remove:
        record = update_index(inputs if add else None, output, add=add, remove=remove, batch_size=batch_size,
                              device=device.value, workers=workers, progress=progress_for(quiet), labels=source,
                              exact=exact, database=database)
        say(f"embedded {record['embedded']} new or changed image(s), replaced {record['replaced']}, removed "
            f"{record['removed']}")
    else:
        record = build_index(inputs, output, backbone=backbone, run=run, onnx=onnx, layer=layer,
                             input_size=input_size, batch_size=batch_size, device=device.value, workers=workers,
                             progress=progress_for(quiet), labels=source, exact=exact, database=database,
                             decode_floor=decode_floor)
        if record is None:  # under torchrun rank 0 reports for all
            return
    say_skipped(record.get("skipped", []))
    model, ann = record["model"], record["ann"]
    say(f"indexed {record['count']} images ({record['dim']} dimensions, layer {model['layer']}) into {output}")
    say("search: exact" if ann is None else f"search: approximate, {ann['kind']}, {ann['nlist']} clusters, "
        f"{ann['nprobe']} visited per query; recall@10 {ann['recall_at_10']:.3f} against exact search on "
        f"{ann['recall_queries']} held-out queries")
    if record.get("database"):
        say(f"searched in Milvus: collection {record['database']['collection']} at {record['database']['uri']} "
            "(--exact searches the local vectors)")
    write_record(json_out, {key: value for key, value in record.items() if key != "paths"})


@app.command(epilog=examples("transfer similar query.jpg --index photos.idx",
                             "transfer similar q1.jpg q2.jpg --index photos.idx -k 5 -o sheet.png --json hits.json"))
@cli_errors
def similar(
    queries: Annotated[list[str], typer.Argument(help="query images: files, folders or globs")],
    index: Annotated[Path, typer.Option(help="an index folder written by `transfer index`")],
    k: Annotated[int, typer.Option("--top-k", "-k", min=1, help="neighbours per query")] = 10,
    output: Annotated[Path, typer.Option("--output", "-o", help="the contact sheet (PNG)")] = Path("similar.png"),
    exclude_self: Annotated[bool, typer.Option("--exclude-self", help="leave out a query's own indexed image (found "
                                               "first otherwise, marked 'itself')")] = False,
    exact: Annotated[bool, typer.Option("--exact", help="search every vector even when the index has an "
                                        "approximate-search file")] = False,
    device: DeviceOpt = Device.auto,
    quiet: QuietOpt = False,
    json_out: JsonOpt = None,
) -> None:
    """The most similar indexed images to each query (cosine), as a table and a contact sheet."""
    from transfer.apps.index import similar as run_similar
    from transfer.core.io import check_writable
    from transfer.serving.search import contact_sheet

    if output.suffix.lower() != ".png":
        raise TransferError(f"--output {output}: the contact sheet is a .png file")
    check_writable(output, "--output")
    check_json_path(json_out)
    results = run_similar(queries if len(queries) > 1 else queries[0], index, k=k, device=device.value,
                          progress=progress_for(quiet), exclude_self=exclude_self, exact=exact)
    table = Table()
    for column in ("query", "rank", "score", "label", "image"):
        table.add_column(column, overflow="fold")
    for result in results:
        for rank, hit in enumerate(result["neighbours"], 1):
            note = (" (itself)" if hit["self"] else "") + ("" if hit["status"] == "ok" else
                                                            f" ({hit['status']} since indexed)")
            table.add_row(display(result["query"]) if rank == 1 else "", str(rank), f"{hit['score']:.4f}",
                          hit["label"] or "-", display(hit["path"]) + note)
    console.print(table)
    for result in results:
        if result.get("error"):
            say(f"skipped query {result['query']}: {result['error']}")
    stale = {hit["path"] for result in results for hit in result["neighbours"] if hit["status"] != "ok"}
    if stale:
        say(f"{len(stale)} indexed image(s) are missing or changed since the index was built; rebuild it with "
            "`transfer index` to search what is there now")
    contact_sheet(results, output, title=f"nearest images in {display(index.name)} (cosine similarity)")
    say(f"wrote {output}")
    write_record(json_out, {"index": str(index), "k": k, "results": results})


@app.command(epilog=examples("transfer explain cat.jpg -b efficientnet_lite0 -o seen",
                             "transfer explain ./photos --run runs/flowers --top-k 2 --json heat.json",
                             "transfer explain cat.jpg -b vgg16 --kernels --layer features.0 --layer block1_conv1 "
                             "--layer block1_pool",
                             "transfer explain ./photos --onnx flowers_cam.onnx -o seen"))
@cli_errors
def explain(
    images: Annotated[list[str] | None, typer.Argument(help="image files, folders or globs (none for --kernels)")
                      ] = None,
    run: RunOpt = None,
    backbone: Annotated[str | None, typer.Option("--backbone", "-b", help=BACKBONE_HELP)] = None,
    onnx: Annotated[Path | None, typer.Option("--onnx", help="a classifier exported with --cam (heatmaps only)")
                    ] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="folder for the pictures")] = Path("explain"),
    kernels: Annotated[bool, typer.Option("--kernels", help="draw the first convolution's kernels, as they are and "
                                          "blurred")] = False,
    kernel_layer: Annotated[str | None, typer.Option(help="draw this convolution's kernels (Keras name or timm "
                                                     "path)")] = None,
    layer: Annotated[list[str] | None, typer.Option(help="draw this layer's most active feature maps for each "
                                                    "image; repeat for a row per layer")] = None,
    heatmaps: Annotated[bool | None, typer.Option("--heatmaps/--no-heatmaps", help="class-activation heatmaps "
                                                  "(default: on unless --kernels or --layer is given)")] = None,
    top_k: Annotated[int, typer.Option(min=1, help="heatmaps for this many top classes")] = 1,
    class_name: Annotated[list[str] | None, typer.Option("--class", help="a heatmap for this class (repeatable)")
                          ] = None,
    method: Annotated[CamMethod | None, typer.Option(
        help="pytorch-grad-cam's method (default gradcam; the layer follows the family: CNN, ViT or Swin)")] = None,
    weights: WeightsOpt = None,
    pretrained: PretrainedOpt = None,
    input_size: Annotated[int | None, typer.Option(help="input side (default: the model's)")] = None,
    device: DeviceOpt = Device.auto,
    json_out: JsonOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """See what the network sees: heatmaps of where it looked, its kernels and its feature maps."""
    images = images or []
    check_json_path(json_out)
    if sum(x is not None for x in (run, backbone, onnx)) != 1:
        raise OptionError("explain needs one model: --run RUN_DIR, -b NAME or --onnx FILE")
    if onnx is not None:
        explain_onnx(images, onnx, output, kernels or kernel_layer is not None or bool(layer), top_k, class_name,
                     json_out, quiet, device.value)
        return
    from transfer.apps.explain import explain as run_explain
    from transfer.apps.explain import write_records

    result = run_explain(images, output, run=run, backbone=backbone, weights=weights, pretrained=pretrained,
                         input_size=input_size, kernels=kernels, kernel_layer=kernel_layer, layers=layer or [],
                         heatmaps_wanted=heatmaps, top_k=top_k, class_names=class_name or [],
                         method=method.value if method else None, progress=progress_for(quiet),
                         device=device.value)
    if result.kernels is not None:
        module, values = result.kernels
        say(f"kernels of {module} ({values.shape[0]} kernels {values.shape[2]}x{values.shape[3]} over "
            f"{values.shape[1]} input channels): {display(output / 'kernels.png')}")
    if result.maps is not None:
        say(f"feature maps of {', '.join(layer or [])} for {len(result.maps)} image(s): "
            f"{display(output / 'feature_maps')}")
    if result.heat is not None:
        heat = result.heat
        say(f"heatmaps: {heat.method} on {heat.layer} ({heat.family}) for {len(heat.records)} image(s): "
            f"{display(output / 'heatmaps')} (contact sheet contact_sheet.png)")
        for record in heat.records[:SKIPPED_SHOWN]:
            say(f"  {display(record['path'])}: " + "; ".join(
                f"{item['class']} {item['probability']:.2f} peak ({item['peak'][0]:g}, {item['peak'][1]:g})"
                for item in record["classes"]))
        say_skipped(heat.skipped)
        if json_out is not None:
            write_records(heat, json_out)
            say(f"wrote {display(json_out)}")


def explain_onnx(images: list[str], onnx: Path, output: Path, wants_weights: bool, top_k: int,
                 class_names: list[str] | None, json_out: Path | None, quiet: bool, device: str) -> None:
    """explain --onnx: the file's own class activation map, with onnxruntime alone."""
    from exporters.runtime import OnnxModel
    from transfer.data.scan import expand_inputs

    if wants_weights:
        raise OptionError("--kernels and --layer read the weights in PyTorch: use --run RUN_DIR or -b NAME")
    if class_names:
        raise OptionError("--class needs the maps of every class: use --run or -b (Grad-CAM)")
    if not images:
        raise OptionError("heatmaps need images: give files, folders or globs")
    model = OnnxModel(onnx, device=device)
    from transfer.serving.cam import require_cam

    require_cam(model)
    paths = expand_inputs(images)
    records = draw_cam(model, paths, output / "heatmaps", top_k, 8, quiet)
    for record in records:
        if "error" in record:
            say(f"skipped {display(record['path'])}: {record['error']}")
    write_record(json_out, {"method": "cam (in the ONNX file)", "images": records})


@app.command(epilog=examples("transfer bench --onnx model.onnx", "transfer bench --onnx model.onnx "
                             "--batch-sizes 1,16 --against-torch --json bench.json"))
@cli_errors
def bench(
    onnx: OnnxOpt = None,
    batch_sizes: Annotated[str, typer.Option(help="comma-separated batch sizes")] = "1,8,32",
    device: DeviceOpt = Device.auto,
    seconds: Annotated[float, typer.Option(min=0.01, help="timed seconds per batch size")] = 3.0,
    against_torch: Annotated[bool, typer.Option(
        help="also time PyTorch eager on the model the file came from (its run, else its backbone)")] = False,
    json_out: JsonOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """images/s and latency p50/p95 per batch size on synthetic input, optionally next to PyTorch eager."""
    from transfer.apps.bench import bench as run_bench
    from transfer.core.errors import OptionError
    from transfer.core.options import parse_batch_sizes

    if onnx is None:
        raise OptionError("bench needs a model: name it with --onnx MODEL.onnx")
    sizes = parse_batch_sizes(batch_sizes)
    check_json_path(json_out)
    result = run_bench(onnx, sizes, device=device.value, seconds=seconds, against_torch=against_torch,
                       progress=progress_for(quiet))
    say(f"{onnx} on {result['machine']}")
    table = Table()
    for column in ("engine", "batch", "images/s", "p50 ms", "p95 ms"):
        table.add_column(column, justify="right")
    for row in result["rows"]:
        table.add_row(row["engine"], str(row["batch_size"]), f"{row['images_per_s']:.1f}", f"{row['p50_ms']:.1f}",
                      f"{row['p95_ms']:.1f}")
    console.print(table)
    for batch, ratio in result.get("speedup_vs_torch", {}).items():
        say(f"batch {batch}: onnxruntime / PyTorch eager = {ratio:.2f}x")
    write_record(json_out, result)


def main() -> None:  # pragma: no cover - `python cli.py`
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
