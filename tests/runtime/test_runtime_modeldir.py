"""Model directories: manifest verification, precision per provider, and .onnx vs .ort graphs.

Every test works on a copy of a real exported model (the bundled res32, which holds fp32,
int8 and fp16 graphs, or the tiny export the runtime fixtures write) and edits its files or
manifest as a user's copy might be damaged or as another export would write it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from flowae.runtime.contract import (
    INPUT_IMAGE,
    MANIFEST_FILES,
    MANIFEST_NAME,
    MANIFEST_RECOMMENDED,
    MANIFEST_RECOMMENDED_BY_PROVIDER,
    METADATA_KEY,
    ROLE_DECODER,
    ROLE_ENCODER_CLASSIFIER,
    ModelMetadata,
    graph_file,
)
from flowae.runtime.errors import FlowaeError, ModelLoadError
from flowae.runtime.modeldir import DEFAULT_MODEL_DIR, read_manifest, resolve_model, verify_files
from flowae.runtime.session import create_session

ENCODER = graph_file(ROLE_ENCODER_CLASSIFIER)
DECODER = graph_file(ROLE_DECODER)
BY_PROVIDER = {"cpu": "int8", "cuda": "fp16", "tensorrt": "fp16", "openvino": "fp32"}


@pytest.fixture
def bundle(tmp_path) -> Path:
    """A private copy of the bundled model directory (fp32, int8, fp16 and manifest.json)."""
    return Path(shutil.copytree(DEFAULT_MODEL_DIR, tmp_path / "model"))


def edit_manifest(model_dir: Path, **changes) -> dict:
    """Set (value) or drop (None) top-level manifest keys."""
    manifest = read_manifest(model_dir)
    for key, value in changes.items():
        if value is None:
            manifest.pop(key, None)
        else:
            manifest[key] = value
    (model_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
    return manifest


def list_in_manifest(model_dir: Path, path: Path) -> None:
    """Record a file in the manifest as export does: its size and sha256."""
    manifest = read_manifest(model_dir)
    manifest[MANIFEST_FILES][path.name] = {
        "size_bytes": path.stat().st_size,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    (model_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))


def to_ort(onnx_path: Path, out_dir: Path) -> Path:
    """Convert with onnxruntime's own converter, as a user building a mobile bundle would."""
    from onnxruntime.tools.convert_onnx_models_to_ort import (
        OptimizationStyle,
        convert_onnx_models_to_ort,
    )

    work = out_dir / f".convert-{onnx_path.stem}"
    work.mkdir(parents=True)
    shutil.copy(onnx_path, work / onnx_path.name)
    convert_onnx_models_to_ort(work, output_dir=work, optimization_styles=[OptimizationStyle.Fixed])
    target = out_dir / onnx_path.with_suffix(".ort").name
    shutil.move(work / target.name, target)
    shutil.rmtree(work)
    return target


def test_the_bundled_model_verifies_and_serves_its_cpu_choice():
    files = resolve_model()
    assert files.verified and files.model_dir == DEFAULT_MODEL_DIR
    manifest = read_manifest(DEFAULT_MODEL_DIR)
    assert files.precision == manifest.get(MANIFEST_RECOMMENDED_BY_PROVIDER, {}).get(
        "cpu", manifest[MANIFEST_RECOMMENDED])
    assert files.encoder_classifier.name == graph_file(ROLE_ENCODER_CLASSIFIER, files.precision)


def test_a_model_export_writes_verifies(model_dir):
    files = resolve_model(model_dir)
    assert files.verified
    assert (files.encoder_classifier, files.decoder) == (model_dir / ENCODER, model_dir / DECODER)


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_bytes(p.read_bytes()[:-100]), r"bytes, manifest\.json says"),
    (lambda p: p.write_bytes(p.read_bytes()[:-1] + bytes([p.read_bytes()[-1] ^ 1])),
     r"sha256 does not match manifest\.json \(tampered or incomplete copy\)"),
])
def test_a_damaged_graph_is_refused_naming_the_file(bundle, damage, message):
    damage(bundle / DECODER)
    with pytest.raises(ModelLoadError, match=rf"decoder\.onnx: .*{message}") as caught:
        resolve_model(bundle, precision="fp32")
    assert "\n" not in str(caught.value)
    damage(bundle / ENCODER)
    with pytest.raises(ModelLoadError, match=rf"encoder_classifier\.onnx: .*{message}"):
        resolve_model(bundle / ENCODER)  # one file given alone: checked by the manifest beside
    assert resolve_model(bundle, precision="int8").verified  # the other graphs still serve


