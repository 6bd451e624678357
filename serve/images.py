"""Image uploads for `POST /predictions/{model}`: decode, preprocess with the model's spec, top-k.

The spec's `Preprocess` is replayed with PIL and numpy (no torchvision at serving time):
convert to the mode, resize, center-crop, scale to [0, 1], normalize per channel.
"""
from __future__ import annotations

import email.parser
import email.policy
import io
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from models.spec import ModelSpec, Preprocess
from serve.runtime import ServeError

_INTERPOLATION = {
    "nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING,
}
# Decompression bombs: a 2 KB PNG can claim 100k x 100k pixels.
_MAX_PIXELS = 40_000_000


def extract_upload(body: bytes, content_type: str | None) -> bytes:
    """The image bytes: the raw body, or the first file part of a multipart/form-data body."""
    if not body:
        raise ServeError("empty request body: expected an image file (PNG or JPEG), raw or as multipart/form-data")
    if content_type and content_type.lower().startswith("multipart/"):
        parser = email.parser.BytesParser(policy=email.policy.HTTP)
        message = parser.parsebytes(b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body)
        if not message.is_multipart():
            raise ServeError(f"malformed multipart body for content type {content_type!r}")
        parts = [p for p in message.iter_parts() if p.get_content_disposition() in ("form-data", "attachment", None)]
        for part in parts:
            payload = part.get_payload(decode=True)
            if payload:
                return payload
        raise ServeError("the multipart body holds no file part with content; send the image as a form field "
                         "(curl -F data=@digit.png)")
    return body


def decode_image(data: bytes) -> Image.Image:
    """A PIL image from PNG/JPEG/... bytes; ServeError (400) when the bytes are not an image."""
    try:
        image = Image.open(io.BytesIO(data))
        if image.width * image.height > _MAX_PIXELS:
            raise ServeError(f"image of {image.width}x{image.height} pixels is over the limit of "
                             f"{_MAX_PIXELS} pixels", status=413)
        image.load()
    except ServeError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        head = data[:8]
        raise ServeError(f"cannot decode the body as an image (expected PNG or JPEG; {len(data)} bytes "
                         f"starting {head!r}): {exc}")
    return image


def preprocess(image: Image.Image, spec: ModelSpec) -> np.ndarray:
    """(1, C, H, W) float32 input for the model, following `spec.preprocess`."""
    p: Preprocess = spec.preprocess
    image = image.convert(p.mode)
    method = _INTERPOLATION.get(p.interpolation, Image.Resampling.BILINEAR)
    if isinstance(p.resize, int):
        # Shorter side to `resize`, aspect ratio kept (torchvision's Resize(int)).
        w, h = image.size
        scale = p.resize / min(w, h)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
    else:
        size = (int(p.resize[1]), int(p.resize[0]))
    if image.size != size:
        image = image.resize(size, method)
    if p.crop:
        ch, cw = int(p.crop[0]), int(p.crop[1])
        w, h = image.size
        left, top = round((w - cw) / 2), round((h - ch) / 2)
        image = image.crop((left, top, left + cw, top + ch))
    array = np.asarray(image, dtype=np.float32) / 255.0
    if array.ndim == 2:
        array = array[:, :, None]
    mean = np.asarray(p.mean, dtype=np.float32).reshape(1, 1, -1)
    std = np.asarray(p.std, dtype=np.float32).reshape(1, 1, -1)
    array = (array - mean) / std
    return np.ascontiguousarray(array.transpose(2, 0, 1)[None])


def top_k(logits: np.ndarray, labels: list[str], k: int) -> list[dict[str, Any]]:
    """The k most probable classes of one row of logits, softmaxed in float64."""
    row = np.asarray(logits, dtype=np.float64).reshape(-1)
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
                raise ServeError(f"top_k must be a positive integer, got {value.decode('latin-1')!r}")
            if k < 1:
                raise ServeError(f"top_k must be a positive integer, got {k}")
    return min(k, num_classes)
