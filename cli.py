"""The `transfer` command line: parse, call one library function, print. Errors become exit codes here only.

Exit codes: 0 success; 2 bad usage or bad input (`TransferError`, one line naming what is wrong); 1 anything else.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from transfer.errors import NonFiniteLossError, TransferError, VerificationError
from transfer.io import display, os_error_message

try:  # typer >= 0.20 vendors click; its exceptions are not the `click` package's
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover - older typer
    from click import exceptions as click_errors


class OneLineErrors(TyperGroup):
    """Usage errors (bad flag, value out of range, unknown choice) as one line and exit code 2, like our own."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
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


app = typer.Typer(
    name="transfer",
    cls=OneLineErrors,
    help="Transfer learning on image folders with timm backbones, Keras layer names and self-describing ONNX.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Wide tables when output is piped or captured, so module paths and shapes stay on one line.
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)


def say(text: str, err: bool = False) -> None:
    """Print user data (paths, reasons) verbatim: no rich markup, no highlighting, no wrapping; names that are
    not valid UTF-8 print as \\xNN escapes instead of crashing."""
    (err_console if err else console).print(display(text), markup=False, highlight=False, soft_wrap=True)


def cli_errors(command):
    """Turn the library's errors into a one-line message and an exit code, without a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except TransferError as exc:
            say(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        except (VerificationError, NonFiniteLossError) as exc:
            say(f"error: {exc}", err=True)
            raise typer.Exit(1) from None
        except OSError as exc:  # an ordinary OS condition at a user's path: read-only, full disk, a loop
            say(f"error: {os_error_message(exc)}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print("interrupted", highlight=False)
            raise typer.Exit(130) from None

    return wrapper


BackboneOpt = Annotated[str, typer.Option("--backbone", "-b", help="registry name, see `transfer backbones`")]


@app.command()
@cli_errors
def backbones() -> None:
    """List the registered backbones and where their pretrained weights come from."""
    from transfer.api import backbone_table

    table = Table(title="backbones")
    for column in ("name", "timm model", "input", "params", "weights from", "available now"):
        table.add_column(column)
    for row in backbone_table():
        table.add_row(row["name"], row["timm_model"], str(row["input_size"]), f"{row['params'] / 1e6:.1f}M",
                      row["weights_source"], "yes" if row["available"] else "no")
    console.print(table)


@app.command()
@cli_errors
def layers(
    backbone: BackboneOpt,
    input_size: Annotated[int | None, typer.Option(help="input side in pixels (default: the backbone's)")] = None,
    layer: Annotated[list[str] | None, typer.Option(help="show only these layers (Keras alias or module path)")] = None,
) -> None:
    """Every addressable layer in forward order: Keras alias, module path, output shape, params, unfreeze group."""
    from transfer.api import layer_summary

    rows, size = layer_summary(backbone, input_size, layer)
    table = Table(title=f"{backbone} at {size}x{size} (shapes from a forward pass, batch of 1)")
    for column in ("keras name", "module", "type", "output shape", "params", "unfreeze group"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(row.alias, row.path, row.kind, row.shape_text, f"{row.params:,}", row.group)
    console.print(table)


@app.command()
@cli_errors
def scan(
    data_dir: Annotated[Path, typer.Argument(help="folder of class sub-folders, train/val/test splits, or images")],
    strict: Annotated[bool, typer.Option(help="treat any unusable file as an error")] = False,
    json_out: Annotated[Path | None, typer.Option("--json", help="also write the report as JSON")] = None,
) -> None:
    """Check a data folder before a long run: classes, counts per split, every skipped file and why."""
    from transfer.scan import scan_folder

    report = scan_folder(data_dir, strict=strict)
    counts = report.counts()
    table = Table(title=f"{display(data_dir)} ({report.layout} layout, {len(report.samples)} usable images)")
    table.add_column("class")
    for split in counts:
        table.add_column(split, justify="right")
    for name in report.classes or ["(unlabelled)"]:
        table.add_row(name, *(str(counts[split].get(name, 0)) for split in counts))
    console.print(table)
    for item in report.skipped:
        say(f"skipped {item.path}: {item.reason}")
    console.print(f"{len(report.skipped)} file(s) skipped", highlight=False)
    if json_out is not None:
        from transfer.io import write_json

        write_json(json_out, report.to_dict())
    if report.empty_classes:
        from transfer.errors import DataError

        raise DataError(f"empty class(es) with no usable image: {', '.join(report.empty_classes)}")


DeviceOpt = Annotated[str, typer.Option(help="auto, cpu or cuda (cuda never falls back silently)")]


@app.command()
@cli_errors
def finetune(
    data_dir: Annotated[Path, typer.Argument(help="one sub-folder per class, or train/ and val/ splits")],
    backbone: BackboneOpt = "efficientnet_lite0",
    output: Annotated[Path | None, typer.Option(help="run directory (default runs/BACKBONE-TIME)")] = None,
    epochs_head: Annotated[int, typer.Option(help="stage 1: epochs with the backbone frozen")] = 3,
    epochs_finetune: Annotated[int, typer.Option(help="stage 2: epochs with the top groups unfrozen")] = 3,
    unfreeze: Annotated[str, typer.Option(help="stage 2 trains the top K unfreeze groups, or 'all'")] = "2",
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
    lr_head: Annotated[float, typer.Option(help="stage 1 learning rate")] = 1e-3,
    lr_finetune: Annotated[float, typer.Option(help="stage 2 learning rate (SGD, momentum 0.9)")] = 1e-4,
    head_optimizer: Annotated[str, typer.Option(help="stage 1 optimizer: adamw or rmsprop")] = "adamw",
    head: Annotated[str, typer.Option(help="mlp (pool, dropout, Dense 1024 ReLU, Dense) or linear")] = "mlp",
    val_split: Annotated[float, typer.Option(min=0.0, max=0.9)] = 0.2,
    augment: Annotated[bool, typer.Option(help="rotation, shifts, zoom, flips, colour jitter")] = True,
    cache_features: Annotated[bool | None, typer.Option(
        "--cache-features/--no-cache-features",
        help="stage 1 on cached backbone features, no augmentation (default: when --no-augment)")] = None,
    weights: Annotated[Path | None, typer.Option(help="backbone weights (.safetensors or state dict)")] = None,
    pretrained: Annotated[bool | None, typer.Option("--pretrained/--no-pretrained",
                                                    help="default: pretrained where weights exist")] = None,
    input_size: Annotated[int | None, typer.Option(help="train at this size instead of the backbone's")] = None,
    crop_pct: Annotated[float | None, typer.Option(min=0.1, max=1.0,
                                                   help="centre-crop fraction (1.0 keeps the whole image)")] = None,
    device: DeviceOpt = "auto",
    seed: int = 0,
    patience: Annotated[int, typer.Option(help="stop a stage after this many epochs without val-loss gain")] = 5,
    workers: Annotated[int | None, typer.Option(help="data loader processes (default min(4, cores))")] = None,
    strict: Annotated[bool, typer.Option(help="stop on any unusable image instead of skipping it")] = False,
    bn_stats: Annotated[bool, typer.Option(help="stage 2: unfrozen BatchNorm layers update running stats")] = False,
    resume: Annotated[Path | None, typer.Option(help="continue RUN_DIR from its last.ckpt")] = None,
) -> None:
    """Fine-tune a pretrained backbone with a new head: stage 1 head only, stage 2 top groups unfrozen."""
    from transfer.train import FinetuneConfig
    from transfer.train import finetune as run_finetune

    config = None if resume else FinetuneConfig(
        backbone=backbone, epochs_head=epochs_head, epochs_finetune=epochs_finetune, unfreeze=unfreeze,
        batch_size=batch_size, lr_head=lr_head, lr_finetune=lr_finetune, head_optimizer=head_optimizer, head=head,
        val_split=val_split, augment=augment, cache_features=cache_features, pretrained=pretrained,
        weights=str(weights) if weights else None, input_size=input_size, crop_pct=crop_pct, seed=seed,
        patience=patience, workers=workers, strict=strict, bn_stats=bn_stats)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task("training", total=None)

        def on_batch(description: str, done: int, total: int) -> None:
            bar.update(task, description=description, completed=done, total=total)

        def log(line: str) -> None:
            bar.console.print(line, markup=False, highlight=False, soft_wrap=True)

        result = run_finetune(data_dir, config, output=output, resume=resume, device=device, log=log,
                              on_batch=on_batch)
    console.print(f"validation accuracy {result.best_val_acc:.4f} ({result.epochs_run} epochs) -> {result.run_dir}",
                  highlight=False)


@app.command()
@cli_errors
def evaluate(
    model: Annotated[Path, typer.Argument(help="a run directory or a .onnx classifier")],
    data_dir: Annotated[Path, typer.Argument(help="labelled folder (class sub-folders; test/ split if present)")],
    batch_size: int = 32,
    device: DeviceOpt = "auto",
    output: Annotated[Path | None, typer.Option(help="write the report as JSON")] = None,
) -> None:
    """Accuracy, per-class precision/recall/F1 and the confusion matrix on a labelled folder."""
    from transfer.evaluate import evaluate as run_evaluate

    report = run_evaluate(model, data_dir, batch_size=batch_size, device=device)
    table = Table(title=f"{display(model)} on {display(data_dir)}: accuracy {report['accuracy']:.4f} "
                        f"({report['count']} images)")
    for column in ("class", "precision", "recall", "f1", "support"):
        table.add_column(column, justify="right")
    for name, row in report["per_class"].items():
        table.add_row(name, f"{row['precision']:.3f}", f"{row['recall']:.3f}", f"{row['f1']:.3f}", str(row["support"]))
    console.print(table)
    console.print("confusion matrix (rows true, columns predicted):")
    for name, counts in zip(report["per_class"], report["confusion_matrix"], strict=True):
        console.print(f"  {name:>12} " + " ".join(f"{c:5d}" for c in counts), highlight=False, markup=False)
    for item in report["skipped"]:
        say(f"skipped {item['path']}: {item['reason']}")
    if output is not None:
        from transfer.io import write_json

        write_json(output, report)


@app.command()
@cli_errors
def extract(
    images_dir: Annotated[Path, typer.Argument(help="folder of images (class sub-folders give labels)")],
    layer: Annotated[list[str] | None, typer.Option(help="Keras alias or timm module path; repeat for several")] = None,
    backbone: BackboneOpt = "vgg16",
    pool: Annotated[str, typer.Option(help="none keeps C x H x W; avg or max pool the spatial axes")] = "none",
    layout: Annotated[str, typer.Option(help="nchw, or nhwc (Keras' array order)")] = "nchw",
    weights: Annotated[Path | None, typer.Option(help="backbone weights (.safetensors or state dict)")] = None,
    run: Annotated[Path | None, typer.Option(help="use a fine-tuned run's weights and preprocessing")] = None,
    onnx: Annotated[Path | None, typer.Option(help="run an exported feature extractor with onnxruntime")] = None,
    pretrained: Annotated[bool | None, typer.Option("--pretrained/--no-pretrained")] = None,
    input_size: Annotated[int | None, typer.Option(help="input side (default: the model's)")] = None,
    output: Annotated[Path | None, typer.Option(help=".npy (one layer) or .npz; default features.npy/.npz")] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
    device: DeviceOpt = "auto",
    workers: Annotated[int | None, typer.Option(help="decoding processes (default min(4, cores))")] = None,
) -> None:
    """Features of intermediate layers, streamed to disk with a JSON sidecar (paths, labels, metadata)."""
    from rich.progress import Progress

    from transfer.features import extract as run_extract
    from transfer.features import sidecar_path

    layers = layer or ["block4_pool"]
    output = output or Path("features.npy" if len(layers) == 1 else "features.npz")
    with Progress(console=err_console, transient=True, disable=not err_console.is_terminal) as bar:
        task = bar.add_task("extracting", total=None)
        result = run_extract(images_dir, backbone=backbone, layers=layers, pool=pool, layout=layout, weights=weights,
                             run=run, onnx=onnx, pretrained=pretrained, input_size=input_size, output=output,
                             batch_size=batch_size, device=device, workers=workers,
                             progress=lambda n: bar.advance(task, n))
    for name, shape in result.metadata["shapes"].items():
        module = result.metadata["layers"][name]
        console.print(f"{name} ({module}): {tuple(shape)}", highlight=False)
    for item in result.skipped:
        say(f"skipped {item.path}: {item.reason}")
    console.print(f"wrote {output} and {sidecar_path(output)} ({len(result.paths)} images)", highlight=False)


@app.command()
@cli_errors
def export(
    run_dir: Annotated[Path | None, typer.Argument(help="a finetune run directory (classifier, classes)")] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="the .onnx file to write")] = Path("model.onnx"),
    backbone: Annotated[str | None, typer.Option("--backbone", "-b", help="export a registry backbone")] = None,
    weights: Annotated[Path | None, typer.Option(help="backbone weights (.safetensors or state dict)")] = None,
    layer: Annotated[list[str] | None, typer.Option(help="feature extractor: one output per layer")] = None,
    pretrained: Annotated[bool | None, typer.Option("--pretrained/--no-pretrained")] = None,
    opset: Annotated[int, typer.Option(help="ONNX opset")] = 18,
    fp16: Annotated[bool, typer.Option(help="half-precision weights and compute (for GPU); float32 I/O")] = False,
    int8: Annotated[bool, typer.Option(help="static QDQ int8 (for CPU), calibrated on --calibration")] = False,
    calibration: Annotated[Path | None, typer.Option(help="folder of representative images for --int8")] = None,
    embed_preprocessing: Annotated[bool, typer.Option(help="input uint8 NHWC RGB; normalization in the graph")] = False,
    input_size: Annotated[int | None, typer.Option(help="input side (default: the model's)")] = None,
    verify_images: Annotated[Path | None, typer.Option(help="folder of images to verify against PyTorch")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="write the validation record as JSON")] = None,
) -> None:
    """Export a verified, self-describing ONNX file: a run's classifier, ImageNet classifier or feature extractor."""
    from exporters.export import export_onnx

    record = export_onnx(output, run=run_dir, backbone=backbone, weights=weights, layers=layer or [],
                         pretrained=pretrained, opset=opset, fp16=fp16, int8=int8, calibration=calibration,
                         embed_preprocessing=embed_preprocessing, input_size=input_size, verify_images=verify_images)
    size_mib = record.size_bytes / 2**20
    console.print(f"wrote {record.path} ({size_mib:.1f} MiB, {record.precision}, opset {record.opset})",
                  highlight=False)
    console.print(f"input {record.input_name} {record.input_dtype} {record.input_shape}; outputs "
                  + ", ".join(f"{n} {record.output_shapes[n]}" for n in record.output_names), highlight=False)
    console.print(f"onnx.checker: {record.checker}", highlight=False)
    for name in record.output_names:
        console.print(f"max difference vs PyTorch ({name}, batch {record.batch_sizes_checked}, {record.verify_images}):"
                      f" abs {record.max_abs_diff[name]:.3g}, relative {record.max_rel_diff[name]:.3g} "
                      f"(tolerance {record.tolerance:g})", highlight=False)
    if record.top1_agreement is not None:
        console.print(f"int8 top-1 agreement with fp32 on {record.agreement_images}: {record.top1_agreement:.4f}; "
                      f"size {record.fp32_size_bytes / record.size_bytes:.2f}x smaller", highlight=False)
    if json_out is not None:
        from transfer.io import write_json

        write_json(json_out, record.to_dict())


