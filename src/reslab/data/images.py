"""Decoding one image file to RGB uint8 [3, H, W], safely.

torchvision.io decodes (JPEG, PNG, GIF, WebP); PIL is the fallback for what it cannot read
(BMP, TIFF, PPM, ...). A cheap PIL header read comes first, so a decompression bomb is refused
before any pixel is allocated. Every failure is a `BadImageError` naming the file and the reason.
"""

from __future__ import annotations

import contextlib
import io
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

__all__ = [
    "IMAGE_EXTENSIONS",
    "BadImageError",
    "ImageHeader",
    "check_resize",
    "default_max_pixels",
    "describe_mode",
    "load_image",
    "read_header",
]

IMAGE_EXTENSIONS = frozenset(
    {
        ".jpg",
        ".jpeg",
        ".png",
        ".bmp",
        ".gif",
        ".tif",
        ".tiff",
        ".webp",
        ".ppm",
        ".pgm",
        ".pbm",
        ".pnm",
    }
)

# PIL modes that are not plain 8-bit RGB, and what loading them does.
_CONVERSIONS = {
    "L": "greyscale -> RGB",
    "LA": "greyscale+alpha -> RGB (alpha dropped)",
    "1": "1-bit -> RGB",
    "P": "palette -> RGB",
    "PA": "palette+alpha -> RGB (alpha dropped)",
    "RGBA": "RGBA -> RGB (alpha dropped)",
    "RGBX": "RGBX -> RGB",
    "CMYK": "CMYK -> RGB",
    "YCbCr": "YCbCr -> RGB",
    "LAB": "Lab -> RGB",
    "HSV": "HSV -> RGB",
    "I": "32-bit integer -> RGB uint8 (as 16-bit)",
    "F": "float -> RGB uint8",
}


class BadImageError(ValueError):
    """An image file that cannot be used; `.path` and `.reason` say which and why."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), reason


def default_max_pixels() -> int:
    """PIL's decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`, about 89.5 Mpixels)."""
    return int(Image.MAX_IMAGE_PIXELS or 2**62)


@contextlib.contextmanager
def _pil_limit(limit: int) -> Iterator[None]:
    """PIL's own bomb check (refusing over twice MAX_IMAGE_PIXELS) set to reslab's limit while
    one file is opened (in this process or a DataLoader worker; never across threads): a limit
    raised with max_pixels= / --max-pixels then reaches past PIL's default, and PIL still
    guards what it decodes inside Image.open itself (an ICO's embedded PNG is decoded there,
    before reslab sees the header's size)."""
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = limit
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


def describe_mode(mode: str) -> str | None:
    """What loading converts for a PIL mode, or None for plain RGB."""
    if mode.startswith("I;16"):
        return "16-bit -> RGB uint8"
    return _CONVERSIONS.get(mode)


class ImageHeader:
    """Width, height and PIL mode, from the header alone."""

    __slots__ = ("animated", "height", "mode", "turned", "width")

    def __init__(
        self, width: int, height: int, mode: str, animated: bool = False, turned: bool = False
    ) -> None:
        self.width, self.height, self.mode = width, height, mode
        self.animated = animated  # GIF/WebP/APNG with more than one frame
        # An EXIF orientation that torchvision.io would not apply (it does for JPEG and PNG).
        self.turned = turned


def _os_failure(path: str | Path, e: OSError) -> BadImageError:
    """A file the OS refuses to read. Permission denied is a reason of its own (the summary
    counts reasons by their first words): the file may be a good image, and chmod fixes it."""
    if isinstance(e, PermissionError):
        return BadImageError(path, "permission denied: fix its permissions (chmod) or remove it")
    return BadImageError(path, f"cannot read: {e.strerror or e}")


def _bomb(path: str | Path, w: int, h: int, limit: int) -> BadImageError:
    return BadImageError(
        path,
        f"decompression bomb: {w}x{h} = {w * h:,} pixels is over the limit of {limit:,}"
        "; if the image is genuine, raise the limit (--max-pixels N on the command line, "
        "max_pixels=N in Python; the default is PIL.Image.MAX_IMAGE_PIXELS)",
    )


