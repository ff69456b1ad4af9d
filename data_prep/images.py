"""The one image decoder of the project: any file or bytes -> H x W x 3 uint8 RGB.

Training, evaluation and inference all decode through `decode_image`, so an image looks
exactly the same to the model wherever it is read. Rules, in order:

1. Read the bytes (missing / empty / unreadable file -> ImageDecodeError).
2. Identify the format and check the pixel count against MAX_PIXELS *before* decoding
   (decompression bombs, including Pillow's own warning and error, are errors).
3. Decode fully with `.load()`, so a truncated file fails here rather than being padded
   with grey (we never enable `ImageFile.LOAD_TRUNCATED_IMAGES`).
4. Apply the EXIF orientation, as photo viewers do.
5. Convert to RGB: transparency is composited on ALPHA_BACKGROUND; 16-bit, 32-bit and
   float images are rescaled to 0..255 (not clipped).

Every failure on a bad file raises ImageDecodeError("<file>: <reason>").
"""
from __future__ import annotations

import io
import os
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from common.errors import UserError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})

# Larger images are refused before decoding: 8192^2 RGB is already 200 MB of pixels.
MAX_PIXELS = 8192 * 8192

# Transparent pixels become this colour (white, as browsers and viewers show them).
ALPHA_BACKGROUND = (255, 255, 255)

BYTES_SOURCE_NAME = "<bytes>"  # how an in-memory source is named in error messages

# The data builders (data_prep.demo, data_prep.make_fakes) save reals and fakes alike as JPEGs
# of a random quality in this range (inclusive), so the compression never tells them apart.
JPEG_QUALITY_RANGE = (75, 95)


class ImageDecodeError(UserError):
    """A file that cannot be used as an image; `str(e)` is "<path>: <reason>"."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def is_image_file(path) -> bool:
    """True when the file name has an image extension (case-insensitive)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def decode_image(source) -> np.ndarray:
    """Decode a path (str / Path) or raw bytes into a C-contiguous H x W x 3 uint8 RGB array."""
    name, data = _read_source(source)
    try:
        with _truncated_images_refused(), warnings.catch_warnings():
            # Pillow only *warns* between MAX_IMAGE_PIXELS and twice that; we refuse both.
            # (Our own MAX_PIXELS check is stricter than Pillow's default limit anyway.)
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = _open_checked(name, data)
            rgb = _to_rgb_array(_apply_exif_orientation(image))
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(name, f"decompression bomb refused ({exc})") from None
    except Exception as exc:  # any other decoder failure is still "a bad file", never a crash
        raise ImageDecodeError(name, _describe_decode_failure(exc)) from None
    return np.ascontiguousarray(rgb, dtype=np.uint8)


# ---------------------------------------------------------------- reading and opening

def encode_jpeg(rgb: np.ndarray, quality: int) -> bytes:
    """H x W x 3 uint8 RGB -> the bytes of a JPEG of that quality (how the data builders save)."""
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _read_source(source) -> tuple[str, bytes]:
    """(name for messages, file bytes) of a path or a bytes object."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        name = BYTES_SOURCE_NAME
    elif isinstance(source, (str, os.PathLike)):
        name = os.fspath(source)
        data = _read_file(name)
    else:
        raise TypeError(f"decode_image expects a path or bytes, got {type(source).__name__}")
    if not data:
        raise ImageDecodeError(name, "empty file (0 bytes)")
    return name, data


def _read_file(name: str) -> bytes:
    try:
        with open(name, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        raise ImageDecodeError(name, "file not found") from None
    except IsADirectoryError:
        raise ImageDecodeError(name, "is a directory, not an image file") from None
    except OSError as exc:
        raise ImageDecodeError(name, f"cannot read file ({exc.strerror or exc})") from None


@contextmanager
def _truncated_images_refused():
    """Make sure truncation is detected even if some other code enabled the lenient mode."""
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def _open_checked(name: str, data: bytes) -> Image.Image:
    """Identify, size-check and fully decode the first frame."""
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageDecodeError(name, "not an image or an unsupported format") from None
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageDecodeError(name, f"image has zero size ({width}x{height})")
    if width * height > MAX_PIXELS:
        raise ImageDecodeError(
            name, f"decompression bomb refused ({width}x{height} > MAX_PIXELS={MAX_PIXELS})")
    image.load()  # decodes now: truncated or corrupt data raises here
    return image


def _apply_exif_orientation(image: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except Exception:
        # A broken EXIF block should not make the pixels unusable: keep them as stored.
        return image


def _describe_decode_failure(exc: Exception) -> str:
    message = str(exc) or type(exc).__name__
    if "truncated" in message.lower() or isinstance(exc, EOFError):
        return f"truncated or incomplete image data ({message})"
    return f"cannot decode image data ({message})"


# ---------------------------------------------------------------- conversion to RGB

_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


def _to_rgb_array(image: Image.Image) -> np.ndarray:
    mode = image.mode
    # High-bit-depth grey first: these modes cannot carry alpha (a rare tRNS key is ignored).
    if mode in _SIXTEEN_BIT_MODES:
        return _gray_to_rgb(np.asarray(image).astype(np.float64) / 257.0)  # 65535 -> 255
    if mode == "I":
        return _gray_to_rgb(_rescale_int32(np.asarray(image)))
    if mode == "F":
        return _gray_to_rgb(_rescale_float(np.asarray(image)))
    if mode in _ALPHA_MODES or "transparency" in image.info:
        return _composite_on_background(image)
    if mode == "RGB":
        return np.asarray(image)
    if mode == "1":
        image = image.convert("L")
    return np.asarray(image.convert("RGB"))  # L, P, CMYK, YCbCr, ...


def _composite_on_background(image: Image.Image) -> np.ndarray:
    """RGBA / LA / PA and palette or RGB with a transparent colour -> RGB over the background."""
    rgba = np.asarray(image.convert("RGBA")).astype(np.float32)
    alpha = rgba[..., 3:4] / 255.0
    background = np.array(ALPHA_BACKGROUND, np.float32)
    blended = rgba[..., :3] * alpha + background * (1.0 - alpha)
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def _rescale_int32(values: np.ndarray) -> np.ndarray:
    """Mode 'I' usually holds 16-bit data in a 32-bit container; otherwise stretch min..max."""
    low, high = int(values.min()), int(values.max())
    if low >= 0 and high <= 65535:
        return values.astype(np.float64) / 257.0
    return _stretch(values.astype(np.float64))


def _rescale_float(values: np.ndarray) -> np.ndarray:
    """Float images: 0..1 is intensity, 0..255 is already 8-bit scale, anything else is stretched."""
    values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = values.min(), values.max()
    if low >= 0.0 and high <= 1.0:
        return values * 255.0
    if low >= 0.0 and high <= 255.0:
        return values
    return _stretch(values)


def _stretch(values: np.ndarray) -> np.ndarray:
    low, high = values.min(), values.max()
    if high <= low:
        return np.zeros_like(values)
    return (values - low) * (255.0 / (high - low))


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    gray8 = np.clip(np.rint(gray), 0, 255).astype(np.uint8)
    return np.repeat(gray8[..., None], 3, axis=2)
