"""The image endpoint on a LeNet trained on the bundled digits: real PNG/JPEG uploads get the right label."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Iterator

import numpy as np
import onnxruntime as ort
import pytest

from bnfold import models

# Test-only dependencies ([test] extra): a machine without one skips these tests, with the reason.
httpx = pytest.importorskip("httpx")


@pytest.fixture(scope="module")
def client(lenet_onnx: Path, in_process_service) -> Iterator[httpx.Client]:
    """The app `bnfold serve` runs, called in-process (uploads over real sockets: test_app_http, test_limits)."""
    with in_process_service(lenet_onnx, "--threads", "1") as client:
        yield client


def _encoded(image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def test_digit_pngs_are_labelled_correctly(client: httpx.Client, lenet_onnx: Path) -> None:
    session = ort.InferenceSession(str(lenet_onnx), providers=["CPUExecutionProvider"])
    meta = client.get("/v2/models/lenet").json()
    preprocess = models.Preprocess(**meta["parameters"]["spec"]["preprocess"])
    correct = 0
    for index in range(20):
        image, label = models.digit_image(index)
        r = client.post("/predictions/lenet", content=_encoded(image, "PNG"), headers={"content-type": "image/png"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == "lenet" and len(body["predictions"]) == 5
        top = body["predictions"][0]
        correct += top["label"] == str(label) and top["index"] == label
        # The served probabilities are the softmax of a direct run on the spec-preprocessed image.
        logits = session.run(None, {"input": models.preprocess_image(image, preprocess)[None]})[0][0]
        probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        assert top["index"] == int(np.argmax(probs))
        assert abs(top["probability"] - probs.max()) < 1e-5
    assert correct >= 18, f"only {correct}/20 bundled test digits labelled correctly"


def test_curl_style_upload_multipart_and_jpeg(client: httpx.Client) -> None:
    image, label = models.digit_image(3)
    raw = client.put("/predictions/lenet", content=_encoded(image, "PNG"))   # curl -T sends PUT
    multipart = client.post("/predictions/lenet?top_k=2",
                            files={"data": ("digit.png", _encoded(image, "PNG"), "image/png")})
    jpeg = client.post("/predictions/lenet?top_k=1", content=_encoded(image.convert("RGB"), "JPEG"))
    assert raw.status_code == 200, raw.text
    assert multipart.status_code == 200 and len(multipart.json()["predictions"]) == 2
    assert multipart.json()["predictions"][0] == raw.json()["predictions"][0]
    assert jpeg.status_code == 200 and jpeg.json()["predictions"][0]["index"] == raw.json()["predictions"][0]["index"]
    assert raw.json()["predictions"][0]["index"] == label
