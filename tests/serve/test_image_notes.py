"""/predictions says what it did to an image (size, mode, conversions), warns when the image is far
from the model's input, and `--strict-images` refuses such an image instead."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bnfold.serve.launch import running_server

httpx = pytest.importorskip("httpx")


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def server(tiny_onnx: Path) -> str:
    """The tiny model (grey 28x28 input, resize 28 + center-crop 28) on a real server."""
    with running_server(tiny_onnx, threads=1) as url:
        yield url


def test_a_one_pixel_colour_image_is_answered_with_what_was_done_and_a_warning(server: str) -> None:
    with httpx.Client(base_url=server) as client:
        r = client.post("/predictions/tiny", content=_png(Image.new("RGB", (1, 1))))
    assert r.status_code == 200, r.text
    note = r.json()["image"]
    assert (note["width"], note["height"], note["mode"], note["format"]) == (1, 1, "RGB", "PNG")
    assert note["conversions"][0] == "colour to grey (RGB -> L)"
    assert note["conversions"][1] == "resized 1x1 -> 28x28 (x28)"
    assert note["scale"] == 28
    assert "enlarged 28 times" in note["warning"] and "28x28" in note["warning"]
    assert r.headers["bnfold-image"] == "1x1 RGB PNG; colour to grey (RGB -> L); resized 1x1 -> 28x28 (x28)"
    assert r.headers["bnfold-image-warning"] == note["warning"]


def test_an_image_of_the_input_size_and_mode_is_used_as_is_without_warning(server: str) -> None:
    with httpx.Client(base_url=server) as client:
        r = client.post("/predictions/tiny", content=_png(Image.new("L", (28, 28), 200)))
    note = r.json()["image"]
    assert r.status_code == 200 and note["conversions"] == [] and "warning" not in note
    assert r.headers["bnfold-image"] == "28x28 L PNG; used as is" and "bnfold-image-warning" not in r.headers


@pytest.mark.parametrize("image, said", [
    (Image.new("RGBA", (56, 56), (255, 0, 0, 0)), ["colour with alpha to grey (alpha channel dropped: transparent "
                                                   "pixels keep their colour values) (RGBA -> L)",
                                                   "resized 56x56 -> 28x28 (x0.5)"]),
    (Image.fromarray(np.full((28, 28), 65535, np.uint16)), ["16-bit grey scaled to 8 bits (0..65535 -> 0..255) "
                                                            "(I;16 -> L)"]),
    (Image.new("L", (84, 28)), ["center-cropped to 28x28 (33% of the picture kept)"]),   # no resize: 28 high
])
def test_each_conversion_is_named(server: str, image: Image.Image, said: list[str]) -> None:
    with httpx.Client(base_url=server) as client:
        r = client.post("/predictions/tiny", content=_png(image))
    assert r.status_code == 200, r.text
    assert r.json()["image"]["conversions"] == said


def test_a_wide_image_is_warned_about_its_aspect_ratio(server: str) -> None:
    with httpx.Client(base_url=server) as client:
        r = client.post("/predictions/tiny", content=_png(Image.new("L", (280, 28))))
    note = r.json()["image"]
    assert r.status_code == 200 and "aspect ratio is 10 times off" in note["warning"]
    assert "mostly cropped away" in note["warning"] and "center-cropped to 28x28 (10% of" in note["conversions"][-1]


def test_strict_images_refuses_far_images_and_keeps_serving(tiny_onnx: Path) -> None:
    with running_server(tiny_onnx, threads=1, extra_args=["--strict-images"]) as url, \
            httpx.Client(base_url=url) as client:
        far = client.post("/predictions/tiny", content=_png(Image.new("RGB", (1, 1))))
        near = client.post("/predictions/tiny", content=_png(Image.new("RGB", (32, 32))))
    assert far.status_code == 422
    error = far.json()["error"]
    assert "--strict-images" in error and "enlarged 28 times" in error
    assert near.status_code == 200 and "warning" not in near.json()["image"]


def test_the_openapi_document_describes_the_image_note(server: str) -> None:
    with httpx.Client(base_url=server) as client:
        doc = client.get("/openapi.json").json()
    note = doc["components"]["schemas"]["Predictions"]["properties"]["image"]
    assert {"width", "height", "mode", "format", "conversions", "scale", "warning"} <= set(note["properties"])
    headers = doc["paths"]["/predictions/{model}"]["post"]["responses"]["200"]["headers"]
    assert {"bnfold-image", "bnfold-image-warning"} <= set(headers)
