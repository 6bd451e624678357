"""The page at GET / in a real headless Chromium: Debian's chromium and chromium-driver, via Selenium.

One server serves a repository of four models: the LeNet trained on the bundled digits (grey:
a drawing pad), a tiny RGB model whose name, labels, dataset and metrics are HTML and script,
a model without a bnfold spec, and a segmentation model (tensors only). Every answer the page
shows is checked against the API's answer for the same image bytes.

`BNFOLD_PAGE_SCREENSHOTS=docs` also writes the README's screenshots (page-desktop.png,
page-360.png) into that folder, from a server with the LeNet alone.
"""
from __future__ import annotations

import base64
import io
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
import pytest
from PIL import Image

from bnfold import models
from bnfold.models.spec import ModelSpec, Preprocess
from bnfold.serve.launch import running_server

# Test-only dependencies ([test] extra): a machine without one skips these tests, with the reason.
httpx = pytest.importorskip("httpx")

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
try:
    import selenium  # noqa: F401
except ImportError:
    _SELENIUM = False
else:
    _SELENIUM = True

_MISSING = [what for what, there in [("the chromium browser", CHROMIUM), ("its driver chromedriver", CHROMEDRIVER),
                                     ("the selenium package", _SELENIUM)] if not there]
# The browser is a system package: CI's .ci/run installs it; elsewhere the tests say how.
_HOW = ([] if CHROMIUM and CHROMEDRIVER else
        ["as root `apt-get install -y chromium chromium-driver` (Debian/Ubuntu; .ci/run does this)"])
_HOW += [] if _SELENIUM else ["`pip install -e .[test]` for selenium"]
pytestmark = pytest.mark.skipif(bool(_MISSING), reason=f"needs {', '.join(_MISSING)}: {'; '.join(_HOW)}")

# What an attacker could put in a model's metadata: each must reach the page as text.
HOSTILE = ['<img src=x onerror="window.__pwned=1">', "<script>window.__pwned=2</script>",
           '"><svg onload="window.__pwned=3">']
# Served names are restricted to [A-Za-z0-9_.-] at load; everything else in the spec is free text.
HOSTILE_NAME = "hostile"


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, lenet_onnx: Path, make_tiny_onnx) -> Path:
    root = tmp_path_factory.mktemp("page_repo")
    for name in ("lenet", HOSTILE_NAME, "bare", "mask"):
        (root / name / "1").mkdir(parents=True)
    shutil.copy(lenet_onnx, root / "lenet" / "1" / "model.onnx")
    hostile = ModelSpec(arch='<b onmouseover="window.__pwned=5">arch</b>', arch_kwargs={}, task="classification",
                        input_shape=[3, 16, 16],
                        preprocess=Preprocess(mode="RGB", resize=[16, 16], crop=None, mean=[0.5] * 3, std=[0.25] * 3),
                        labels=HOSTILE, dataset="<i>data</i>", metrics={"<u>accuracy</u>": 0.5})
    make_tiny_onnx(root / HOSTILE_NAME / "1" / "model.onnx", in_channels=3, size=16, classes=3, spec=hostile)
    bare = make_tiny_onnx(root / "bare" / "1" / "model.onnx", seed=1)
    proto = onnx.load(str(bare))   # a model from elsewhere: no bnfold metadata at all
    del proto.metadata_props[:]
    onnx.save(proto, str(bare))
    segmentation = ModelSpec(arch="unet", arch_kwargs={}, task="segmentation", input_shape=[1, 28, 28],
                             preprocess=Preprocess(mode="L", resize=28, crop=[28, 28], mean=[0.5], std=[0.25]),
                             labels=["background", "foreground"], dataset="synthetic")
    make_tiny_onnx(root / "mask" / "1" / "model.onnx", seed=2, classes=2, spec=segmentation)
    return root


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[str]:
    with running_server(repo, threads=1) as url:
        yield url


def _chrome(width: int = 1100, height: int = 900):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # Offline, sandbox-free (CI runs as root), and nothing phoning home while the tests run.
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--window-size={width},{height}"):
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="bnfold-chromium-")
    options.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    _viewport(driver, width, height)
    return driver, profile


def _viewport(driver, width: int, height: int) -> None:
    """The page's viewport in CSS pixels; a window cannot be made narrower than ~500 px, so a
    phone's 360 px is emulated the way devtools' device mode does it."""
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 500})


