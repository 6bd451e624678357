"""Image uploads for `POST /predictions/{model}`: decode, preprocess with the model's spec, top-k.

The spec's `Preprocess` is replayed with PIL and numpy (no torchvision at serving time) by
`models.preprocess_image`: convert to the mode, resize, center-crop, scale, normalize.
"""
from __future__ import annotations

import email.parser
import email.policy
import io
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from bnfold.errors import BnfoldError
from bnfold.models.preprocess import preprocess_image
from bnfold.models.spec import ModelSpec
from bnfold.serve.runtime import ServeError

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
    """(1, C, H, W) float32 input following `spec.preprocess`, with the same code training used.

    `models.preprocess_image` is the one replay of the spec's transform (resize, crop, scale,
    normalize); sharing it keeps the served preprocessing identical to what the model saw.
    """
    try:
        array = preprocess_image(image, spec.preprocess)
    except BnfoldError as exc:
        raise ServeError(f"cannot preprocess a {image.width}x{image.height} image with the model's spec: {exc}")
    expected = list(spec.input_shape)
    if list(array.shape) != expected:
        raise ServeError(f"a {image.width}x{image.height} image preprocesses to {list(array.shape)} with this "
                         f"model's spec, but the model takes {expected}; send an image of that aspect ratio")
    return array[None]


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