def test_a_graph_the_manifest_does_not_list_is_refused(bundle):
    manifest = read_manifest(bundle)
    del manifest[MANIFEST_FILES][DECODER]
    (bundle / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ModelLoadError, match=r"decoder\.onnx: not listed in manifest\.json"):
        resolve_model(bundle, precision="fp32")
    edit_manifest(bundle, **{MANIFEST_FILES: None})
    with pytest.raises(ModelLoadError, match="not listed"):
        resolve_model(bundle, precision="int8")
    entry = {"size_bytes": (bundle / ENCODER).stat().st_size}  # no sha256
    with pytest.raises(ModelLoadError, match="lacks its sha256"):
        verify_files(bundle, {MANIFEST_FILES: {ENCODER: entry}}, [ENCODER])


def test_without_a_manifest_graphs_load_unverified_with_a_warning(bundle, caplog):
    (bundle / MANIFEST_NAME).unlink()
    with caplog.at_level(logging.WARNING, logger="flowae.runtime.modeldir"):
        files = resolve_model(bundle)
        alone = resolve_model(bundle / ENCODER)
    assert not files.verified and not alone.verified
    assert files.precision == "fp32"  # nothing recommends another
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2 and all("no manifest.json: graphs not verified" in w
                                      for w in warnings)
    assert create_session(files.encoder_classifier).get_inputs()[0].name == INPUT_IMAGE


def test_auto_precision_follows_the_manifest_per_provider(bundle):
    edit_manifest(bundle, **{MANIFEST_RECOMMENDED_BY_PROVIDER: BY_PROVIDER})
    for provider, expected in [("cpu", "int8"), ("cuda", "fp16"), ("tensorrt", "fp16"),
                               ("openvino", "fp32"), ("CUDAExecutionProvider", "fp16")]:
        files = resolve_model(bundle, provider=provider)
        assert (files.precision, files.verified) == (expected, True), provider
        assert files.encoder_classifier.name == graph_file(ROLE_ENCODER_CLASSIFIER, expected)
        assert files.decoder.name == graph_file(ROLE_DECODER, expected)
    # A fallback list is decided by its first provider this build has (here: the CPU).
    has_gpu = "CUDAExecutionProvider" in ort.get_available_providers()
    assert resolve_model(bundle, provider="tensorrt,cuda,cpu").precision == (
        "fp16" if has_gpu else "int8")
    assert resolve_model(bundle, precision="fp32", provider="cuda").precision == "fp32"
    edit_manifest(bundle, **{MANIFEST_RECOMMENDED_BY_PROVIDER: {"cuda": "int4"}})
    with pytest.raises(ModelLoadError, match=r"recommended_precision_by_provider\['cuda'\]"):
        resolve_model(bundle, provider="cuda")


def test_auto_precision_off_the_cpu_never_serves_int8_without_a_manifest_choice(bundle):
    edit_manifest(bundle, **{MANIFEST_RECOMMENDED_BY_PROVIDER: None, MANIFEST_RECOMMENDED: "int8"})
    assert resolve_model(bundle, provider="cpu").precision == "int8"  # the old key, on CPU
    assert resolve_model(bundle, provider="cuda").precision == "fp16"
    for name in (graph_file(ROLE_ENCODER_CLASSIFIER, "fp16"), graph_file(ROLE_DECODER, "fp16")):
        (bundle / name).unlink()
    files = resolve_model(bundle, provider="tensorrt")
    assert files.precision == "fp32" and files.encoder_classifier.name == ENCODER