@pytest.fixture(scope="module")
def browser():
    driver, profile = _chrome()
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _wait(driver, condition, timeout: float = 15.0):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(condition)


def _open(driver, server: str) -> None:
    driver.get(server + "/")
    _wait(driver, lambda d: d.execute_script("return document.body.dataset.ready === 'true'"))


def _card(driver, name: str):
    cards = [c for c in driver.find_elements("css selector", "section.card") if c.get_attribute("data-model") == name]
    assert len(cards) == 1, f"expected one card for {name!r}"
    return cards[0]


def _facts(card) -> dict[str, str]:
    return card.parent.execute_script(
        "const out = {}; for (const dt of arguments[0].querySelectorAll('dt')) "
        "out[dt.textContent] = (out[dt.textContent] ? out[dt.textContent] + ' | ' : '') + dt.nextElementSibling.textContent; "
        "return out;", card)


def _bars(driver, card) -> list[tuple[str, str]]:
    """(label, probability text) of the answer's bars, once the card shows an answer or an error."""
    _wait(driver, lambda d: d.execute_script(
        "const c = arguments[0]; return c.querySelector('.bars li') !== null || !c.querySelector('.error').hidden;",
        card))
    return [tuple(row) for row in driver.execute_script(
        "return [...arguments[0].querySelectorAll('.bars li')].map("
        "li => [li.querySelector('.label').textContent, li.querySelector('.probability').textContent]);", card)]


def _expected(server: str, model: str, image: bytes, k: int) -> list[tuple[str, str]]:
    """What the API answers for the same bytes, formatted as the page formats it."""
    r = httpx.post(f"{server}/predictions/{model}?top_k={k}", content=image, headers={"content-type": "image/png"})
    assert r.status_code == 200, r.text
    return [(p["label"], f"{100 * p['probability']:.1f} %") for p in r.json()["predictions"]]


def _pad_png(driver, pad) -> bytes:
    """The drawing pad as a PNG: the same pixels the page sends with canvas.toBlob."""
    url = driver.execute_script("return arguments[0].toDataURL('image/png')", pad)
    return base64.b64decode(url.split(",", 1)[1])


def _clear_answer(driver, card) -> None:
    driver.execute_script("arguments[0].querySelector('.bars').replaceChildren();", card)


def test_every_model_has_a_card_with_what_its_metadata_knows(browser, server: str) -> None:
    _open(browser, server)
    names = [c.get_attribute("data-model") for c in browser.find_elements("css selector", "section.card")]
    assert sorted(names) == sorted(["lenet", HOSTILE_NAME, "bare", "mask"])
    lenet = _card(browser, "lenet")
    facts = _facts(lenet)
    assert facts["Architecture"].startswith("lenet") and "digits" in facts["Task"]
    assert facts["Input"] == "input: FP32 [batch, 1, 28, 28]" and facts["Labels (10)"] == "0, 1, 2, 3, 4, 5, 6, 7, 8, 9"
    assert "val_acc" in facts["Training metrics"] or "acc" in facts["Training metrics"]
    assert facts["Weights"] == "float32" and facts["Exported by"].startswith("bnfold ")
    assert facts["BatchNorm fold"].startswith("folded") or "folded," in facts["BatchNorm fold"]
    # Grey single-channel: a drawing pad; the RGB model has only the file picker.
    assert lenet.find_elements("css selector", "canvas.pad")
    assert not _card(browser, HOSTILE_NAME).find_elements("css selector", "canvas")
    bare = _card(browser, "bare").text
    assert "no bnfold spec" in bare and "--labels" in bare and "--spec spec.json" in bare
    assert "--input-size 28 --grayscale" in bare   # the example fits the model's [batch, 1, 28, 28] input
    assert "/v2/models/bare/infer" in bare and not _card(browser, "bare").find_elements("css selector", "input")
    mask = _card(browser, "mask").text
    assert "segmentation model" in mask and "/v2/models/mask/infer" in mask


