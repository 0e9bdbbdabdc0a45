"""Image loading and resizing shared by training and preprocessing.

Returns ``(3, S, S)`` uint8 arrays; normalisation happens inside the model graph, so the queue
moves a quarter of the bytes that float32 tensors would need.
"""

from __future__ import annotations

import base64
import binascii
import io
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = [
    "IMAGE_STATUSES",
    "IMAGE_USED",
    "ImageLimits",
    "ImageUnavailableError",
    "decode_image",
    "fetch_image_bytes",
    "load_image",
]

IMAGE_USED = "used"
# Every image_status a prediction can carry: the image was used, or why it was not.
IMAGE_STATUSES = (IMAGE_USED, "absent", "missing", "unreachable", "undecodable", "too_large", "unsupported_url")


@dataclass(frozen=True, slots=True)
class ImageLimits:
    """Bounds on what one image may cost."""

    max_bytes: int = 10_000_000
    max_pixels: int = 40_000_000
    timeout_s: float = 3.0


class ImageUnavailableError(Exception):
    """The image cannot be used; ``status`` is a short machine-readable reason."""

    def __init__(self, status: str, detail: str):
        if status not in IMAGE_STATUSES:
            raise ValueError(f"unknown image status {status!r}")
        super().__init__(f"{status}: {detail}")
        self.status = status
        self.detail = detail


def fetch_image_bytes(url: str, *, limits: ImageLimits, base_dir: Path | None = None) -> bytes:
    """Bytes of an image given as a path, ``file://`` or ``http(s)://`` URL."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme in ("http", "https"):
        try:
            with urllib.request.urlopen(url, timeout=limits.timeout_s) as response:
                data = response.read(limits.max_bytes + 1)
        except (OSError, ValueError) as error:
            raise ImageUnavailableError("unreachable", f"{type(error).__name__}: {error}") from error
    else:
        if parsed.scheme == "file":
            path = Path(urllib.request.url2pathname(parsed.path))
        elif parsed.scheme in ("",) or len(parsed.scheme) == 1:  # plain path (or a Windows drive)
            path = Path(url)
            if base_dir is not None and not path.is_absolute():
                path = base_dir / path
        else:
            raise ImageUnavailableError("unsupported_url", f"scheme {parsed.scheme!r} is not supported")
        try:
            with path.open("rb") as handle:
                data = handle.read(limits.max_bytes + 1)
        except OSError as error:
            raise ImageUnavailableError("missing", f"{type(error).__name__}: {error.strerror or error}") from error
    if len(data) > limits.max_bytes:
        raise ImageUnavailableError("too_large", f"more than {limits.max_bytes} bytes")
    return data


def decode_image(data: bytes, size: int, *, limits: ImageLimits) -> np.ndarray:
    """Decode JPEG/PNG/WebP bytes to a ``(3, size, size)`` uint8 RGB array (stretched to square)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > limits.max_pixels:
                raise ImageUnavailableError("too_large", f"{image.width}x{image.height} pixels")
            # JPEG can decode at 1/2, 1/4, 1/8 scale directly: much cheaper for large photos.
            image.draft("RGB", (size, size))
            rgb = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    except ImageUnavailableError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError, SyntaxError) as error:
        raise ImageUnavailableError("undecodable", f"{type(error).__name__}: {error}") from error
    return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)


def load_image(
    *, image_url: str | None, image_b64: str | None, size: int, limits: ImageLimits, base_dir: Path | None = None
) -> np.ndarray:
    """The offer's image as ``(3, size, size)`` uint8, or :class:`ImageUnavailableError`."""
    if image_b64:
        try:
            data = base64.b64decode(image_b64, validate=True)
        except (binascii.Error, ValueError) as error:
            raise ImageUnavailableError("undecodable", f"bad base64: {error}") from error
        if len(data) > limits.max_bytes:
            raise ImageUnavailableError("too_large", f"more than {limits.max_bytes} bytes")
    elif image_url:
        data = fetch_image_bytes(image_url, limits=limits, base_dir=base_dir)
    else:
        raise ImageUnavailableError("absent", "the offer has no image")
    return decode_image(data, size, limits=limits)
