"""The page's files as the server hands them out: no browser needed (tests/serve/test_page_browser.py
drives them in Chromium)."""
from __future__ import annotations

import io
import re
import shutil
from pathlib import Path
from typing import Iterator

import pytest
from PIL import Image

from bnfold.serve.errors import ServeError
from bnfold.serve.page import STATIC, PageAssets

# Test-only dependencies ([test] extra): a machine without one skips these tests, with the reason.
httpx = pytest.importorskip("httpx")


@pytest.fixture(scope="module")
def client(tiny_onnx: Path, in_process_service) -> Iterator[httpx.Client]:
    """The app `bnfold serve` runs, called in-process: the pages are the app's answers, no socket needed."""
    with in_process_service(tiny_onnx, "--threads", "1") as client:
        yield client


def _png(size: int = 28) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (size, size), 40).save(buffer, "PNG")
    return buffer.getvalue()


def test_page_and_its_files_are_served_self_contained_and_locked_down(client: httpx.Client) -> None:
    page = client.get("/")
    script = client.get("/static/page.js")
    style = client.get("/static/page.css")
    escape = client.get("/static/../app.py")
    unknown = client.get("/static/other.js")
    post = client.post("/")
    assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
    assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
    assert style.status_code == 200 and style.headers["content-type"].startswith("text/css")
    # No CDN and no inline script: the policy allows only the page's own files and API.
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "default-src 'none'" in policy and "connect-src 'self'" in policy
    assert page.headers["x-content-type-options"] == "nosniff"
    assert not re.search(r"(src|href)=\"(https?:)?//", page.text) and "<script>" not in page.text
    assert 'src="/static/page.js"' in page.text and 'href="/static/page.css"' in page.text
    assert escape.status_code == 404 and unknown.status_code == 404 and "page.js" in unknown.json()["error"]
    assert post.status_code == 405 and post.headers["allow"].startswith("GET")


def test_the_script_never_turns_text_into_markup() -> None:
    script = (STATIC / "page.js").read_text()
    assert not re.search(r"\.(inner|outer)HTML\s*=|insertAdjacentHTML\(|document\.write|eval\(|new Function",
                         script)
    assert "textContent" in script and "encodeURIComponent(name)" in script


def test_predictions_say_their_server_side_latency_and_metadata_carries_the_rest(client: httpx.Client) -> None:
    answer = client.post("/predictions/tiny?top_k=2", content=_png(), headers={"content-type": "image/png"})
    meta = client.get("/v2/models/tiny").json()
    assert answer.status_code == 200, answer.text
    # The page's latency line reads the standard Server-Timing header: total covers the model run.
    timing = dict(re.findall(r"(\w+);dur=([\d.]+)", answer.headers["server-timing"]))
    assert 0 < float(timing["model"]) <= float(timing["total"])
    # The cards read the spec and the rest of the ONNX metadata from the model metadata document.
    assert meta["parameters"]["spec"]["arch"] == "tiny"
    assert isinstance(meta["parameters"]["metadata"], dict) and "bnfold.spec" not in meta["parameters"]["metadata"]


def test_a_missing_page_file_is_a_start_up_error_naming_it(tmp_path: Path) -> None:
    for name in ("index.html", "page.css"):
        shutil.copy(STATIC / name, tmp_path / name)
    with pytest.raises(ServeError) as info:
        PageAssets(tmp_path)
    assert info.value.status == 500 and str(tmp_path / "page.js") in str(info.value)
    assert "without its static files" in str(info.value)
