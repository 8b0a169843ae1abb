"""Predictor on a real exported tiny model: results vs PyTorch, batching, 8 threads at once,
providers, model lookup (the bundled-model mechanism included), and running without torch."""

from __future__ import annotations

import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from flowae.checkpoint import load_checkpoint, model_from_checkpoint
from flowae.data import eval_transform, to_float, to_uint8
from flowae.runtime import __version__
from flowae.runtime import modeldir as modeldir_module
from flowae.runtime.contract import (
    CLASS_NAMES,
    MANIFEST_RECOMMENDED,
    MANIFEST_RECOMMENDED_BY_PROVIDER,
    ROLE_ENCODER_CLASSIFIER,
    graph_file,
)
from flowae.runtime.errors import FlowaeError, ImageError, ModelLoadError
from flowae.runtime.images import load_rgb
from flowae.runtime.predictor import MAX_BATCH_SIZE, MAX_THREADS, Prediction, Predictor
from flowae.runtime.session import available_providers

REPO = Path(__file__).resolve().parents[2]
LOGIT_TOLERANCE = 1e-4  # onnxruntime vs PyTorch, fp32 (export's parity bound)


@pytest.fixture(scope="module")
def torch_model(tiny_runs):
    return model_from_checkpoint(load_checkpoint(tiny_runs["upsample"]))


@pytest.fixture(scope="module")
def images(real_jpegs, fake_root):
    fake = sorted((fake_root / "flowers-102" / "jpg").glob("*.jpg"))[:6]
    return list(real_jpegs) + fake


def torch_inputs(paths, predictor) -> torch.Tensor:
    transform = eval_transform(predictor.preprocess)
    return to_float(torch.stack([transform(load_rgb(p)) for p in paths]), predictor.preprocess)


def test_predict_matches_pytorch(predictor, torch_model, images):
    with torch.no_grad():
        logits, _ = torch_model(torch_inputs(images, predictor))
    probs = torch.softmax(logits.double(), dim=1).numpy()
    results = predictor.predict(images, top_k=5)
    assert len(results) == len(images)
    for row, top in zip(probs, results, strict=True):
        assert len(top) == 5 and all(isinstance(p, Prediction) for p in top)
        assert [p.class_name for p in top] == [CLASS_NAMES[p.label] for p in top]
        assert all(a.probability >= b.probability for a, b in zip(top, top[1:], strict=False))
        assert np.allclose([p.probability for p in top], row[[p.label for p in top]], atol=1e-5)
        assert top[0].label == int(row.argmax())


def test_infer_matches_pytorch_logits_and_latent(predictor, torch_model, images):
    inputs = torch_inputs(images[:5], predictor)
    with torch.no_grad():
        logits, latent = torch_model(inputs)
    ours_logits, ours_latent = predictor.infer(inputs.numpy())
    assert ours_latent.shape == (5, 16, 22, 22)
    assert np.abs(ours_logits - logits.numpy()).max() <= LOGIT_TOLERANCE
    assert np.abs(ours_latent - latent.numpy()).max() <= LOGIT_TOLERANCE


def test_reconstruct_matches_pytorch_decoder(predictor, torch_model, images):
    inputs = torch_inputs(images[:3], predictor)
    with torch.no_grad():
        expected = to_uint8(torch_model.decoder(torch_model(inputs)[1]), predictor.preprocess)
    expected = expected.permute(0, 2, 3, 1).numpy().astype(int)  # (B, S, S, 3)
    recons = predictor.reconstruct(images[:3])
    assert all(isinstance(r, Image.Image) and r.mode == "RGB" and r.size == (100, 100)
               for r in recons)
    for ours, theirs in zip(recons, expected, strict=True):
        assert np.abs(np.asarray(ours).astype(int) - theirs).max() <= 1  # one rounding step


def test_single_inputs_of_each_kind(predictor, images):
    path = images[0]
    by_list = predictor.predict([path], top_k=3)
    assert predictor.predict(path, top_k=3) == by_list
    assert predictor.predict(str(path), top_k=3) == by_list
    assert predictor.predict(Image.open(path), top_k=3) == by_list
    assert predictor.predict(np.asarray(Image.open(path)), top_k=3) == by_list