@app.command()
@cli_errors
def predict(
    model: Annotated[Path, typer.Argument(help="a .onnx file written by `transfer export`")],
    images: Annotated[list[str], typer.Argument(help="image files, folders or glob patterns")],
    top_k: Annotated[int, typer.Option(min=1)] = 5,
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
    device: DeviceOpt = "auto",
    output: Annotated[Path | None, typer.Option(help="write predictions to .csv or .json")] = None,
) -> None:
    """Top-k labels of images with onnxruntime only; unreadable images are listed, not fatal."""
    from rich.progress import Progress

    from exporters.runtime import OnnxModel
    from transfer.io import output_lock
    from transfer.predict import check_predictions_path, write_predictions
    from transfer.scan import expand_inputs

    if output is not None:
        check_predictions_path(output)
    paths = expand_inputs(images)
    onnx_model = OnnxModel(model, device=device)
    err_console.print(f"{model}: {onnx_model.provider}, {len(paths)} image(s)", highlight=False)
    with Progress(console=err_console, transient=True, disable=not err_console.is_terminal) as bar:
        task = bar.add_task("predicting", total=len(paths))
        results = onnx_model.predict(paths, top_k=top_k, batch_size=batch_size,
                                     progress=lambda n: bar.advance(task, n))
    table = Table(title=f"top-{top_k} predictions")
    for column in ("image", "label", "probability", f"top-{top_k}"):
        table.add_column(column, overflow="fold")
    for item in results:
        if item.error:
            table.add_row(display(item.path), "unreadable", "-", item.error)
        else:
            others = ", ".join(f"{label} {p:.3f}" for label, p in zip(item.labels, item.probabilities, strict=True))
            table.add_row(display(item.path), item.labels[0], f"{item.probabilities[0]:.4f}", others)
    console.print(table)
    bad = [r for r in results if r.error]
    if bad:
        console.print(f"{len(bad)} unreadable image(s)", highlight=False)
    if output is not None:
        with output_lock(output):
            write_predictions(output, results)


