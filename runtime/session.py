"""The one factory for onnxruntime sessions: provider names, fallback, threads and options.

Every part of the project that runs an ONNX (or .ort) graph (the Predictor, export's parity
gate, the benchmarks) builds its InferenceSession here, so provider choice, thread settings
and logging are decided once. Users name providers by short names ("tensorrt,cuda,cpu") or
by onnxruntime's full names; a list is a fallback order, and "auto" is every provider this
onnxruntime build offers, best first. Imports onnxruntime and the runtime's errors only.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import onnxruntime as ort

from flowae.runtime.errors import FlowaeError, ModelLoadError, first_line

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
AUTO = "auto"
# Short name -> onnxruntime's name, best first: the order "auto" tries them in.
PROVIDERS = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "migraphx": "MIGraphXExecutionProvider",
    "dml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "qnn": "QNNExecutionProvider",
    "nnapi": "NnapiExecutionProvider",
    "xnnpack": "XnnpackExecutionProvider",
    "cpu": CPU,
}
# Where a provider comes from when this onnxruntime build lacks it.
INSTALL_HINTS = {
    "tensorrt": "pip install onnxruntime-gpu (and TensorRT's libraries)",
    "cuda": "pip install onnxruntime-gpu",
    "rocm": "pip install onnxruntime-rocm",
    "migraphx": "pip install onnxruntime-migraphx",
    "dml": "pip install onnxruntime-directml (Windows)",
    "coreml": "pip install onnxruntime on macOS",
    "openvino": "pip install onnxruntime-openvino",
    "qnn": "pip install onnxruntime-qnn (Windows on Snapdragon)",
    "nnapi": "the onnxruntime-android package",
    "xnnpack": "an onnxruntime build made with --use_xnnpack",
}
_SUFFIX = "ExecutionProvider"
_BY_FULL_NAME = {full.lower(): short for short, full in PROVIDERS.items()}

ProviderOptions = Mapping[str, Mapping[str, object]] | Sequence[Mapping[str, object]]


def short_name(ort_provider: str) -> str:
    """'CUDAExecutionProvider' -> 'cuda'; a provider this module does not list loses its
    'ExecutionProvider' suffix and is lower-cased ('AzureExecutionProvider' -> 'azure')."""
    lowered = ort_provider.strip().lower()
    if lowered in PROVIDERS:
        return lowered
    if lowered in _BY_FULL_NAME:
        return _BY_FULL_NAME[lowered]
    return lowered.removesuffix(_SUFFIX.lower())


def provider_family(short_or_full: str) -> str:
    """The key a manifest uses for per-provider precision: 'cpu', 'cuda', 'tensorrt', ...
    (the provider's short name, whichever spelling was given)."""
    return short_name(short_or_full)


def available_providers() -> tuple[str, ...]:
    """onnxruntime's names of the providers this build offers, in its own order."""
    return tuple(ort.get_available_providers())


def _known() -> str:
    return ", ".join([AUTO, *PROVIDERS])


def parse_providers(spec: str | Sequence[str]) -> tuple[str, ...]:
    """'tensorrt,cuda,cpu' (or a list of names) -> ('tensorrt', 'cuda', 'cpu').

    Short names and onnxruntime's full names are accepted, in any case. "auto" (alone) is
    every provider this build offers, best first. Raises FlowaeError in one line for an
    empty list, an unknown name or a name given twice.
    """
    parts = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [str(part).strip() for part in parts]
    if not names or any(not name for name in names):
        raise FlowaeError(f"provider list {spec!r} has an empty name; known: {_known()}")
    if any(name.lower() == AUTO for name in names):
        if len(names) > 1:
            raise FlowaeError(f"provider 'auto' stands alone, got {spec!r}")
        offered = set(available_providers())
        return tuple(short for short, full in PROVIDERS.items() if full in offered)
    shorts: list[str] = []
    for name in names:
        short = short_name(name)
        if short not in PROVIDERS:
            raise FlowaeError(f"unknown provider {name!r}; known: {_known()}")
        if short in shorts:
            raise FlowaeError(f"provider {short!r} is given twice in {spec!r}")
        shorts.append(short)
    return tuple(shorts)


def resolve_providers(names: str | Sequence[str]) -> list[str]:
    """onnxruntime's names of the asked providers this build has, in the asked order: the
    fallback list a session is given. Raises ModelLoadError in one line when it has none."""
    asked = parse_providers(names)
    offered = set(available_providers())
    chosen = [PROVIDERS[short] for short in asked if PROVIDERS[short] in offered]
    missing = [short for short in asked if PROVIDERS[short] not in offered]
    if not chosen:
        hints = "; ".join(f"{short}: {INSTALL_HINTS[short]}" for short in missing
                          if short in INSTALL_HINTS)
        raise ModelLoadError(
            f"provider {','.join(asked) or AUTO} is not available in this onnxruntime "
            f"{ort.__version__} build (it has {', '.join(available_providers())}); "
            f"{hints or 'use --provider cpu'}"
        )
    if missing:
        log.info("providers not in this onnxruntime build, skipped: %s", ", ".join(missing))
    return chosen


def session_options(threads: int | None = None, *, spinning: bool = True) -> ort.SessionOptions:
    """Options for one session: errors-only logging, `threads` intra-op threads (None: one
    per core), and no busy-waiting threads when `spinning` is off (benchmarks that time
    another engine in the same process turn it off so the two do not fight for cores)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: onnxruntime's warnings are not the user's
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def ort_provider_options(chosen: Sequence[str], asked: Sequence[str],
                         provider_options: ProviderOptions | None) -> list[dict[str, str]]:
    """The option list onnxruntime gets, one dict per `chosen` provider (full names).

    `provider_options` is {provider: {key: value}} (short or full names) or a list aligned
    with `asked` (the providers as asked, before those this build lacks were dropped).
    Values become strings, as onnxruntime wants them; options of a dropped provider go too.
    """
    if not provider_options:
        return [{} for _ in chosen]
    if isinstance(provider_options, Mapping):
        pairs = list(provider_options.items())
    else:
        if len(provider_options) != len(asked):
            raise FlowaeError(f"{len(provider_options)} provider option sets for "
                              f"{len(asked)} providers; give one per provider, or a mapping")
        pairs = list(zip(asked, provider_options, strict=True))
    options: dict[str, dict[str, str]] = {}
    for name, values in pairs:
        short = short_name(name)
        if short not in PROVIDERS:
            raise FlowaeError(f"provider options for unknown provider {name!r}; known: "
                              f"{', '.join(PROVIDERS)}")
        options[PROVIDERS[short]] = {str(k): str(v) for k, v in dict(values).items()}
    return [options.get(name, {}) for name in chosen]


@functools.cache
def preload_cuda_libraries() -> None:
    """Load CUDA and cuDNN from pip's nvidia-* wheels (onnxruntime-gpu[cuda,cudnn]) before a
    CUDA or TensorRT session: onnxruntime-gpu finds them only once loaded, which an
    `import torch` does elsewhere but the runtime never does. Once per process; what
    onnxruntime prints about libraries it cannot find is logged, never printed."""
    preload = getattr(ort, "preload_dlls", None)  # onnxruntime >= 1.21
    if preload is None:
        return
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            preload()
    except (OSError, RuntimeError) as exc:
        log.info("onnxruntime.preload_dlls failed: %s", first_line(exc))
    if printed.getvalue().strip():
        log.info("onnxruntime.preload_dlls: %s", " ".join(printed.getvalue().split()))


def create_session(
    path: str | os.PathLike,
    *,
    providers: str | Sequence[str] = (CPU,),
    provider_options: ProviderOptions | None = None,
    threads: int | None = None,
    spinning: bool = True,
) -> ort.InferenceSession:
    """An InferenceSession for the ONNX or .ort file at `path`.

    providers: a fallback list (short or full names, or "auto"); those this build lacks are
    skipped, as resolve_providers says. provider_options: {provider: {key: value}} or a list
    aligned with `providers`. Raises ModelLoadError in one line when the file does not load
    or onnxruntime starts none of the asked providers.
    """
    path = Path(path)
    asked = parse_providers(providers)
    chosen = resolve_providers(asked)
    options = ort_provider_options(chosen, [PROVIDERS[short] for short in asked],
                                   provider_options)
    if PROVIDERS["cuda"] in chosen or PROVIDERS["tensorrt"] in chosen:
        preload_cuda_libraries()
    # When a provider fails to start, onnxruntime's Python layer prints its fall-back notice
    # on stdout (where `flowae-infer --json` writes results): caught here and logged instead.
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed) if chosen != [CPU] else contextlib.nullcontext():
            session = ort.InferenceSession(
                str(path), session_options(threads, spinning=spinning), providers=chosen,
                provider_options=options,
            )
    except Exception as exc:  # onnxruntime's errors subclass Exception directly
        raise ModelLoadError(f"{path}: not a loadable ONNX model ({first_line(exc)})") from exc
    finally:
        if printed.getvalue().strip():
            log.warning("onnxruntime: %s", " ".join(printed.getvalue().split()))
    started = [name for name in chosen if name in session.get_providers()]
    if not started:  # e.g. CUDA asked alone, its libraries missing: onnxruntime fell to CPU
        raise ModelLoadError(
            f"{path}: onnxruntime could not start {', '.join(chosen)} (it ran "
            f"{', '.join(session.get_providers())}); check the provider's libraries"
        )
    return session