def test_a_drawn_stroke_gets_the_answer_the_api_gives_for_the_same_image(browser, server: str) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    _open(browser, server)
    card = _card(browser, "lenet")
    pad = card.find_element("css selector", "canvas.pad")
    # A "7": across the top, then down to the left, with a real pointer (press, move, release).
    (ActionChains(browser, duration=0).move_to_element_with_offset(pad, -60, -70).click_and_hold()
     .move_by_offset(60, 0).move_by_offset(60, 0).move_by_offset(-40, 60).move_by_offset(-40, 70).release()
     .perform())
    card.find_element("css selector", "button[id$=-classify]").click()
    shown = _bars(browser, card)
    png = _pad_png(browser, pad)
    ink = np.asarray(Image.open(io.BytesIO(png)).convert("L"))
    assert (ink > 128).mean() > 0.03, "the stroke left no white ink on the pad"
    assert ink[0, 0] == 0 and ink.max() == 255   # white on black, like the training digits
    assert len(shown) == 5 and shown == _expected(server, "lenet", png, 5)
    latency = card.find_element("css selector", ".latency").text
    assert re.fullmatch(r"server \d+\.\d\d ms · model \d+\.\d{3} ms · round trip \d+\.\d ms", latency), latency
    # What the server did to the 224x224 pad image is said under the bars (the answer's "image").
    note = card.find_element("css selector", ".image-note").text
    assert note.startswith("sent 224x224 ") and "resized 224x224 -> 28x28 (x0.125)" in note, note


def test_an_uploaded_digit_png_shows_the_label_the_api_returns(browser, server: str, tmp_path: Path) -> None:
    _open(browser, server)
    card = _card(browser, "lenet")
    for index in (0, 5):
        image, label = models.digit_image(index)
        path = tmp_path / f"digit{index}.png"
        path.write_bytes(_png(image))
        _clear_answer(browser, card)
        top_k = card.find_element("css selector", "input[type=number]")
        top_k.clear()
        top_k.send_keys("3")
        card.find_element("css selector", "input[type=file]").send_keys(str(path))
        shown = _bars(browser, card)
        assert shown == _expected(server, "lenet", path.read_bytes(), 3)
        assert shown[0][0] == str(label), f"bundled test digit {index} ({label}) labelled {shown[0][0]}"
        assert card.find_element("css selector", "img.preview").is_displayed()


def test_the_service_error_message_is_shown(browser, server: str, tmp_path: Path) -> None:
    _open(browser, server)
    card = _card(browser, "lenet")
    path = tmp_path / "notes.png"
    path.write_bytes(b"this is not an image")
    card.find_element("css selector", "input[type=file]").send_keys(str(path))
    _bars(browser, card)
    error = card.find_element("css selector", ".error")
    api = httpx.post(f"{server}/predictions/lenet?top_k=5", content=path.read_bytes(), headers={"content-type": "image/png"})
    assert api.status_code == 400 and error.is_displayed() and error.text == api.json()["error"]
    assert error.get_attribute("role") == "alert" and not card.find_elements("css selector", ".bars li")


def test_hostile_metadata_renders_as_text(browser, server: str, tmp_path: Path) -> None:
    _open(browser, server)
    card = _card(browser, HOSTILE_NAME)
    assert card.find_element("css selector", "h2").text == HOSTILE_NAME
    facts = _facts(card)
    assert facts["Labels (3)"] == ", ".join(HOSTILE)
    assert facts["Architecture"] == '<b onmouseover="window.__pwned=5">arch</b>'
    assert "<i>data</i>" in facts["Task"] and "<u>accuracy</u> 0.5" == facts["Training metrics"]
    path = tmp_path / "colour.png"
    path.write_bytes(_png(Image.fromarray((np.arange(16 * 16 * 3) % 251).astype(np.uint8).reshape(16, 16, 3))))
    card.find_element("css selector", "input[type=file]").send_keys(str(path))
    shown = _bars(browser, card)
    assert shown == _expected(server, HOSTILE_NAME, path.read_bytes(), 3)
    assert sorted(label for label, _ in shown) == sorted(HOSTILE)
    # Nothing became markup and nothing ran: no element but the page's own, no handler fired.
    made = browser.execute_script(
        "return [...document.querySelectorAll('img:not(.preview), script:not([src]), svg, b, i, u')].length")
    assert made == 0
    assert browser.execute_script("return window.__pwned === undefined")