@app.command()
@cli_errors
def bench(
    model: Annotated[Path, typer.Argument(help="a .onnx file written by `transfer export`")],
    batch_sizes: Annotated[str, typer.Option(help="comma-separated batch sizes")] = "1,8,32",
    device: DeviceOpt = "auto",
    seconds: Annotated[float, typer.Option(help="timed seconds per batch size")] = 3.0,
    against_torch: Annotated[str | None, typer.Option(help="also time PyTorch eager: a RUN_DIR or a backbone name")
                             ] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="write the results as JSON")] = None,
) -> None:
    """images/s and latency p50/p95 per batch size on synthetic input, optionally next to PyTorch eager."""
    from transfer.options import parse_batch_sizes
    from transfer.predict import run_bench

    sizes = parse_batch_sizes(batch_sizes)
    if json_out is not None:
        from transfer.io import check_writable

        check_writable(json_out, "--json")
    result = run_bench(model, sizes, device=device, seconds=seconds, against_torch=against_torch)
    table = Table(title=f"{display(model)} on {result['machine']}")
    for column in ("engine", "batch", "images/s", "p50 ms", "p95 ms"):
        table.add_column(column, justify="right")
    for row in result["rows"]:
        table.add_row(row["engine"], str(row["batch_size"]), f"{row['images_per_s']:.1f}", f"{row['p50_ms']:.1f}",
                      f"{row['p95_ms']:.1f}")
    console.print(table)
    for batch, ratio in result.get("speedup_vs_torch", {}).items():
        console.print(f"batch {batch}: onnxruntime / PyTorch eager = {ratio:.2f}x", highlight=False)
    if json_out is not None:
        from transfer.io import write_json

        write_json(json_out, result)


def main() -> None:  # pragma: no cover - `python cli.py`
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

