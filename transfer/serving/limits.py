"""What one request to `transfer serve` may be (torch-free): `ServeLimits` (bytes per image and per request, pixels,
aspect ratio, images, seconds), an upload's checks before and while it is decoded (`decode_upload`), and the ASGI
middleware that ends a stalled body with 408 (`ReadTimeout`)."""

from __future__ import annotations

import asyncio
import io
import math
import warnings
from dataclasses import dataclass

from fastapi import HTTPException
from PIL import Image

from transfer.core.errors import OptionError
from transfer.core.images import DEFAULT_MAX_ASPECT, BadImageError, check_size, open_image

DEFAULT_MAX_UPLOAD_MB = 20
DEFAULT_MAX_REQUEST_MB = 100
DEFAULT_MAX_PIXELS = 40_000_000  # a 8000 x 5000 photo; Pillow's own bomb limit is about 89 million


@dataclass
class ServeLimits:
    """What one request may send and how long it may take: bytes per image and per request, pixels and aspect ratio
    per image, images per request, seconds a stalled body is waited for, seconds a shutdown waits for requests."""

    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_MB * 1024 * 1024
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_images: int = 64
    max_request_bytes: int = DEFAULT_MAX_REQUEST_MB * 1024 * 1024
    max_aspect: float = DEFAULT_MAX_ASPECT
    read_timeout_s: float = 30.0
    shutdown_timeout_s: float = 10.0

    def check(self) -> ServeLimits:
        """Every limit a finite positive number (an `OptionError` naming the flag), so none can be switched off."""
        flags = {"max_upload_bytes": "--max-upload-mb", "max_pixels": "--max-pixels", "max_images": "--max-images",
                 "max_request_bytes": "--max-request-mb", "max_aspect": "--max-aspect-ratio",
                 "read_timeout_s": "--read-timeout", "shutdown_timeout_s": "--shutdown-timeout"}
        for name, flag in flags.items():
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise OptionError(f"{flag} {value!r}: must be a finite number above 0")
        if not 1 <= self.max_aspect <= DEFAULT_MAX_ASPECT:
            raise OptionError(f"--max-aspect-ratio {self.max_aspect:g}: must be 1..{DEFAULT_MAX_ASPECT:g} (the "
                              "model's preprocessing refuses thinner images: their resize would be unbounded)")
        return self

    def public(self) -> dict:
        return dict(self.__dict__)


class RejectedImage(Exception):
    """An upload refused with an HTTP status and a reason (the server goes on)."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


def decode_upload(data: bytes, name: str, limits: ServeLimits,
                  draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Bytes of one upload -> RGB image, refusing oversize (413) and unreadable (400) uploads with the reason.
    Sizes are checked from the header before any pixel is decoded."""
    if len(data) > limits.max_upload_bytes:
        raise RejectedImage(413, f"{name}: {len(data)} bytes is over the limit of {limits.max_upload_bytes}")
    if not data:
        raise RejectedImage(400, f"{name}: empty upload")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limits apply below
            with Image.open(io.BytesIO(data)) as probe:  # the header only: no pixel is decoded yet
                width, height = probe.size
    except Image.DecompressionBombError as exc:  # Pillow's own refusal, over twice its pixel limit
        raise RejectedImage(413, f"{name}: decompression bomb refused ({exc})") from None
    except Exception as exc:  # Pillow raises several types for data that is not an image
        raise RejectedImage(400, f"{name}: not a readable image ({type(exc).__name__})") from None
    if width * height > limits.max_pixels:
        raise RejectedImage(413, f"{name}: {width}x{height} is over the limit of {limits.max_pixels} pixels")
    try:
        check_size(name, width, height, limits.max_pixels, limits.max_aspect)
        return open_image(io.BytesIO(data), max_pixels=limits.max_pixels, draft_size=draft_size, name=name,
                          max_aspect=limits.max_aspect)
    except BadImageError as exc:
        raise RejectedImage(413 if exc.too_large else 400, f"{name}: {exc.reason}") from None


class ReadTimeout:
    """ASGI middleware: a request whose body stalls for `seconds` between two chunks ends with 408, so a client that
    stops mid-upload holds no connection, thread or shutdown forever."""

    def __init__(self, app, seconds: float):
        self.app, self.seconds = app, seconds

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def receive_within_timeout():
            try:
                return await asyncio.wait_for(receive(), self.seconds)
            except TimeoutError:
                raise HTTPException(408, f"the request body stalled for {self.seconds:g} s") from None

        await self.app(scope, receive_within_timeout, send)