def test_ort_graphs_serve_when_onnx_ones_are_absent_or_when_asked(bundle):
    for name in (ENCODER, DECODER):
        list_in_manifest(bundle, to_ort(bundle / name, bundle))
    ort_encoder = bundle / graph_file(ROLE_ENCODER_CLASSIFIER, "fp32", "ort")
    files = resolve_model(bundle, precision="fp32", fmt="ort")
    assert (files.encoder_classifier, files.decoder) == (
        ort_encoder, bundle / graph_file(ROLE_DECODER, "fp32", "ort"))
    assert files.verified
    assert resolve_model(bundle, precision="fp32").encoder_classifier == bundle / ENCODER
    # int8 has no .ort graph: asked for in .ort, it is missing by name.
    with pytest.raises(ModelLoadError, match=r"no encoder_classifier\.int8\.ort"):
        resolve_model(bundle, precision="int8", fmt="ort")
    mobile = bundle.parent / "mobile"  # a bundle of .ort graphs only
    mobile.mkdir()
    for path in (files.encoder_classifier, files.decoder, bundle / MANIFEST_NAME):
        shutil.copy(path, mobile)
    served = resolve_model(mobile)  # the manifest recommends int8, which has no .ort here
    assert (served.encoder_classifier, served.precision) == (mobile / ort_encoder.name, "fp32")
    assert served.verified
    with pytest.raises(ModelLoadError, match=r"no encoder_classifier graph \(\.onnx\)"):
        resolve_model(mobile, fmt="onnx")
    with pytest.raises(FlowaeError, match=r"is an \.ort file, but format 'onnx' was asked"):
        resolve_model(ort_encoder, fmt="onnx")


def test_an_unlisted_ort_graph_is_refused(bundle):
    ort_encoder = to_ort(bundle / ENCODER, bundle)
    with pytest.raises(ModelLoadError, match=r"encoder_classifier\.ort: not listed"):
        resolve_model(bundle, precision="fp32", fmt="ort")
    with pytest.raises(ModelLoadError, match="not listed"):
        resolve_model(ort_encoder)


def test_an_ort_graph_gives_the_onnx_outputs_and_keeps_its_metadata(bundle):
    ort_path = to_ort(bundle / ENCODER, bundle)
    converted = create_session(ort_path, threads=1)
    # The converter optimizes like a default session but leaves out the CPU-specific NCHWc
    # layout; a session of the .onnx file made the same way gives bit-identical outputs.
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    reference = ort.InferenceSession(str(bundle / ENCODER), options,
                                     providers=["CPUExecutionProvider"],
                                     disabled_optimizers=["NchwcTransformer"])
    image = np.random.default_rng(0).standard_normal((3, 3, 100, 100)).astype(np.float32)
    for got, want in zip(converted.run(None, {INPUT_IMAGE: image}),
                         reference.run(None, {INPUT_IMAGE: image}), strict=True):
        np.testing.assert_array_equal(got, want)
    text = converted.get_modelmeta().custom_metadata_map[METADATA_KEY]
    original = create_session(bundle / ENCODER).get_modelmeta().custom_metadata_map
    assert text == original[METADATA_KEY]
    assert ModelMetadata.from_json(text).role == ROLE_ENCODER_CLASSIFIER


def test_bad_arguments_are_refused_before_any_file_is_read(tmp_path):
    for kwargs, message in [({"precision": "int4"}, "precision must be auto or one of"),
                            ({"fmt": "tflite"}, "format must be one of"),
                            ({"provider": "tpu"}, "unknown provider 'tpu'")]:
        with pytest.raises(FlowaeError, match=message):
            resolve_model(DEFAULT_MODEL_DIR, **kwargs)
    with pytest.raises(ModelLoadError, match="no such model file or directory"):
        resolve_model(tmp_path / "nothing")
    with pytest.raises(ModelLoadError, match=r"no encoder_classifier graph \(\.onnx or \.ort\)"):
        resolve_model(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ModelLoadError, match="unreadable manifest"):
        resolve_model(tmp_path)
