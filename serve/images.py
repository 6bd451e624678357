"""Image uploads for `POST /predictions/{model}`: decode, preprocess with the model's spec, top-k.

The spec's `Preprocess` is replayed with PIL and numpy (no torchvision at serving time) by
`models.preprocess_image`: convert to the mode, resize, center-crop, scale, normalize. All of it
is blocking work, done in the decoding threads (`serve.decoding`), never on the event loop, in two
steps: `open_upload` reads the image's header (its size, for the pixel budget) and
`upload_to_input` decodes and preprocesses it. `prepare_upload` does both at once.
"""
from __future__ import annotations

import io
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from bnfold.errors import BnfoldError
from bnfold.models.preprocess import preprocess_image, resized_size
from bnfold.models.spec import ModelSpec
from bnfold.serve.errors import ServeError, limit_error

# Decompression bombs: a 2 KB PNG can claim 100k x 100k pixels.
_MAX_PIXELS = 40_000_000
# The raster formats an upload may be. Image.open tries only these: Pillow's other openers include
# EPS, whose load() runs Ghostscript on the client's bytes when it is installed. (JPEG's opener also
# reads phones' MPO files.) Image.open with a list opens only plugins already loaded, hence init();
# AVIF only where this Pillow has it.
Image.init()
IMAGE_FORMATS = tuple(f for f in ("PNG", "JPEG", "GIF", "BMP", "DIB", "TIFF", "WEBP", "PPM", "AVIF")
                      if f in Image.OPEN)
# Form fields that hold the image when no part carries a filename (`curl -F data=<digit.png`).
_IMAGE_FIELDS = ("data", "file", "image")
_BOUNDARY = re.compile(r'boundary=(?:"([^"]{1,200})"|([^;\s]{1,200}))', re.IGNORECASE)
_PARAM = re.compile(rb'(?i)\b(name|filename)\*?=(?:"([^"]*)"|([^;\s]*))')


def extract_upload(body: bytes, content_type: str | None, max_parts: int = 16) -> bytes:
    """The image bytes: the raw body, or the file part of a multipart/form-data body.

    The file part is the first part with a filename (`curl -F note=hi -F data=@x.png` picks
    x.png), else the first non-empty part named data, file or image. The body is split with
    `bytes.find`, part by part, and refused once it holds more than `max_parts` parts.
    """
    if not body:
        raise ServeError("empty request body: expected an image file (PNG or JPEG), raw or as multipart/form-data")
    if content_type and content_type.lower().startswith("multipart/"):
        return _file_part(body, content_type, max_parts)
    return body


def _file_part(body: bytes, content_type: str, max_parts: int) -> bytes:
    match = _BOUNDARY.search(content_type)
    if match is None:
        raise ServeError(f"multipart content type without a boundary: {content_type[:100]!r}")
    delimiter = b"--" + (match.group(1) or match.group(2)).encode("latin-1")
    start = body.find(delimiter)
    if start < 0:
        raise ServeError("malformed multipart body: the boundary of its content type never appears")
    named: bytes | None = None
    parts = 0
    pos = start + len(delimiter)
    while not body.startswith(b"--", pos):   # "--" after a delimiter closes the body
        end = body.find(b"\r\n" + delimiter, pos)
        if end < 0:
            raise ServeError("malformed multipart body: a part is not closed by the boundary")
        parts += 1
        if parts > max_parts:
            raise limit_error("multipart body", f"{max_parts} parts", "--max-multipart-parts")
        head_end = body.find(b"\r\n\r\n", pos, end)
        if head_end < 0:
            raise ServeError("malformed multipart body: a part has no blank line after its headers")
        params = {key.lower(): (quoted if quoted is not None else bare)
                  for key, quoted, bare in _PARAM.findall(body[pos:head_end])}
        content = body[head_end + 4:end]
        if b"filename" in params and content:
            return content
        if named is None and content and params.get(b"name", b"").decode("latin-1") in _IMAGE_FIELDS:
            named = content
        pos = end + 2 + len(delimiter)
    if named is not None:
        return named
    raise ServeError("the multipart body holds no file part with content; send the image as a file "
                     "(curl -F data=@digit.png)")


def _undecodable(size: int, start: bytes, reason: object) -> ServeError:
    """The 400 for a body of `size` bytes beginning with `start` that is not an image Pillow can read."""
    return ServeError(f"cannot decode the body as an image (expected PNG or JPEG; {size} bytes "
                      f"starting {start!r}): {reason}")


def open_image(data: bytes) -> Image.Image:
    """A PIL image from PNG/JPEG/... bytes, its header read and its pixels not yet decoded.

    ServeError 400 when the bytes are not an image, 413 over `_MAX_PIXELS` (decompression bombs).
    """
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except UnidentifiedImageError:   # its message holds the BytesIO's repr: say it in our words
        raise _undecodable(len(data), data[:8], f"not an image format Pillow reads here ({', '.join(IMAGE_FORMATS)})")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise _undecodable(len(data), data[:8], exc)
    if image.width * image.height > _MAX_PIXELS:
        raise ServeError(f"image of {image.width}x{image.height} pixels is over the limit of "
                         f"{_MAX_PIXELS} pixels", status=413)
    image.info["bnfold_bytes"] = len(data), data[:8]   # for load_image's messages
    return image


