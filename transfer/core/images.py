"""Robust image decoding with PIL and numpy only (no torch): used by training, extraction and the ONNX runtime.

Every image becomes an upright 8-bit RGB PIL image, or a `BadImageError` carrying the reason. Files are only read,
never repaired or rewritten, and PIL's process-wide settings (MAX_IMAGE_PIXELS, LOAD_TRUNCATED_IMAGES) are never
touched: the decompression-bomb limit is checked here, per call.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from transfer.core.errors import DataError

# Same order of magnitude as PIL's own default (about 89.5 megapixels), but owned by us and per call.
DEFAULT_MAX_PIXELS = 89_478_485
# Long side over short side. The evaluation transform resizes the short side to ~256 px, so the resized area grows
# with the aspect ratio: a 96-byte 4000x1 PNG would become 256 x 1,024,000 pixels (gigabytes). 50:1 keeps every
# photo, panorama and scan while bounding that resize to 50 x resize^2 pixels.
DEFAULT_MAX_ASPECT = 50.0
ALPHA_BACKGROUND = (255, 255, 255)  # transparent pixels are composited onto white


class BadImageError(DataError):
    """One file that cannot be used as an image; `reason` is a short human-readable cause. `too_large` marks
    images refused for their size rather than their content (a server answers those with 413)."""

    def __init__(self, path: str | os.PathLike, reason: str, too_large: bool = False):
        self.path, self.reason, self.too_large = str(path), reason, too_large
        super().__init__(f"{path}: {reason}")


def check_size(path, width: int, height: int, max_pixels: int = DEFAULT_MAX_PIXELS,
               max_aspect: float = DEFAULT_MAX_ASPECT) -> None:
    """Refuse, from the header alone, an image whose decode or whose resize would take unbounded memory."""
    if width * height > max_pixels:
        raise BadImageError(path, f"decompression bomb refused: {width}x{height} exceeds {max_pixels:,} pixels",
                            too_large=True)
    if max(width, height) > max_aspect * max(1, min(width, height)):
        raise BadImageError(path, f"too thin to resize: {width}x{height} has an aspect ratio over the limit of "
                                  f"{max_aspect:g}:1", too_large=True)


def open_image(
    path: str | os.PathLike | BinaryIO,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_size: tuple[int, int] | None = None,
    name: str = "upload",
    max_aspect: float = DEFAULT_MAX_ASPECT,
) -> Image.Image:
    """Decode `path` (or an open binary file, called `name` in errors) into an upright RGB image, or raise
    `BadImageError` with the reason.

    `draft_size` lets JPEGs decode at a reduced scale (PIL `draft`) when the target is much smaller; the result
    is then at least that size but no longer bit-identical to a full decode, so evaluation paths leave it off.
    Size limits (`check_size`) are checked from the header, before any pixel is decoded.
    """
    is_file = hasattr(path, "read")
    source = path if is_file else Path(path)
    path = name if is_file else source
    with _reasons(path):
        if not is_file and source.stat().st_size == 0:
            raise BadImageError(path, "empty file (0 bytes)")
        with Image.open(source) as image:
            check_size(path, *image.size, max_pixels=max_pixels, max_aspect=max_aspect)
            if draft_size is not None and image.format == "JPEG":
                image.draft("RGB", draft_size)
            image.load()  # first frame of an animated image; raises on truncated data
            return to_rgb(ImageOps.exif_transpose(image))


@contextmanager
def _reasons(path) -> Iterator[None]:
    """What PIL raises while opening or decoding `path` -> `BadImageError` with a short reason (the decompression
    bomb limit is ours, per call: PIL's warning is silenced here, its global setting untouched)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    except BadImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise BadImageError(path, f"decompression bomb refused: {exc}", too_large=True) from None
    except UnidentifiedImageError:
        raise BadImageError(path, "not an image (content not recognised)") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as exc:
        message = str(exc) or type(exc).__name__
        if "truncated" in message:
            raise BadImageError(path, f"truncated image ({message})") from None
        raise BadImageError(path, f"corrupt or unreadable image ({message})") from None


def read_header(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS,
                max_aspect: float = DEFAULT_MAX_ASPECT) -> tuple[int, int]:
    """(width, height) from `path`'s header alone, or `BadImageError` with the reason `open_image` would give for
    an empty file, a file that is not an image, or a size over the limits. Reads a few kilobytes, decodes no pixel:
    a scan of 100,000 files takes seconds; what only a decode finds (a truncated or corrupt body) is found, and
    reported with the same reasons, when the image is used."""
    path = Path(path)
    with _reasons(path):
        if path.stat().st_size == 0:
            raise BadImageError(path, "empty file (0 bytes)")
        with Image.open(path) as image:
            check_size(path, *image.size, max_pixels=max_pixels, max_aspect=max_aspect)
            return image.size


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB: high bit depths are scaled (not clipped), alpha is composited onto white."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return Image.fromarray(_scale_to_uint8(np.asarray(image), sixteen_bit=image.mode.startswith("I;16")))\
            .convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode != "RGB":
        return image.convert("RGB")
    return image


def _scale_to_uint8(values: np.ndarray, sixteen_bit: bool) -> np.ndarray:
    """16-bit images -> 0..255 by dividing by 257; 32-bit integer ones by their likely depth; floats by range."""
    is_float = values.dtype.kind == "f"
    values = values.astype(np.float64)
    peak = float(values.max(initial=0))
    if is_float:
        top = 1.0 if peak <= 1.0 else peak
    else:
        top = 65535.0 if sixteen_bit or peak > 255 else 255.0
    return np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8)


def as_rgb_image(item: str | os.PathLike | Image.Image | np.ndarray,
                 draft_size: tuple[int, int] | None = None) -> Image.Image:
    """A path, PIL image or uint8 HWC/HW array -> RGB PIL image (paths go through `open_image`, with
    `draft_size` for a reduced-scale JPEG decode)."""
    if isinstance(item, Image.Image):
        check_size(f"<{type(item).__name__}>", *item.size)
        return to_rgb(ImageOps.exif_transpose(item))
    if isinstance(item, np.ndarray):
        if item.dtype != np.uint8:
            raise DataError(f"image arrays must be uint8 HWC RGB, got dtype {item.dtype}")
        if item.ndim == 2 or (item.ndim == 3 and item.shape[2] in (1, 3, 4)):
            check_size("<array>", item.shape[1], item.shape[0])
            return to_rgb(Image.fromarray(item.squeeze(-1) if item.ndim == 3 and item.shape[2] == 1 else item))
        raise DataError(f"image arrays must be HxW or HxWx(1|3|4), got shape {item.shape}")
    return open_image(item, draft_size=draft_size)