def test_batch_size_does_not_change_results(model_dir, predictor, images):
    one_by_one = Predictor(model_dir, provider="cpu", threads=1, batch_size=1)
    for a, b in zip(one_by_one.predict(images), predictor.predict(images), strict=True):
        assert [p.label for p in a] == [p.label for p in b]
        assert np.allclose([p.probability for p in a], [p.probability for p in b], atol=1e-6)


def test_bad_item_does_not_stop_the_batch(predictor, images, tmp_path):
    missing = tmp_path / "missing.jpg"
    sources = [images[0], missing, images[1]]
    results = list(predictor.run(sources, top_k=2))
    assert [r.ok for r in results] == [True, False, True]
    assert results[1].error == f"{missing}: no such file"
    assert results[0].top_k == tuple(predictor.predict(images[0], top_k=2)[0])
    with pytest.raises(ImageError, match="missing.jpg: no such file"):
        predictor.predict(sources)


def test_run_reports_progress(predictor, images):
    seen = []
    results = list(predictor.run(images, progress=lambda done, total: seen.append((done, total))))
    assert len(results) == len(images)
    assert seen[-1] == (len(images), len(images))
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)


def test_top_k_out_of_range_is_refused(predictor, images):
    for k in (0, len(CLASS_NAMES) + 1):
        with pytest.raises(FlowaeError, match="top_k must be between 1 and 102"):
            predictor.predict(images[:1], top_k=k)
    assert len(predictor.predict(images[:1], top_k=len(CLASS_NAMES))[0]) == len(CLASS_NAMES)


def test_eight_threads_give_the_sequential_results(model_dir, images):
    shared = Predictor(model_dir, provider="cpu", threads=2, batch_size=4)
    sequential = Predictor(model_dir, provider="cpu", threads=2, batch_size=4)
    expected = sequential.predict(images, top_k=5)
    expected_recon = [np.asarray(r) for r in sequential.reconstruct(images[:4])]
    start = threading.Barrier(8)
    outcomes: list = [None] * 8

    def work(index: int) -> None:
        start.wait()  # all eight call at once; the decoder session is built under contention
        recon = [np.asarray(r) for r in shared.reconstruct(images[:4])]
        outcomes[index] = (shared.predict(images, top_k=5), recon)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for predictions, recon in outcomes:
        assert predictions == expected  # exact: labels, names and float probabilities
        assert all(np.array_equal(a, b) for a, b in zip(recon, expected_recon, strict=True))


def test_providers_fallback_and_what_served(model_dir):
    cpu = Predictor(model_dir, provider="cpu")  # the older keyword still works
    assert cpu.provider == "CPUExecutionProvider"
    assert cpu.providers_asked == ("cpu",)
    # A fallback list: providers this onnxruntime lacks are skipped, the next one serves.
    has_cuda = "CUDAExecutionProvider" in available_providers()
    fallback = Predictor(model_dir, providers="tensorrt,cuda,cpu", threads=1)
    assert fallback.providers_asked == ("tensorrt", "cuda", "cpu")
    assert fallback.provider == ("CUDAExecutionProvider" if has_cuda else "CPUExecutionProvider")
    assert Predictor(model_dir, providers=["openvino", "cpu"]).info["provider"] == (
        "openvino" if "OpenVINOExecutionProvider" in available_providers() else "cpu")
    info = fallback.info
    assert info == {
        "model_dir": str(model_dir), "variant": "upsample", "precision": "fp32",
        "provider": "cuda" if has_cuda else "cpu", "providers_asked": ["tensorrt", "cuda", "cpu"],
        "threads": 1, "batch_size": 32, "num_classes": len(CLASS_NAMES),
        "onnxruntime": ort.__version__, "flowae": __version__,
    }
    assert __version__ == importlib.metadata.version("flowae")
    auto = Predictor(model_dir, provider="auto")
    assert auto.provider == ("CUDAExecutionProvider" if has_cuda else "CPUExecutionProvider")
    with pytest.raises(FlowaeError, match="unknown provider 'tpu'"):
        Predictor(model_dir, provider="tpu")
    if not has_cuda:
        with pytest.raises(ModelLoadError, match="provider cuda is not available"):
            Predictor(model_dir, provider="cuda")