# Rows converted at a time from 16 to 8 bits: the wide intermediate stays a few MB.
_WIDE_ROWS = 256


def load_image(image: Image.Image) -> Image.Image:
    """Decode an `open_image` result's pixels; 16-bit grayscale is scaled to 8 bits, not clipped."""
    try:
        image.load()
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise _undecodable(*image.info.get("bnfold_bytes", (0, b"")), exc)
    if image.mode.startswith("I;16"):
        # 16-bit grayscale (PNG, TIFF): Pillow's convert("L") clips every value over 255 to white,
        # so scale 0..65535 to 0..255 instead, as the same picture saved at 8 bits would be. By
        # blocks of rows: at once, the uint32 intermediates of a 40-megapixel image were 480 MB.
        # (np.asarray of the whole image would also copy all of it first.)
        width, height = image.size
        out = np.empty((height, width), dtype=np.uint8)
        for row in range(0, height, _WIDE_ROWS):
            block = np.asarray(image.crop((0, row, width, min(height, row + _WIDE_ROWS))), dtype=np.uint32)
            block *= 255
            block += 32767
            block //= 65535
            out[row:row + _WIDE_ROWS] = block
        image = Image.fromarray(out)
    return image


def decode_image(data: bytes) -> Image.Image:
    """A decoded PIL image from PNG/JPEG/... bytes; ServeError (400) when the bytes are not an image."""
    return load_image(open_image(data))


def image_to_input(image: Image.Image, spec: ModelSpec) -> np.ndarray:
    """(1, C, H, W) float32 input following `spec.preprocess`, with the same code training used.

    `models.preprocess_image` is the one replay of the spec's transform (resize, crop, scale,
    normalize); sharing it keeps the served preprocessing identical to what the model saw.
    """
    try:
        array = preprocess_image(image, spec.preprocess)
    except (BnfoldError, ValueError, OSError) as exc:   # PIL: "conversion from LAB to RGB not supported"
        raise ServeError(f"cannot preprocess a {image.width}x{image.height} {image.mode} image with the "
                         f"model's spec: {exc}")
    expected = list(spec.input_shape)
    if list(array.shape) != expected:
        raise ServeError(f"a {image.width}x{image.height} image preprocesses to {list(array.shape)} with this "
                         f"model's spec, but the model takes {expected}; send an image of that aspect ratio")
    return array[None]


def open_upload(body: bytes, content_type: str | None, max_parts: int = 16) -> Image.Image:
    """The upload's image, header read, pixels not decoded: its `width * height` is what decoding costs."""
    return open_image(extract_upload(body, content_type, max_parts))


def upload_to_input(image: Image.Image, spec: ModelSpec, dtype: np.dtype) -> np.ndarray:
    """An `open_upload` image decoded, preprocessed and cast: the model's input (blocking work)."""
    return image_to_input(load_image(image), spec).astype(dtype, copy=False)


def prepare_upload(body: bytes, content_type: str | None, spec: ModelSpec, dtype: np.dtype,
                   max_parts: int = 16) -> np.ndarray:
    """Upload body to model input: the file part, decoded, preprocessed, cast (blocking work)."""
    return upload_to_input(open_upload(body, content_type, max_parts), spec, dtype)


