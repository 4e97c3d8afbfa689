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

from transfer.errors import NonFiniteLossError, TransferError, VerificationError

app = typer.Typer(
    name="transfer",
    help="Transfer learning on image folders with timm backbones, Keras layer names and self-describing ONNX.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Wide tables when output is piped or captured, so module paths and shapes stay on one line.
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)


def cli_errors(command):
    """Turn the library's errors into a one-line message and an exit code, without a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except TransferError as exc:
            err_console.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except (VerificationError, NonFiniteLossError) as exc:
            err_console.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
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
    table = Table(title=f"{data_dir} ({report.layout} layout, {len(report.samples)} usable images)")
    table.add_column("class")
    for split in counts:
        table.add_column(split, justify="right")
    for name in report.classes or ["(unlabelled)"]:
        table.add_row(name, *(str(counts[split].get(name, 0)) for split in counts))
    console.print(table)
    for item in report.skipped:
        console.print(f"skipped {item.path}: {item.reason}", markup=False, highlight=False, soft_wrap=True)
    console.print(f"{len(report.skipped)} file(s) skipped", highlight=False)
    if json_out is not None:
        from transfer.io import write_json

        write_json(json_out, report.to_dict())
    if report.empty_classes:
        from transfer.errors import DataError

        raise DataError(f"empty class(es) with no usable image: {', '.join(report.empty_classes)}")


def main() -> None:  # pragma: no cover - `python cli.py`
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