def test_provider_options_go_to_the_first_provider(model_dir):
    """CPU's provider reports no options back, so on a CPU-only build this checks the
    routing; with CUDA present, onnxruntime itself shows the option it was given."""
    cpu = Predictor(model_dir, providers="cpu", provider_options={"arena_extend_strategy":
                                                                  "kSameAsRequested"})
    assert cpu._provider_options == {"cpu": {"arena_extend_strategy": "kSameAsRequested"}}
    assert len(cpu.predict(np.full((120, 120, 3), 90, np.uint8))[0]) == 5
    if "CUDAExecutionProvider" in available_providers():
        cuda = Predictor(model_dir, providers="cuda,cpu",
                         provider_options={"cudnn_conv_algo_search": "HEURISTIC"})
        options = cuda.encoder.session.get_provider_options()["CUDAExecutionProvider"]
        assert options["cudnn_conv_algo_search"] == "HEURISTIC"


@pytest.mark.parametrize("options, message", [
    ({"batch_size": 0}, "batch size must be from 1 to 4096, got 0"),
    ({"batch_size": MAX_BATCH_SIZE + 1}, "batch size must be from 1 to 4096, got 4097"),
    ({"threads": 0}, "threads must be from 1 to 256, got 0"),
    ({"threads": MAX_THREADS + 1}, "threads must be from 1 to 256, got 257"),
    ({"decode_workers": 10**6}, "decode workers must be from 1 to 256"),
    ({"precision": "int4"}, "precision must be auto or one of"),
    ({"provider": "cpu", "providers": "cuda"}, "give providers or provider, not both"),
])
def test_bad_options_are_refused(model_dir, options, message):
    with pytest.raises(FlowaeError, match=re.escape(message)):
        Predictor(model_dir, **options)


def test_caps_are_inclusive(model_dir, images):
    edge = Predictor(model_dir, provider="cpu", threads=1, batch_size=MAX_BATCH_SIZE)
    assert len(edge.predict(images[:2])) == 2


def test_auto_precision_is_the_manifests_choice_for_the_serving_provider(model_copy, signer):
    encoder = model_copy / graph_file(ROLE_ENCODER_CLASSIFIER)
    shutil.copy(encoder, model_copy / graph_file(ROLE_ENCODER_CLASSIFIER, "fp16"))
    signer(model_copy, **{MANIFEST_RECOMMENDED: "fp32",
                              MANIFEST_RECOMMENDED_BY_PROVIDER: {"cpu": "fp16"}})
    served = Predictor(model_copy, providers="cuda,cpu")  # falls to cpu without CUDA
    if served.info["provider"] == "cpu":
        assert served.info["precision"] == "fp16"
        assert served.files.encoder_classifier.name == "encoder_classifier.fp16.onnx"
    assert Predictor(model_copy, provider="cpu", precision="fp32").info["precision"] == "fp32"


def test_model_without_decoder_cannot_reconstruct(model_dir, tmp_path, images):
    shutil.copy(model_dir / graph_file(ROLE_ENCODER_CLASSIFIER), tmp_path)
    alone = Predictor(tmp_path, provider="cpu")
    assert len(alone.predict(images[:1])[0]) == 5
    with pytest.raises(ModelLoadError, match="cannot reconstruct"):
        alone.reconstruct(images[:1])


def test_bundled_model_is_the_default(model_dir, tmp_path, monkeypatch, images):
    monkeypatch.setattr(modeldir_module, "DEFAULT_MODEL_DIR", tmp_path / "models")
    with pytest.raises(ModelLoadError, match="no model is bundled.*pass --model"):
        Predictor()
    shutil.copytree(model_dir, tmp_path / "models")
    bundled = Predictor(provider="cpu")
    assert bundled.files.encoder_classifier.parent == tmp_path / "models"
    assert bundled.predict(images[:2]) == Predictor(model_dir, provider="cpu").predict(images[:2])