def top_k(logits: np.ndarray, labels: list[str], k: int) -> list[dict[str, Any]]:
    """The k most probable classes of one row of logits, softmaxed in float64.

    Logits that are not finite give no probabilities: they are refused (422) rather than
    answered as NaN, which is not JSON.
    """
    row = np.asarray(logits, dtype=np.float64).reshape(-1)
    if not np.isfinite(row).all():
        raise ServeError("the model's output holds NaN or infinite values for this image; no probabilities "
                         "can be given", status=422)
    probs = np.exp(row - row.max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")[:k]
    return [{"label": labels[i] if i < len(labels) else str(i), "index": int(i),
             "probability": float(probs[i])} for i in order]


def parse_top_k(query: bytes, num_classes: int) -> int:
    """`top_k` from a query string (default 5, capped at the number of classes)."""
    k = 5
    for pair in query.split(b"&"):
        key, _, value = pair.partition(b"=")
        if key == b"top_k":
            try:
                k = int(value)
            except ValueError:
                raise ServeError(f"top_k must be a positive integer, got {value[:40].decode('latin-1')!r}")
            if k < 1:
                raise ServeError(f"top_k must be a positive integer, got {k}")
    return min(k, num_classes)


# ---------------------------------------------------------------------------------------------
# What /predictions did to an image: said in the answer, never done silently.

# Beyond these the answer carries a warning (and --strict-images refuses the image): a picture
# blown up more than 4 times holds little the model can read; one shrunk more than 32 times loses
# most of its detail; one whose aspect ratio is more than 2:1 off the model's is mostly cropped
# away (or stretched, for an exact [h, w] resize).
MAX_UPSCALE = 4.0
MAX_DOWNSCALE = 32.0
MAX_ASPECT_RATIO = 2.0

_MODE_WORDS = {"L": "grey", "RGB": "colour", "RGBA": "colour with alpha", "LA": "grey with alpha",
               "P": "palette", "PA": "palette with alpha", "1": "1-bit", "CMYK": "CMYK", "YCbCr": "YCbCr",
               "I": "32-bit integer", "F": "32-bit float", "I;16": "16-bit grey", "I;16B": "16-bit grey",
               "I;16L": "16-bit grey", "I;16N": "16-bit grey", "LAB": "Lab", "HSV": "HSV"}


@dataclass(frozen=True)
class ImageNote:
    """An upload as it arrived and what preprocessing does to it, from its header alone (no pixels)."""

    width: int
    height: int
    mode: str
    format: str | None
    conversions: list[str]        # in the order they are applied, in words
    scale: float                  # resize factor of the shorter side (>1: enlarged)
    warning: str | None           # far from the model's input size or aspect ratio

    def to_dict(self) -> dict[str, Any]:
        note: dict[str, Any] = {"width": self.width, "height": self.height, "mode": self.mode,
                                "format": self.format, "conversions": self.conversions,
                                "scale": round(self.scale, 4)}
        if self.warning is not None:
            note["warning"] = self.warning
        return note

    def header(self) -> str:
        """The note in one line for the `bnfold-image` response header (ASCII)."""
        said = f"{self.width}x{self.height} {self.mode} {self.format or 'image'}"
        return "; ".join([said, *self.conversions]) if self.conversions else f"{said}; used as is"


def _mode_change(mode: str, target: str) -> str | None:
    """The colour conversion `mode` -> `target` in words, or None when there is none."""
    if mode == target:
        return None
    words = f"{_MODE_WORDS.get(mode, mode)} to {_MODE_WORDS.get(target, target)}"
    if mode.startswith("I;16"):   # decode_image scales to 8-bit grey first; then L -> target as usual
        scaled = "16-bit grey scaled to 8 bits (0..65535 -> 0..255)"
        words = scaled if target == "L" else f"{scaled}, then grey to {_MODE_WORDS.get(target, target)}"
    elif mode in ("RGBA", "LA", "PA"):
        words += " (alpha channel dropped: transparent pixels keep their colour values)"
    return f"{words} ({mode} -> {target})"


def describe_image(image: Image.Image, spec: ModelSpec) -> ImageNote:
    """What `image_to_input` will do to `image` under `spec`, in words, and whether it is far off.

    Reads only the header fields (size, mode, format), so it runs before the pixels are decoded.
    """
    width, height, mode = image.width, image.height, image.mode
    pre = spec.preprocess
    steps = []
    change = _mode_change(mode, pre.mode)
    if change is not None:
        steps.append(change)
    new_w, new_h = resized_size(width, height, pre.resize)
    scale = min(new_w, new_h) / max(1, min(width, height))
    if (new_w, new_h) != (width, height):
        steps.append(f"resized {width}x{height} -> {new_w}x{new_h} (x{_factor(new_w / width, new_h / height)})")
    if pre.crop is not None and [pre.crop[1], pre.crop[0]] != [new_w, new_h]:
        kept = pre.crop[0] * pre.crop[1] / max(1, new_w * new_h)
        steps.append(f"center-cropped to {pre.crop[1]}x{pre.crop[0]} ({kept:.0%} of the picture kept)")
    return ImageNote(width, height, mode, image.format, steps, scale, _warning(width, height, scale, spec))


def _factor(fx: float, fy: float) -> str:
    """A resize factor in words: one number when both axes agree within 1 %, else each axis."""
    return f"{fx:.3g}" if abs(fx - fy) <= 0.01 * max(fx, fy) else f"{fx:.3g} wide, x{fy:.3g} high"


def _warning(width: int, height: int, scale: float, spec: ModelSpec) -> str | None:
    in_h, in_w = spec.input_shape[-2], spec.input_shape[-1]
    wanted = f"the model's input is {in_w}x{in_h}"
    if scale > MAX_UPSCALE:
        return (f"the {width}x{height} image was enlarged {scale:.3g} times ({wanted}): the model sees a "
                f"blown-up picture, and its answer says little about it")
    if scale < 1 / MAX_DOWNSCALE:
        return (f"the {width}x{height} image was shrunk {1 / scale:.3g} times ({wanted}): most of its detail "
                f"is lost")
    aspect, model_aspect = width / height, in_w / in_h
    off = max(aspect / model_aspect, model_aspect / aspect)
    if off > MAX_ASPECT_RATIO:
        how = "stretched to fit" if spec.preprocess.crop is None and not isinstance(spec.preprocess.resize, int) \
            else "mostly cropped away"
        return (f"the {width}x{height} image's aspect ratio is {off:.3g} times off the model's ({wanted}): "
                f"it is {how}")
    return None


def refuse_far_image(note: ImageNote) -> None:
    """`--strict-images`: an image with a warning is refused (422) instead of answered."""
    if note.warning is not None:
        raise ServeError(f"image refused (the server runs with --strict-images): {note.warning}; send an image "
                         f"closer to the model's input size and shape", status=422)
