"""Shared fixtures: real photos from scikit-image, tiny labelled folders, the CLI runner."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test`: two workers on two cores, one thread each (set before torch
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # loads, and inherited by the processes tests start): more threads
    os.environ.setdefault("MKL_NUM_THREADS", "1")  # than cores only spin; measured, the suite runs ~30% faster

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image
from typer.testing import CliRunner

from transfer.data.samples import write_digits_folder

LONGEST_FIRST = ("test_readme.py", "test_tutorials.py", "test_distributed.py", "test_trust.py")


def pytest_collection_modifyitems(config, items):
    # The longest files first, so that `pytest -n 2 --dist load` (make test) does not end on the README tour alone.
    items.sort(key=lambda item: next((rank for rank, name in enumerate(LONGEST_FIRST) if item.path.name == name),
                                     len(LONGEST_FIRST)))
    if torch.cuda.is_available() or os.environ.get("TRANSFER_GPU_REHEARSAL") == "1":  # see tests/test_gpu.py
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def photos() -> dict[str, np.ndarray]:
    """Real photos shipped with scikit-image, as uint8 RGB arrays."""
    from skimage import data

    return {name: getattr(data, name)() for name in ("chelsea", "coffee", "astronaut", "rocket")}


@pytest.fixture(scope="session")
def imagenet_lite0_onnx(tmp_path_factory):
    """The ImageNet efficientnet_lite0 classifier (the offline weights) exported once per test worker, with its
    validation record: many tests only read it (predict, serve, plain onnxruntime). Never modify the file."""
    from exporters.export import export_onnx

    path = tmp_path_factory.mktemp("imagenet_lite0") / "lite0.onnx"
    record = export_onnx(path, backbone="efficientnet_lite0")
    return path, record


@pytest.fixture()
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture()
def photo_dir(tmp_path: Path, photos) -> Path:
    """Three real photos in a flat folder, odd sizes included."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("chelsea", "coffee", "rocket"):
        Image.fromarray(photos[name]).save(folder / f"{name}.jpg", quality=95)
    return folder


def digits_folder(root: Path, per_class: int | None = None, size: int = 32, classes: int = 10) -> Path:
    """scikit-learn's real handwritten digits as PNG class folders, the 8x8 scans filling the whole image."""
    return write_digits_folder(root, per_class=per_class, size=size, classes=classes, margin=0.0)


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under root (hidden ones included)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims width x height (a decompression bomb for any decoder that trusts it)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def make_messy_folder(root: Path, photos: dict[str, np.ndarray], good_per_class: int = 4) -> dict[str, str]:
    """Two good classes of real photos plus every kind of bad input; returns {bad file: expected reason word}.

    Usable odd images (CMYK, palette+transparency, 16-bit, LA, EXIF-rotated, animated GIF) sit in class `cat`;
    hidden files/folders and an empty class sit beside them.
    """
    cat, cup, empty = root / "cat", root / "cup", root / "empty"
    for folder in (cat, cup, empty):
        folder.mkdir(parents=True)
    chelsea, coffee = Image.fromarray(photos["chelsea"]), Image.fromarray(photos["coffee"])
    for i in range(good_per_class):
        chelsea.rotate(i * 7).save(cat / f"good{i}.jpg", quality=90)
        coffee.rotate(i * 7).save(cup / f"good{i}.jpg", quality=90)
    # usable but unusual
    chelsea.convert("CMYK").save(cat / "cmyk.jpg")
    palette = chelsea.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    palette.info["transparency"] = 0
    palette.save(cat / "palette.png", transparency=0)
    ramp = np.tile(np.linspace(0, 65535, 512).astype(np.uint16), (64, 1))
    Image.fromarray(ramp).save(cat / "ramp16.png")
    chelsea.convert("LA").save(cat / "gray_alpha.png")
    stored = chelsea.resize((120, 80))
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(cat / "exif6.jpg", exif=exif)
    frames = [chelsea.resize((64, 48)), coffee.resize((64, 48))]
    frames[0].save(cat / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    # bad
    truncated = (cup / "good0.jpg").read_bytes()
    (cup / "truncated.jpg").write_bytes(truncated[: len(truncated) // 2])
    (cup / "zero.jpg").write_bytes(b"")
    (cup / "notes.png").write_text("this is not an image\n")
    png_header_only(cup / "bomb.png", 40_000, 40_000)
    # hidden entries
    (root / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (cat / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / ".ipynb_checkpoints").mkdir()
    chelsea.save(root / ".ipynb_checkpoints" / "copy.jpg")
    (cat / "._good0.jpg").write_bytes(b"\0\5\26\7 AppleDouble")
    return {str(cup / "truncated.jpg"): "truncated", str(cup / "zero.jpg"): "empty",
            str(cup / "notes.png"): "not an image", str(cup / "bomb.png"): "decompression bomb"}


def held_out_by_content(data: Path, calibration: Path, val_split: float = 0.2, seed: int = 0) -> int:
    """How many of a run's validation images (distinct bytes) are not byte-identical to a calibration image."""
    import hashlib

    from transfer.data.scan import scan_folder
    from transfer.data.splits import train_val_samples

    def digest(path) -> str:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()

    _, validation = train_val_samples(scan_folder(data), val_split, seed)
    return len({digest(s.path) for s in validation} - {digest(p) for p in calibration.rglob("*.png")})


def one_line_error(result, code: int = 2) -> str:
    """The CLI result's one `error:` line, after checking the exit code and that no traceback was printed."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    return lines[0]
