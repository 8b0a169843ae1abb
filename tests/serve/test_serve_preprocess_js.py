"""The page's JavaScript preprocessing (static/preprocess.js) against runtime/preprocess.py,
run in Node on the same pixels: the resized-and-cropped uint8 crop must be identical (Pillow's
antialiased bilinear, fixed point and rounding reproduced), the float32 model input
identical bit for bit, alpha composited as Pillow does, and softmax/top-k equal."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import PIL
import pytest
from PIL import Image

from flowae.runtime.contract import Preprocess
from flowae.runtime.images import load_rgb
from flowae.runtime.preprocess import normalize, resize_crop

PILLOW_MAJOR = int(PIL.__version__.split(".")[0])  # fixes the order of the resize's passes
STATIC = Path(__file__).resolve().parents[2] / "runtime" / "serve" / "static"
NODE = shutil.which("node")
pytestmark = pytest.mark.skipif(NODE is None, reason="node is not installed (apt nodejs)")

# (width, height): downscales by odd factors, an exact half-pixel crop offset (Python rounds
# half to even), upscaling, elongated sides, sizes already at the resize target, and tall
# images whose height shrinks by more than twice the width's pixels (Pillow 13: vertical first).
SIZES = [(640, 480), (333, 517), (129, 300), (300, 131), (90, 90), (128, 128), (1001, 128),
         (100, 260), (2048, 1536), (37, 45), (241, 583), (533, 996), (500, 2000)]
SPECS = [Preprocess(image_size_px=100, resize_px=128), Preprocess(image_size_px=100, resize_px=100),
         Preprocess(image_size_px=64, resize_px=56, mean=(0.485, 0.456, 0.406),
                    std=(0.229, 0.224, 0.225))]

NODE_SCRIPT = """
import { readFileSync, writeFileSync } from "node:fs";
import { preprocessRgb, rgbaToRgb, topK } from "./preprocess.mjs";
const cases = JSON.parse(readFileSync("cases.json", "utf8"));
for (const c of cases) {
  let pixels = new Uint8Array(readFileSync(c.file));
  if (c.channels === 4) pixels = rgbaToRgb(pixels, c.width, c.height);
  const { crop, input } = preprocessRgb(pixels, c.width, c.height, c.spec, c.pillowMajor);
  writeFileSync(c.file + ".crop", crop);
  writeFileSync(c.file + ".input", new Uint8Array(input.buffer));
}
const logits = JSON.parse(readFileSync("logits.json", "utf8"));
writeFileSync("topk.json", JSON.stringify(logits.map((row) => topK(row, 5, row.map(String)))));
"""


def _smooth_image(rng, width: int, height: int, channels: int) -> np.ndarray:
    """Noise plus gradients: every resampling tap matters, as in a photo."""
    y, x = np.mgrid[0:height, 0:width]
    base = (x * 255 / max(width - 1, 1) + y * 97 / max(height - 1, 1))[..., None]
    noise = rng.normal(0, 40, size=(height, width, channels))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def test_js_preprocessing_matches_pillow_exactly(tmp_path):
    rng = np.random.default_rng(0)
    shutil.copy(STATIC / "preprocess.js", tmp_path / "preprocess.mjs")
    cases, want = [], []
    for i, ((width, height), spec) in enumerate(
            (size, spec) for spec in SPECS for size in SIZES):
        channels = 4 if i % 5 == 0 else 3  # some with alpha: composited over white first
        pixels = _smooth_image(rng, width, height, channels)
        if channels == 4:
            pixels[..., 3] = rng.integers(0, 256, size=(height, width), dtype=np.uint8)
        name = f"case{i}.raw"
        (tmp_path / name).write_bytes(pixels.tobytes())
        cases.append({"file": name, "width": width, "height": height, "channels": channels,
                      "spec": spec.to_dict(), "pillowMajor": PILLOW_MAJOR})
        crop = resize_crop(load_rgb(Image.fromarray(pixels)), spec)
        want.append((name, crop, normalize(crop, spec)))
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    logits = rng.normal(0, 3, size=(4, 102)).astype(np.float32)
    logits[3, 7] = logits[3, 9] = logits[3].max() + 1  # a tie: the lower label comes first
    (tmp_path / "logits.json").write_text(json.dumps(logits.astype(float).tolist()))
    (tmp_path / "run.mjs").write_text(NODE_SCRIPT)
    subprocess.run([NODE, "run.mjs"], cwd=tmp_path, check=True, timeout=300)

    for (name, crop, model_input), case in zip(want, cases, strict=True):
        side = case["spec"]["image_size_px"]
        got_crop = np.frombuffer((tmp_path / f"{name}.crop").read_bytes(), np.uint8)
        np.testing.assert_array_equal(got_crop.reshape(side, side, 3), crop, err_msg=str(case))
        got_input = np.frombuffer((tmp_path / f"{name}.input").read_bytes(), np.float32)
        np.testing.assert_array_equal(got_input.reshape(3, side, side), model_input,
                                      err_msg=str(case))

    probs = np.exp(logits.astype(np.float64) - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    for row, got in zip(probs, json.loads((tmp_path / "topk.json").read_text()), strict=True):
        order = np.argsort(-row, kind="stable")[:5]
        assert [entry["label"] for entry in got] == order.tolist()
        np.testing.assert_allclose([entry["probability"] for entry in got], row[order],
                                   rtol=1e-12)
