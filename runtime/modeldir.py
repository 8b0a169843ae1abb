"""A model directory: which graph files to serve, and proof that they are the ones exported.

flowae-export writes graphs (`encoder_classifier[.PRECISION].onnx|.ort`, `decoder...`) and
`manifest.json`, which records each file's size and sha256 and the precision to serve on
each provider family. `resolve_model` picks the files for a precision, provider and format,
and verifies every file it returns against the manifest (size, then a streamed sha256)
before anything loads it; a directory without a manifest still loads, with a warning.
Without an explicit model it serves the one bundled as package data in runtime/models/.
Imports the standard library, the contract, the errors and runtime.session's provider names.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from flowae.runtime.contract import (
    GRAPH_FORMATS,
    GRAPH_IO,
    MANIFEST_FILES,
    MANIFEST_NAME,
    MANIFEST_RECOMMENDED,
    MANIFEST_RECOMMENDED_BY_PROVIDER,
    PRECISIONS,
    ROLE_DECODER,
    ROLE_ENCODER_CLASSIFIER,
    graph_file,
)
from flowae.runtime.errors import FlowaeError, ModelLoadError
from flowae.runtime.session import available_providers, parse_providers, provider_family

log = logging.getLogger(__name__)

# Package data: where an installed flowae keeps the model it serves without --model.
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "models"
FORMATS = ("auto", *GRAPH_FORMATS)  # auto: .onnx graphs when present, else .ort
CPU_FAMILY = "cpu"
_HASH_CHUNK_BYTES = 1 << 20
_NOT_VERIFIED = "graphs not verified"


@dataclass(frozen=True)
class ModelFiles:
    """The graph files of one model, the precision they were chosen in, and whether the
    manifest vouched for them (False: no manifest, so nothing was checked)."""

    encoder_classifier: Path
    decoder: Path | None  # None: this model cannot reconstruct
    precision: str
    model_dir: Path | None  # the directory the files came from
    verified: bool


def read_manifest(model_dir: str | os.PathLike) -> dict:
    """The directory's manifest.json as a dict; {} when there is none."""
    path = Path(model_dir) / MANIFEST_NAME
    if not path.exists() and not path.is_symlink():
        return {}
    if not path.is_file():  # a directory, FIFO or dangling link in its place hides nothing
        raise ModelLoadError(f"{path}: not a regular file; a model directory's manifest must be")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path}: unreadable manifest ({exc})") from exc
    if not isinstance(manifest, dict):
        raise ModelLoadError(f"{path}: manifest is not a JSON object")
    return manifest


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB pieces (a graph is never held twice in memory)."""
    digest = hashlib.sha256()
    buffer = bytearray(_HASH_CHUNK_BYTES)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while count := handle.readinto(buffer):
            digest.update(view[:count])
    return digest.hexdigest()


def verify_files(model_dir: str | os.PathLike, manifest: dict, names: Iterable[str]) -> None:
    """Check each named file of `model_dir` against the manifest: listed, same size, same
    sha256. Raises ModelLoadError in one line naming the first file that fails."""
    model_dir = Path(model_dir)
    listed = manifest.get(MANIFEST_FILES)
    if not isinstance(listed, dict):
        listed = {}
    for name in names:
        path = model_dir / name
        entry = listed.get(name)
        if not isinstance(entry, dict):
            raise ModelLoadError(f"{path}: not listed in {MANIFEST_NAME}, so it cannot be "
                                 "verified (refusing a graph the export did not write)")
        expected_sha, expected_size = entry.get("sha256"), entry.get("size_bytes")
        if not isinstance(expected_sha, str) or not isinstance(expected_size, int):
            raise ModelLoadError(f"{path}: {MANIFEST_NAME} lacks its sha256 or size_bytes")
        try:
            size = path.stat().st_size
            if size != expected_size:
                raise ModelLoadError(
                    f"{path}: {size} bytes, {MANIFEST_NAME} says {expected_size} (tampered or "
                    "incomplete copy)")
            digest = sha256_of(path)
        except OSError as exc:
            raise ModelLoadError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
        if digest != expected_sha.lower():
            raise ModelLoadError(f"{path}: sha256 does not match {MANIFEST_NAME} (tampered or "
                                 "incomplete copy)")


def _family(provider: str | list[str] | tuple[str, ...]) -> str:
    """The family of the provider that will run: the first of the asked ones this build has
    (the first asked when it has none; creating the session then says why)."""
    asked = parse_providers(provider)
    offered = {provider_family(name) for name in available_providers()}
    return next((short for short in asked if short in offered), asked[0] if asked else "cpu")


def _precision_value(value: object, where: str) -> str:
    if value not in PRECISIONS:
        raise ModelLoadError(f"{where}: precision {value!r} is not one of {PRECISIONS}")
    return str(value)


def auto_precision(manifest: dict, family: str, present: set[str], where: Path) -> str:
    """The precision "auto" serves on a provider family: the manifest's choice for that
    family; else, off the CPU, fp16 when its file is present or fp32 (int8 QDQ graphs run
    slowly or not at all on CUDA and TensorRT); else the manifest's recommended precision."""
    by_provider = manifest.get(MANIFEST_RECOMMENDED_BY_PROVIDER)
    if isinstance(by_provider, dict) and family in by_provider:
        return _precision_value(by_provider[family],
                                f"{where} {MANIFEST_RECOMMENDED_BY_PROVIDER}[{family!r}]")
    if family != CPU_FAMILY:
        return "fp16" if "fp16" in present else "fp32"
    return _precision_value(manifest.get(MANIFEST_RECOMMENDED, "fp32"),
                            f"{where} {MANIFEST_RECOMMENDED}")