def check_resize(
    path: str | Path, height: int, width: int, shorter_side: int, *, max_pixels: int | None = None
) -> None:
    """Refuse an image that resizing its shorter side to `shorter_side` would blow up past the
    decompression-bomb limit: a strip of 1 x 40,000,000 pixels is under the limit as stored (a
    PNG of 116 KB) but 32 x 1,280,000,000 once its shorter side is 32, hundreds of GB in float.
    The header check cannot see this: it depends on the size the image is resized to."""
    limit = default_max_pixels() if max_pixels is None else max_pixels
    short, long_ = min(height, width), max(height, width)
    if short <= 0 or shorter_side <= short:
        return  # shrinking never makes an image larger than it is (read_header checked that)
    grown = shorter_side * (shorter_side * long_ // short)
    if grown > limit:
        raise BadImageError(
            path,
            f"extreme aspect ratio: {width}x{height} with its shorter side resized to "
            f"{shorter_side} would be {grown:,} pixels, over the limit of {limit:,}; crop the "
            "image (or raise --max-pixels / max_pixels=N)",
        )


def read_header(
    path: str | Path, *, data: bytes | None = None, max_pixels: int | None = None
) -> ImageHeader:
    """Header check without decoding pixels: zero-byte, not-an-image and bomb files raise
    `BadImageError`. Cheap (tens of microseconds): what the up-front scan runs on every file."""
    limit = default_max_pixels() if max_pixels is None else max_pixels
    if data is None:
        try:
            if Path(path).stat().st_size == 0:
                raise BadImageError(path, "zero-byte file")
        except OSError as e:
            raise _os_failure(path, e) from None
        src: io.BytesIO | str | Path = path
    else:
        if len(data) == 0:
            raise BadImageError(path, "zero-byte file")
        src = io.BytesIO(data)
    try:
        with warnings.catch_warnings(), _pil_limit(limit):
            # Bomb warnings (reslab decides below) and PIL's notes on odd files ("Image was
            # not the expected size") would print lines of their own before reslab's.
            warnings.simplefilter("ignore")
            with Image.open(src) as im:
                w, h, mode = im.size[0], im.size[1], im.mode
                animated = bool(getattr(im, "is_animated", False))  # looks at frame 2 only
                turned = im.format not in ("JPEG", "PNG") and _orientation(im) not in (0, 1)
    except Image.DecompressionBombError as e:
        # PIL refuses to open past twice its limit, and its message quotes that doubled number:
        # keep the image's size from it, and name reslab's limit
        size = re.search(r"\((\d+) pixels\)", str(e))
        pixels = f"{int(size.group(1)):,} pixels" if size else "the image"
        raise BadImageError(
            path,
            f"decompression bomb: {pixels} is more than twice the limit of {limit:,}; if the "
            "image is genuine, raise the limit (--max-pixels N on the command line, "
            "max_pixels=N in Python; the default is PIL.Image.MAX_IMAGE_PIXELS)",
        ) from None
    except UnidentifiedImageError:
        ext = Path(path).suffix.lower()
        why = "despite its extension" if ext in IMAGE_EXTENSIONS else "no image format found"
        raise BadImageError(path, f"not an image (unknown format, {why})") from None
    except PermissionError as e:  # PIL opens the file itself: an OSError, not a bad header
        raise _os_failure(path, e) from None
    except (OSError, ValueError, SyntaxError) as e:
        raise BadImageError(path, f"corrupt header: {e}") from None
    if w * h > limit:
        raise _bomb(path, w, h, limit)
    if w == 0 or h == 0:
        raise BadImageError(path, f"empty image ({w}x{h})")
    return ImageHeader(w, h, mode, animated, turned)


def _pil_to_rgb(im: Image.Image) -> Tensor:
    """PIL image of any mode -> uint8 [3, H, W]; high bit depths are scaled, not clipped
    (PIL's own convert('RGB') would clip 16-bit values at 255)."""
    mode = im.mode
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(im).astype(np.int64)
        a = (np.clip(a, 0, 65535) * 255 + 32767) // 65535
        a = np.repeat(a.astype(np.uint8)[..., None], 3, axis=2)
    elif mode == "F":
        a = np.asarray(im, dtype=np.float32)
        a = np.clip(a * (255.0 if a.max(initial=0.0) <= 1.0 else 1.0), 0, 255).round()
        a = np.repeat(a.astype(np.uint8)[..., None], 3, axis=2)
    else:
        a = np.array(im if mode == "RGB" else im.convert("RGB"))
    return torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1).contiguous()


