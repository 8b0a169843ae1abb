"""The session factory: provider names, fallback lists, options, and the errors a user sees.

Real onnxruntime sessions on the bundled model's real graphs. This machine's onnxruntime has
the CPU provider only, so fallback is tested as "ask for GPUs first, get the CPU"; the tests
that need a provider this build lacks check which one that is first.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from flowae.runtime.contract import INPUT_IMAGE, OUTPUT_LOGITS
from flowae.runtime.errors import FlowaeError, ModelLoadError
from flowae.runtime.modeldir import DEFAULT_MODEL_DIR
from flowae.runtime.session import (
    CPU,
    PROVIDERS,
    create_session,
    ort_provider_options,
    parse_providers,
    provider_family,
    resolve_providers,
    short_name,
)

ENCODER = DEFAULT_MODEL_DIR / "encoder_classifier.onnx"
OFFERED = set(ort.get_available_providers())


def _needs_missing(short: str) -> None:
    if PROVIDERS[short] in OFFERED:
        pytest.skip(f"this onnxruntime build has {short}; the test needs one without it")


def _logits(session: ort.InferenceSession) -> np.ndarray:
    image = np.random.default_rng(0).standard_normal((2, 3, 100, 100)).astype(np.float32)
    (logits,) = session.run([OUTPUT_LOGITS], {INPUT_IMAGE: image})
    return logits


def test_short_and_full_names_parse_to_short_names_in_order():
    assert parse_providers("tensorrt,cuda,cpu") == ("tensorrt", "cuda", "cpu")
    assert parse_providers(" CUDA , CPUExecutionProvider") == ("cuda", "cpu")
    assert parse_providers(["OpenVINOExecutionProvider", "xnnpack"]) == ("openvino", "xnnpack")
    assert short_name("TensorrtExecutionProvider") == "tensorrt"
    assert short_name("AzureExecutionProvider") == "azure"  # not ours: the suffix goes
    assert provider_family("CUDAExecutionProvider") == provider_family("cuda") == "cuda"


def test_auto_is_every_offered_provider_best_first():
    auto = parse_providers("auto")
    assert auto[-1] == "cpu"
    assert {PROVIDERS[s] for s in auto} == OFFERED & set(PROVIDERS.values())
    order = list(PROVIDERS)
    assert sorted(auto, key=order.index) == list(auto)


@pytest.mark.parametrize("spec, message", [
    ("tpu", r"unknown provider 'tpu'; known: auto, tensorrt, cuda, .*, cpu$"),
    ("cuda,cuda", r"provider 'cuda' is given twice"),
    ("cuda,CUDAExecutionProvider", r"provider 'cuda' is given twice"),
    ("cuda,,cpu", r"has an empty name"),
    ("", r"has an empty name"),
    ("auto,cpu", r"'auto' stands alone"),
])
def test_bad_provider_lists_are_refused_in_one_line(spec, message):
    with pytest.raises(FlowaeError, match=message) as caught:
        parse_providers(spec)
    assert "\n" not in str(caught.value)


def test_fallback_list_keeps_what_this_build_has_in_the_asked_order():
    _needs_missing("tensorrt")
    _needs_missing("cuda")
    assert resolve_providers("tensorrt,cuda,cpu") == [CPU]
    session = create_session(ENCODER, providers="tensorrt,cuda,cpu", threads=1)
    assert session.get_providers() == [CPU]
    assert _logits(session).shape == (2, 102)


@pytest.mark.parametrize("short, package", [("cuda", "onnxruntime-gpu"),
                                            ("tensorrt", "onnxruntime-gpu"),
                                            ("openvino", "onnxruntime-openvino")])
def test_a_missing_provider_alone_names_the_package_that_has_it(short, package):
    _needs_missing(short)
    with pytest.raises(ModelLoadError) as caught:
        resolve_providers(short)
    message = str(caught.value)
    assert "\n" not in message
    assert f"provider {short} is not available" in message and package in message
    assert CPU in message  # what the build does have
    with pytest.raises(ModelLoadError, match=package):
        create_session(ENCODER, providers=[PROVIDERS[short]])


def test_sessions_from_short_full_and_auto_names_agree():
    by_short = _logits(create_session(ENCODER, providers="cpu", threads=1))
    by_full = _logits(create_session(ENCODER, providers=[CPU], threads=1))
    by_auto = _logits(create_session(ENCODER, providers="auto", threads=1, spinning=False))
    np.testing.assert_array_equal(by_short, by_full)
    np.testing.assert_allclose(by_auto, by_short, rtol=0, atol=1e-5)


def test_provider_options_go_to_the_provider_they_name():
    chosen, asked = [CPU], ["CUDAExecutionProvider", CPU]
    # By name (short or full), or as a list aligned with the providers as asked; the options
    # of a provider this build lacks go with it, values become strings.
    assert ort_provider_options(chosen, asked, {"cpu": {"arena_extend_strategy": 1}}) == [
        {"arena_extend_strategy": "1"}]
    assert ort_provider_options(chosen, asked, [{"device_id": 0}, {"a": "b"}]) == [{"a": "b"}]
    assert ort_provider_options(["CUDAExecutionProvider", CPU], asked,
                                {"CUDAExecutionProvider": {"device_id": 1}}) == [
        {"device_id": "1"}, {}]
    assert ort_provider_options(chosen, asked, None) == [{}]
    with pytest.raises(FlowaeError, match="1 provider option sets for 2 providers"):
        ort_provider_options(chosen, asked, [{}])
    with pytest.raises(FlowaeError, match="options for unknown provider 'gpu'"):
        ort_provider_options(chosen, asked, {"gpu": {}})


def test_a_real_cpu_option_reaches_a_working_session():
    session = create_session(ENCODER, providers="cpu", threads=1,
                             provider_options={"cpu": {"arena_extend_strategy":
                                                       "kSameAsRequested"}})
    plain = create_session(ENCODER, providers="cpu", threads=1)
    np.testing.assert_array_equal(_logits(session), _logits(plain))


def test_threads_and_spinning_reach_the_session_options():
    session = create_session(ENCODER, threads=1, spinning=False)
    options = session.get_session_options()
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (1, 1)
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_a_file_that_is_not_a_model_is_one_line_model_load_error(tmp_path):
    bad = tmp_path / "encoder_classifier.onnx"
    bad.write_bytes(b"\x00not a protobuf" * 10)
    with pytest.raises(ModelLoadError, match=r"encoder_classifier\.onnx: not a loadable") as err:
        create_session(bad)
    assert "\n" not in str(err.value)
    with pytest.raises(ModelLoadError, match="not a loadable"):
        create_session(tmp_path / "missing.onnx")