def test_keyboard_alone_draws_and_classifies_and_every_control_is_labelled(browser, server: str) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    _open(browser, server)
    card = _card(browser, "lenet")
    pad = card.find_element("css selector", "canvas.pad")
    # Tab order reaches the pad from the file picker; no pointer needed.
    browser.execute_script("arguments[0].focus()", card.find_element("css selector", "input[type=file]"))
    ActionChains(browser).send_keys(Keys.TAB).perform()
    assert browser.switch_to.active_element == pad
    pad.send_keys(Keys.SHIFT + Keys.ARROW_UP * 3 + Keys.SHIFT)
    pad.send_keys(Keys.ARROW_DOWN * 7)   # a "1"
    pad.send_keys(Keys.ENTER)
    shown = _bars(browser, card)
    png = _pad_png(browser, pad)
    assert (np.asarray(Image.open(io.BytesIO(png)).convert("L")) > 128).mean() > 0.01, "the arrow keys drew nothing"
    assert shown == _expected(server, "lenet", png, 5)
    unlabelled = browser.execute_script(
        "return [...document.querySelectorAll('input, button, canvas, select, textarea')].filter(e => "
        "!(e.labels && e.labels.length) && !e.getAttribute('aria-label') && !e.getAttribute('aria-labelledby') "
        "&& !e.textContent.trim()).map(e => e.outerHTML.slice(0, 80));")
    assert unlabelled == []


def _shoot(driver, path: Path) -> None:
    """A full-page PNG (window as tall as the page), palette-quantized to keep the repository small."""
    height = driver.execute_script("return document.documentElement.scrollHeight")
    _viewport(driver, driver.execute_script("return window.innerWidth"), height)
    image = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
    image.quantize(colors=64, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


def _draw_and_classify(driver, card) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    pad = card.find_element("css selector", "canvas.pad")
    size = pad.size["width"]
    s = size / 224   # the same "3" at any width
    # duration=0: Selenium would spend 250 ms on each move; the pad joins the points with lines anyway.
    chain = ActionChains(driver, duration=0).move_to_element_with_offset(pad, int(-55 * s), int(-70 * s)).click_and_hold()
    for dx, dy in [(45, -10), (40, 20), (-10, 40), (-45, 15), (50, 15), (5, 45), (-40, 30), (-45, -10)]:
        chain.move_by_offset(int(dx * s), int(dy * s))
    chain.release().perform()
    card.find_element("css selector", "button[id$=-classify]").click()
    _bars(driver, card)


@pytest.mark.parametrize("width", [360, 1100])
def test_the_page_fits_the_width_without_sideways_scrolling(browser, server: str, width: int) -> None:
    _viewport(browser, width, 800)
    try:
        _open(browser, server)
        inner = browser.execute_script("return window.innerWidth")
        assert inner == width
        _draw_and_classify(browser, _card(browser, "lenet"))
        assert browser.execute_script("return document.documentElement.scrollWidth") <= inner
        pad = _card(browser, "lenet").find_element("css selector", "canvas.pad")
        assert pad.size["width"] >= min(200, inner - 60)   # big enough to draw on with a finger
    finally:
        _viewport(browser, 1100, 900)


def test_screenshots_show_the_answer_at_both_widths(lenet_onnx: Path, tmp_path: Path) -> None:
    """Full-page screenshots at 1100 and 360 px, each as wide as asked and small enough to commit.

    With BNFOLD_PAGE_SCREENSHOTS=docs they are written there: that is how the README's pictures are made.
    """
    out = Path(os.environ.get("BNFOLD_PAGE_SCREENSHOTS") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    with running_server(lenet_onnx, threads=1) as url:
        # A server's first image request pays one-off costs (PIL's PNG plugin, first allocations):
        # one request first, so the latency in the picture is the steady one a user sees.
        httpx.post(f"{url}/predictions/lenet", content=_png(models.digit_image(0)[0])).raise_for_status()
        for width, name in [(1100, "page-desktop.png"), (360, "page-360.png")]:
            driver, profile = _chrome(width, 800)
            try:
                _open(driver, url)
                _draw_and_classify(driver, _card(driver, "lenet"))
                _shoot(driver, out / name)
            finally:
                driver.quit()
                shutil.rmtree(profile, ignore_errors=True)
            with Image.open(out / name) as shot:
                assert shot.width == width and shot.height > 400, (name, shot.size)
            assert (out / name).stat().st_size < 150_000