def _orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(0x0112, 1))
    except Exception:  # a damaged EXIF block is no orientation
        return 1


def _upright(im: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(im) or im
    except Exception:  # a damaged EXIF block: the pixels are still the image
        return im


def decode_image(data: Tensor) -> Tensor:
    """An encoded image's bytes (uint8 [n]) -> uint8 [3, H, W] RGB, EXIF orientation applied, by
    torchvision.io's decoder, imported here on first use: a CIFAR command, which never decodes
    a file, does not pay torchvision's import (~0.9 s; tests/test_imports.py)."""
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_image as decode

    return decode(data, mode=ImageReadMode.RGB, apply_exif_orientation=True)


def load_image(path: str | Path, *, max_pixels: int | None = None) -> Tensor:
    """Read and decode one file to RGB uint8 [3, H, W], converting grey / CMYK / RGBA /
    palette / 16-bit, and turned upright as its EXIF orientation says (a phone photo stored
    sideways is seen as it is shown). Raises `BadImageError` (zero-byte, not an image, corrupt
    or truncated, decompression bomb), never a decoder's RuntimeError.

    NOTE(paper): not a choice the paper makes; torchvision's PIL-based ImageFolder ignores the
    orientation tag. ImageNet's JPEGs carry almost none, so it changes nothing there.
    """
    limit = default_max_pixels() if max_pixels is None else max_pixels
    try:
        # No compressed image outgrows its pixels at 16-bit RGBA (8 bytes each) by much: a
        # bigger file is refused before it is read into memory.
        size, most = Path(path).stat().st_size, 8 * limit + (16 << 20)
        if size > most:
            raise BadImageError(path, f"file of {size:,} bytes, more than any image of at most "
                                f"{limit:,} pixels needs ({most:,}); not an image")  # fmt: skip
        data = Path(path).read_bytes()
    except OSError as e:
        raise _os_failure(path, e) from None
    head = read_header(path, data=data, max_pixels=max_pixels)
    img: Tensor | None = None
    # torchvision decodes every frame of an animation (PIL reads one), and turns only JPEG and
    # PNG upright: PIL takes those cases.
    # libpng (inside torchvision.io) refuses a side over 10^6 pixels with two lines of its own
    # on stderr before reslab could say anything: PIL reads those.
    if not (head.animated or head.turned or max(head.width, head.height) > 1_000_000):
        try:
            img = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        except (RuntimeError, ValueError):
            img = None  # a format torchvision.io lacks (BMP, TIFF, ...) or broken: PIL decides
    if img is None:
        try:
            with _pil_limit(limit), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with Image.open(io.BytesIO(data)) as im:
                    im.load()  # the first frame only
                    img = _pil_to_rgb(_upright(im))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise BadImageError(path, f"corrupt or truncated: {e}") from None
    if img.dim() == 4:  # animated GIF/WebP: [frames, 3, H, W]; the first frame is the image
        img = img[0]
    if img.dtype == torch.uint16:  # 16-bit PNG: scale to 8 bits with rounding
        img = ((img.to(torch.int32) * 255 + 32767) // 65535).to(torch.uint8)
    elif img.dtype != torch.uint8:
        raise BadImageError(path, f"unsupported pixel type {img.dtype}")
    return img
