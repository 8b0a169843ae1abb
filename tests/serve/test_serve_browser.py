"""The page in a real browser (Debian's chromium, driven by Playwright) against a real server:
three full-size photos uploaded through the file picker; "on the server" shows the Python
runtime's top-1 names; "on this device" (onnxruntime-web, WASM, preprocessing in JS) gives the
same top-5 with probabilities within 1e-3 of the Python runtime on the same pixels, for the
JPEGs (the browser decodes them at full size, so the reference is Predictor(jpeg_draft=False))
and for PNG copies (no decoder difference at all). A screenshot is kept in tmp_path."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from flowae.runtime.predictor import Predictor

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (Python) is missing")

CHROMIUM = os.environ.get("FLOWAE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PROBABILITY_ATOL = 1e-3
PAGE_TIMEOUT_MS = 180_000  # a bound on waiting (WASM start on a shared machine), not a speed test
SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "img" / "serve_page.png"

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).is_file(),
                                reason=f"chromium not found at {CHROMIUM} "
                                       "(apt-get install chromium chromium-driver)")


@pytest.fixture(scope="module")
def browser_page(server, tmp_path_factory):
    """A fresh chromium profile on the running server's page."""
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=CHROMIUM,
            headless=True, args=FLAGS, viewport={"width": 1100, "height": 900})
        page = context.new_page()
        page.requested = []  # every URL the page asked for: nothing may leave the server
        page.on("request", lambda request: page.requested.append(request.url))
        yield page
        context.close()


def _open(page, url: str) -> None:
    page.goto(url)
    page.wait_for_selector("#status[data-state=ready]", timeout=PAGE_TIMEOUT_MS)


def _upload(page, files: list[Path], mode: str) -> list[dict]:
    """Pick `files` in `mode` ("server" or "device"); the page's answers, in file order."""
    page.check(f"input[name=mode][value={mode}]")
    before = page.locator(".card[data-done]").count()
    page.set_input_files("#files", [str(f) for f in files])
    page.wait_for_function(f"document.querySelectorAll('.card[data-done]').length == "
                           f"{before + len(files)}", timeout=PAGE_TIMEOUT_MS)
    cards = page.eval_on_selector_all(
        ".card[data-done]", "cards => cards.map(c => [c.dataset.mode, c.dataset.file, "
                            "c.dataset.result || null, c.dataset.error || null])")
    mine = [card for card in reversed(cards)][before:]  # newest first on the page
    errors = [card for card in mine if card[3]]
    assert not errors, errors
    assert [card[0] for card in mine] == [mode] * len(files)
    assert [card[1] for card in mine] == [f.name for f in files]
    return [json.loads(card[2]) for card in mine]


def _compare(got: list[dict], want: list, label: str) -> float:
    """Same top-5 labels in the same order; returns the largest probability difference."""
    worst = 0.0
    for answer, result in zip(got, want, strict=True):
        assert [p["label"] for p in answer["top_k"]] == [p.label for p in result.top_k], label
        for p, q in zip(answer["top_k"], result.top_k, strict=True):
            worst = max(worst, abs(p["probability"] - q.probability))
    print(f"{label}: largest |p_browser - p_python| over the top-5 = {worst:.2e}")
    return worst


def _odd_jpeg(photo: Path, folder: Path) -> Path:
    """A photo re-saved as the kinds the test set lacks: progressive, 4:4:4, with an EXIF
    orientation (6: the browser and Pillow must both rotate it)."""
    image = Image.open(photo).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = folder / f"{photo.stem}-progressive-444-rotated.jpg"
    image.save(path, quality=92, progressive=True, subsampling=0, exif=exif)
    return path


def test_page_on_server_shows_the_python_runtimes_top1(server, browser_page, photos, expected):
    _open(browser_page, server.url + "/")
    answers = _upload(browser_page, photos, "server")
    assert [a["top_k"][0]["class_name"] for a in answers] == [
        expected[p.name]["top_k"][0]["class_name"] for p in photos]
    titles = browser_page.locator(".card .title").all_inner_texts()
    assert all(" · on the server" in t for t in titles[: len(photos)])


@pytest.mark.parametrize("precision", ["served", "fp32"])
def test_page_on_device_matches_the_python_runtime(server, browser_page, photos, precision,
                                                   tmp_path):
    """onnxruntime-web in the page vs onnxruntime in Python, same graph, same pixels."""
    query = "" if precision == "served" else f"?precision={precision}"
    _open(browser_page, server.url + "/" + query)
    reference = Predictor(provider="cpu", threads=1, jpeg_draft=False,
                          precision="auto" if precision == "served" else precision)
    jpegs = [*photos, _odd_jpeg(photos[0], tmp_path)]
    jpeg_answers = _upload(browser_page, jpegs, "device")
    jpeg_worst = _compare(jpeg_answers, list(reference.run(jpegs)), f"{precision} JPEG")
    pngs = []
    for photo in photos:
        png = tmp_path / f"{photo.stem}.png"
        Image.open(photo).save(png)
        pngs.append(png)
    png_answers = _upload(browser_page, pngs, "device")
    png_worst = _compare(png_answers, list(reference.run(pngs)), f"{precision} PNG")
    assert png_worst <= PROBABILITY_ATOL
    assert jpeg_worst <= PROBABILITY_ATOL
    fetched = [url for url in browser_page.requested if url.startswith("http")]
    assert any(url.endswith("/static/vendor/ort-wasm-simd-threaded.wasm") for url in fetched)
    assert all(url.startswith(server.url + "/") for url in fetched), fetched  # no CDN
    browser_page.screenshot(path=str(tmp_path / "serve_page.png"), full_page=False)
    if precision == "served" and os.environ.get("FLOWAE_WRITE_SCREENSHOT") == "1":
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp_path / "serve_page.png", SCREENSHOT)
