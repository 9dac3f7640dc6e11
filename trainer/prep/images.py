"""Image validation by full decode, optional img2dataset-style resize, and re-encoding for the shards."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image

from trainer.layout import MAX_IMAGE_PIXELS

PIL_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
ENCODERS = {"jpg": ("JPEG", {"quality": 95}), "png": ("PNG", {}), "webp": ("WEBP", {"quality": 95})}


class BadImage(ValueError):
    """The bytes are not a complete, decodable image."""


class ImageTooLarge(BadImage):
    """The image has more than MAX_IMAGE_PIXELS pixels: a decompression bomb, refused undecoded."""


@dataclass(frozen=True)
class ImageOptions:
    """How images are written: size None keeps the pixels, format keep keeps the input's jpg/png/webp bytes."""

    size: int | None = None
    mode: str = "center_crop"
    format: str = "keep"


def _resize(image: Image.Image, size: int, mode: str) -> Image.Image:
    width, height = image.size
    if mode == "border":
        scale = size / max(width, height)
        inner = image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.LANCZOS)
        canvas = Image.new("RGB", (size, size))
        canvas.paste(inner, ((size - inner.width) // 2, (size - inner.height) // 2))
        return canvas
    scale = size / min(width, height)
    resized = image.resize(
        (max(size, round(width * scale)), max(size, round(height * scale))), Image.Resampling.LANCZOS
    )
    if mode == "keep_ratio":
        return resized
    left, top = (resized.width - size) // 2, (resized.height - size) // 2
    return resized.crop((left, top, left + size, top + size))


def prepare_image(data: bytes, options: ImageOptions) -> tuple[bytes, str]:
    """Decode every pixel of `data` (raising BadImage, or ImageTooLarge before decoding a bomb), then return
    (bytes, extension) to store."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL warns on EXIF oddities that do not stop decoding
            with Image.open(io.BytesIO(data)) as image:
                # From the header alone: a bomb's pixels are never decoded.
                if image.width * image.height > MAX_IMAGE_PIXELS:
                    raise ImageTooLarge(f"{image.width}x{image.height} pixels, more than {MAX_IMAGE_PIXELS}")
                if options.size is not None and image.format == "JPEG":
                    # DCT-domain downscale: still reads every coded byte, so truncation is still caught.
                    image.draft("RGB", (options.size, options.size))
                image.load()
                source = PIL_FORMATS.get(image.format or "")
                target = options.format if options.format != "keep" else (source or "jpg")
                if options.size is None and target == source:
                    return data, source
                pixels = image.convert("RGB")
    except ImageTooLarge:
        raise
    except Image.DecompressionBombError as error:  # PIL's own check in open(), at twice MAX_IMAGE_PIXELS
        raise ImageTooLarge(str(error)) from error
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, struct.error... for bad files
        raise BadImage(str(error) or type(error).__name__) from error
    if options.size is not None:
        pixels = _resize(pixels, options.size, options.mode)
    pil_format, params = ENCODERS[target]
    buffer = io.BytesIO()
    pixels.save(buffer, format=pil_format, **params)
    return buffer.getvalue(), target