BLOCKER = """
import sys
BLOCKED = ("torch", "torchvision", "scipy", "onnx", "onnxscript", "tqdm", "flowae.models",
           "flowae.data", "flowae.train", "flowae.checkpoint", "flowae.cli", "flowae.plots",
           "flowae.distributed", "flowae.export")

class Refuse:
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ImportError(f"{name} is blocked: the runtime must not need it")
        return None

sys.meta_path.insert(0, Refuse())
"""


def test_runtime_imports_and_runs_with_torch_blocked(model_dir, images, fake_root, tmp_path):
    script = BLOCKER + textwrap.dedent(f"""
        import json
        try:
            import torch
            torch_blocked = False
        except ImportError:
            torch_blocked = True
        from click.testing import CliRunner
        from flowae.runtime.cli import main
        from flowae.runtime.evaluate import evaluate
        from flowae.runtime.predictor import Predictor

        predictor = Predictor({str(model_dir)!r}, provider="cpu")
        top = predictor.predict([{str(images[0])!r}], top_k=3)[0]
        recon = predictor.reconstruct([{str(images[0])!r}])[0]
        cli = CliRunner().invoke(main, ["--model", {str(model_dir)!r}, "--json",
                                        {str(images[1])!r}])
        report = evaluate({str(model_dir)!r}, {str(fake_root)!r}, provider="cpu")
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision",
                                                                      "scipy", "onnx"))
        print(json.dumps({{"torch_blocked": torch_blocked, "top": [list(p) for p in top],
                          "recon_size": list(recon.size), "cli_exit": cli.exit_code,
                          "cli_out": cli.output, "test_images": report["test"]["full_decode"]
                          ["images"], "loaded": loaded}}))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["torch_blocked"] is True  # the blocker works, so what follows ran without torch
    assert out["loaded"] == []
    expected = Predictor(model_dir, provider="cpu").predict(images[0], top_k=3)[0]
    assert [p[0] for p in out["top"]] == [p.label for p in expected]
    assert out["recon_size"] == [100, 100]
    assert out["cli_exit"] == 0 and json.loads(out["cli_out"])["image"] == str(images[1])
    assert out["test_images"] == 10  # the fake test split, read with the runtime's .mat reader


def test_jpeg_draft_acts_only_on_large_jpegs(model_dir, real_jpegs, fullres_root):
    fast = Predictor(model_dir, provider="cpu", jpeg_draft=True)
    exact = Predictor(model_dir, provider="cpu", jpeg_draft=False)
    assert fast.predict(real_jpegs) == exact.predict(real_jpegs)  # 160 px: never reduced
    photo = sorted((fullres_root / "jpg").glob("*.jpg"))[0]
    assert not np.array_equal(fast.load(photo), exact.load(photo))
    assert np.array_equal(exact.load(photo), np.asarray(
        eval_transform(exact.preprocess)(load_rgb(photo)).permute(1, 2, 0)))


def test_metadata_of_the_served_model(predictor, model_dir):
    from flowae.runtime.contract import Preprocess

    metadata = predictor.metadata
    assert (metadata.role, metadata.variant) == (ROLE_ENCODER_CLASSIFIER, "upsample")
    assert metadata.preprocess == Preprocess() and metadata.latent_shape == (16, 22, 22)
    assert predictor.class_names == CLASS_NAMES
    uses_real_export = (REPO / "export" / "__init__.py").is_file()
    assert (metadata.extra["exporter"] != "tests/runtime stand-in") == uses_real_export


def test_max_pixels_reaches_the_image_reader(model_dir, tmp_path):
    big = tmp_path / "big.png"  # a PNG: no reduced-size decoding can bring it under budget
    Image.new("RGB", (200, 150), (30, 140, 60)).save(big)
    assert len(Predictor(model_dir, provider="cpu").predict(big)[0]) == 5  # default budget
    strict = Predictor(model_dir, provider="cpu", max_pixels=200 * 150 - 1)
    (result,) = strict.run([big])
    assert result.error.startswith(f"{big}: image is ") and "pixel budget" in result.error
    assert len(Predictor(model_dir, provider="cpu", max_pixels=200 * 150).predict(big)[0]) == 5
    with pytest.raises(FlowaeError, match="max pixels must be >= 1, got 0"):
        Predictor(model_dir, max_pixels=0)