def _format_of(path: Path) -> str:
    return "ort" if path.suffix == ".ort" else "onnx"


def _precision_of(path: Path) -> str:
    for precision in PRECISIONS:
        for fmt in GRAPH_FORMATS:
            if any(path.name == graph_file(role, precision, fmt) for role in GRAPH_IO):
                return precision
    return "fp32"


def _decoder_beside(folder: Path, precision: str, fmt: str) -> Path | None:
    """The decoder in `precision`, else the fp32 one (int8 quantizes the classifier only)."""
    for wanted in (precision, "fp32"):
        candidate = graph_file(ROLE_DECODER, wanted, fmt)
        if (folder / candidate).is_file():
            return folder / candidate
    return None


def _checked(files: ModelFiles, manifest: dict, folder: Path) -> ModelFiles:
    """Verify `files` against the manifest in `folder`, or warn that there is none."""
    names = [files.encoder_classifier.name] + ([files.decoder.name] if files.decoder else [])
    if not (folder / MANIFEST_NAME).exists():
        log.warning("%s: no %s: %s", folder, MANIFEST_NAME, _NOT_VERIFIED)
        return files
    verify_files(folder, manifest, names)
    return ModelFiles(files.encoder_classifier, files.decoder, files.precision,
                      files.model_dir, verified=True)


def _check_arguments(precision: str, fmt: str) -> None:
    if precision != "auto" and precision not in PRECISIONS:
        raise FlowaeError(f"precision must be auto or one of {PRECISIONS}, got {precision!r}")
    if fmt not in FORMATS:
        raise FlowaeError(f"format must be one of {FORMATS}, got {fmt!r}")


def _one_file(path: Path, precision: str, fmt: str) -> ModelFiles:
    """An encoder_classifier file given alone: the decoder, if any, lies beside it, and so
    does the manifest that verifies both when there is one."""
    found = _format_of(path)
    if fmt not in ("auto", found):
        raise FlowaeError(f"{path}: is an .{found} file, but format {fmt!r} was asked")
    chosen = precision if precision != "auto" else _precision_of(path)
    files = ModelFiles(path, _decoder_beside(path.parent, chosen, found), chosen,
                       path.parent, verified=False)
    return _checked(files, read_manifest(path.parent), path.parent)


def resolve_model(model: str | os.PathLike | None = None, precision: str = "auto",
                  provider: str | list[str] | tuple[str, ...] = "cpu", fmt: str = "auto"
                  ) -> ModelFiles:
    """Find and verify the graph files: a model directory, an encoder_classifier file, or the
    bundled model (None).

    precision "auto" takes the manifest's choice for `provider`'s family (see
    auto_precision); `provider` may be a fallback list, whose first provider this build has
    decides. fmt "auto" serves .onnx graphs when present, else .ort ones; "onnx" or "ort"
    insists. Every returned file is checked against manifest.json (size and sha256); a file
    it does not list, or that differs, is refused; without a manifest a warning is logged.
    """
    _check_arguments(precision, fmt)
    if model is None:
        if not any((DEFAULT_MODEL_DIR / graph_file(ROLE_ENCODER_CLASSIFIER, "fp32", f)).is_file()
                   for f in GRAPH_FORMATS):
            raise ModelLoadError(
                f"no model is bundled with this install ({DEFAULT_MODEL_DIR} holds none); "
                "pass --model MODEL_DIR written by flowae-export"
            )
        model = DEFAULT_MODEL_DIR
    path = Path(model)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such model file or directory")
    if path.is_file():
        return _one_file(path, precision, fmt)
    manifest = read_manifest(path)
    formats = GRAPH_FORMATS if fmt == "auto" else (fmt,)
    for chosen_fmt in formats:  # .onnx first: a mobile bundle may hold only .ort graphs
        present = {p for p in PRECISIONS
                   if (path / graph_file(ROLE_ENCODER_CLASSIFIER, p, chosen_fmt)).is_file()}
        if present:
            break
    else:
        raise ModelLoadError(f"{path}: no encoder_classifier graph "
                             f"({' or '.join('.' + f for f in formats)}) in this directory")
    if precision == "auto":
        precision = auto_precision(manifest, _family(provider), present, path / MANIFEST_NAME)
        if precision not in present:  # e.g. a mobile bundle that kept the fp32 .ort graphs
            fallback = "fp32" if "fp32" in present else sorted(present)[0]
            log.info("%s: no %s graph in .%s; serving %s", path, precision, chosen_fmt, fallback)
            precision = fallback
    encoder = path / graph_file(ROLE_ENCODER_CLASSIFIER, precision, chosen_fmt)
    if not encoder.is_file():
        raise ModelLoadError(f"{path}: no {encoder.name} in this model directory")
    files = ModelFiles(encoder, _decoder_beside(path, precision, chosen_fmt), precision, path,
                       verified=False)
    return _checked(files, manifest, path)
