"""The device predictor: exported ONNX graphs in, top-k flower names and reconstructions out.

`Predictor` loads a model directory written by flowae-export (or one encoder_classifier file),
checks each graph against the contract, and keeps one cached onnxruntime InferenceSession per
graph (the decoder's on first use). It takes paths, PIL images and uint8 arrays, decodes them
on a small thread pool (Pillow releases the GIL) while the model runs on the previous batch,
and is safe to call from many threads at once: sessions are only read after they are built,
and each call keeps its own state. Without an explicit model it serves the one bundled as
package data in runtime/models/. Imports onnxruntime, numpy, Pillow and the runtime only.
"""

from __future__ import annotations

import glob
import json
import os
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnxruntime as ort
from PIL import Image

from flowae.runtime.contract import (
    GRAPH_IO,
    MANIFEST_NAME,
    MANIFEST_RECOMMENDED,
    METADATA_KEY,
    PRECISIONS,
    ROLE_DECODER,
    ROLE_ENCODER_CLASSIFIER,
    ModelMetadata,
    graph_file,
)
from flowae.runtime.errors import ContractError, FlowaeError, ImageError, ModelLoadError
from flowae.runtime.preprocess import ImageSource, denormalize, describe, load_pixels, normalize

# Package data: where an installed flowae keeps the model it serves without --model.
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "models"
PROVIDERS = ("auto", "cpu", "cuda")
_ORT_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
DEFAULT_BATCH_SIZE = 32  # images per model call; larger only adds memory on this small model
# Reduced-size JPEG decoding is the default: the rule (test-split top-1 may drop by at
# most 0.2 points) holds, with a drop of 0.00 points, because the test split's 160 px photos
# are never reduced for a 100 px model. On the 306 full-size photos, where it acts, top-1 was
# 28.43% with it vs 27.78% without (13 of 306 top-1 answers changed) on a short-trained
# `upsample` model, and decoding took 0.95 instead of 2.50 ms per photo (p50).
# Measure again with `flowae-infer --evaluate DATA_ROOT --fullres DIR` for a new model.
DEFAULT_JPEG_DRAFT = True

ProgressFn = Callable[[int, int], None]  # (images done, images in total)


class Prediction(NamedTuple):
    """One entry of an image's top-k: label index, class name, softmax probability."""

    label: int
    class_name: str
    probability: float


@dataclass(frozen=True)
class ImageResult:
    """What happened to one input: its top-k, or a one-line error; reconstruction on request."""

    source: ImageSource
    top_k: tuple[Prediction, ...] = ()
    error: str | None = None
    model_input: Image.Image | None = None  # (S, S) RGB crop the model saw; with reconstruct
    reconstruction: Image.Image | None = None  # (S, S) RGB decoder output; with reconstruct

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def name(self) -> str:
        return describe(self.source)


@dataclass(frozen=True)
class ModelFiles:
    """The graph files of one model and the precision they were chosen in."""

    encoder_classifier: Path
    decoder: Path | None  # None: this model cannot reconstruct
    precision: str


def _read_manifest(model_dir: Path) -> dict:
    path = model_dir / MANIFEST_NAME
    if not path.is_file():
        return {}
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path}: unreadable manifest ({exc})") from exc
    if not isinstance(manifest, dict):
        raise ModelLoadError(f"{path}: manifest is not a JSON object")
    return manifest


def resolve_model(model: str | os.PathLike | None = None, precision: str = "auto") -> ModelFiles:
    """Find the graph files: a model directory, an encoder_classifier file, or the bundled model.

    precision "auto" takes the manifest's recommended precision (fp32 without a manifest).
    """
    if precision != "auto" and precision not in PRECISIONS:
        raise FlowaeError(f"precision must be auto or one of {PRECISIONS}, got {precision!r}")
    if model is None:
        if not (DEFAULT_MODEL_DIR / graph_file(ROLE_ENCODER_CLASSIFIER)).is_file():
            raise ModelLoadError(
                f"no model is bundled with this install ({DEFAULT_MODEL_DIR} holds none); "
                "pass --model MODEL_DIR written by flowae-export"
            )
        model = DEFAULT_MODEL_DIR
    path = Path(model)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such model file or directory")
    if path.is_file():  # one graph file: the decoder, if any, lies beside it
        chosen = precision if precision != "auto" else _precision_of(path)
        decoder = path.parent / graph_file(ROLE_DECODER, chosen)
        return ModelFiles(path, decoder if decoder.is_file() else None, chosen)
    if precision == "auto":
        precision = str(_read_manifest(path).get(MANIFEST_RECOMMENDED, "fp32"))
        if precision not in PRECISIONS:
            raise ModelLoadError(
                f"{path / MANIFEST_NAME}: recommended precision {precision!r} is not one of "
                f"{PRECISIONS}"
            )
    encoder = path / graph_file(ROLE_ENCODER_CLASSIFIER, precision)
    if not encoder.is_file():
        raise ModelLoadError(f"{path}: no {encoder.name} in this model directory")
    decoder = path / graph_file(ROLE_DECODER, precision)
    if not decoder.is_file():  # e.g. int8 quantizes the classifier only
        decoder = path / graph_file(ROLE_DECODER)
    return ModelFiles(encoder, decoder if decoder.is_file() else None, precision)


def _precision_of(path: Path) -> str:
    for precision in PRECISIONS:
        if any(path.name == graph_file(role, precision) for role in GRAPH_IO):
            return precision
    return "fp32"


def available_providers() -> list[str]:
    return list(ort.get_available_providers())


def resolve_provider(provider: str) -> str:
    """auto|cpu|cuda -> the onnxruntime provider name; a clear error when cuda is missing."""
    if provider not in PROVIDERS:
        raise FlowaeError(f"provider must be one of {', '.join(PROVIDERS)}, got {provider!r}")
    available = available_providers()
    if provider == "auto":
        provider = "cuda" if _ORT_PROVIDERS["cuda"] in available else "cpu"
    if _ORT_PROVIDERS[provider] not in available:
        raise ModelLoadError(
            f"provider {provider!r} is not available in this onnxruntime (it has "
            f"{', '.join(available)}); install onnxruntime-gpu for cuda, or use --provider cpu"
        )
    return _ORT_PROVIDERS[provider]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@dataclass(frozen=True)
class Graph:
    """One loaded ONNX graph: its session, what its metadata says, and its tensor names."""

    path: Path
    session: ort.InferenceSession
    metadata: ModelMetadata

    def run(self, inputs: np.ndarray) -> list[np.ndarray]:
        (input_name,), output_names = GRAPH_IO[self.metadata.role]
        return self.session.run(list(output_names), {input_name: inputs})


def load_graph(path: Path, role: str, provider: str, threads: int | None = None) -> Graph:
    """Build a session for `path` and check it is a flowae graph of `role` in this contract."""
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such ONNX file")
    if path.stat().st_size == 0:
        raise ModelLoadError(f"{path}: empty file (0 bytes), not an ONNX model")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: onnxruntime's warnings are not the user's
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    try:
        session = ort.InferenceSession(str(path), options, providers=[provider])
    except Exception as exc:  # onnxruntime's errors subclass Exception directly
        raise ModelLoadError(f"{path}: not a loadable ONNX model ({_first_line(exc)})") from exc
    if provider not in session.get_providers():
        raise ModelLoadError(f"{path}: onnxruntime could not start {provider} for this model")
    text = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    if text is None:
        raise ContractError(
            f"{path}: no '{METADATA_KEY}' metadata; not a graph written by flowae-export"
        )
    try:
        metadata = ModelMetadata.from_json(text)
    except ContractError as exc:
        raise ContractError(f"{path}: {exc}") from exc
    if metadata.role != role:
        raise ContractError(f"{path}: is a {metadata.role} graph, expected {role}")
    _check_io(path, session, metadata)
    return Graph(path, session, metadata)


def _check_io(path: Path, session: ort.InferenceSession, metadata: ModelMetadata) -> None:
    """Tensor names (and the static dims) must be what the contract and metadata say."""
    inputs, outputs = GRAPH_IO[metadata.role]
    found_in = tuple(node.name for node in session.get_inputs())
    found_out = tuple(node.name for node in session.get_outputs())
    if found_in != inputs or set(found_out) != set(outputs):
        raise ContractError(
            f"{path}: tensors {found_in} -> {found_out}, the contract says {inputs} -> {outputs}"
        )
    side = metadata.preprocess.image_size_px
    is_encoder = metadata.role == ROLE_ENCODER_CLASSIFIER
    expected = (3, side, side) if is_encoder else tuple(metadata.latent_shape)
    dims = tuple(session.get_inputs()[0].shape[1:])  # the batch axis is dynamic
    if len(dims) != len(expected) or any(
        isinstance(d, int) and d != e for d, e in zip(dims, expected, strict=True)
    ):
        raise ContractError(f"{path}: input shape {dims}, metadata says {expected}")


class Predictor:
    """Top-k flower names and reconstructions from exported ONNX graphs, on CPU or CUDA.

    model: a model directory (flowae-export's --out), an encoder_classifier .onnx file, or
    None for the bundled model. provider: auto (CUDA when onnxruntime has it), cpu or cuda.
    threads: onnxruntime intra-op threads (None: onnxruntime's default, one per core).
    batch_size: images per model call. jpeg_draft: decode JPEGs at reduced size (faster).
    decode_workers: threads that decode and preprocess images (default: up to 4, one per core).
    """

    def __init__(
        self,
        model: str | os.PathLike | None = None,
        *,
        provider: str = "auto",
        threads: int | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        precision: str = "auto",
        jpeg_draft: bool = DEFAULT_JPEG_DRAFT,
        decode_workers: int | None = None,
    ):
        if batch_size < 1:
            raise FlowaeError(f"batch size must be >= 1, got {batch_size}")
        if threads is not None and threads < 1:
            raise FlowaeError(f"threads must be >= 1, got {threads}")
        if decode_workers is not None and decode_workers < 1:
            raise FlowaeError(f"decode workers must be >= 1, got {decode_workers}")
        self.files = resolve_model(model, precision)
        self.provider = resolve_provider(provider)
        self.threads = threads
        self.batch_size = batch_size
        self.jpeg_draft = jpeg_draft
        self.decode_workers = decode_workers or min(4, os.cpu_count() or 1)
        self.encoder = load_graph(self.files.encoder_classifier, ROLE_ENCODER_CLASSIFIER,
                                  self.provider, threads)
        self.metadata = self.encoder.metadata
        self.preprocess = self.metadata.preprocess
        self.class_names = self.metadata.class_names
        self._decoder: Graph | None = None
        self._decoder_lock = threading.Lock()

    @property
    def decoder(self) -> Graph:
        """The decoder graph, loaded on first use (prediction alone never pays for it)."""
        if self._decoder is not None:
            return self._decoder
        with self._decoder_lock:
            if self._decoder is None:
                if self.files.decoder is None:
                    raise ModelLoadError(
                        f"{self.files.encoder_classifier.parent}: no "
                        f"{graph_file(ROLE_DECODER, self.files.precision)} beside the "
                        "classifier, so this model cannot reconstruct"
                    )
                decoder = load_graph(self.files.decoder, ROLE_DECODER, self.provider,
                                     self.threads)
                mine, theirs = self.metadata, decoder.metadata
                if (theirs.variant, theirs.preprocess, theirs.latent_shape) != (
                    mine.variant, mine.preprocess, mine.latent_shape
                ):
                    raise ContractError(
                        f"{decoder.path}: decoder of variant {theirs.variant!r} does not match "
                        f"the classifier's {mine.variant!r} (variant, preprocess or latent shape)"
                    )
                self._decoder = decoder
            return self._decoder

    # Model-only calls, for benchmarks and evaluation: float32 arrays in, arrays out.
    def infer(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """float32 (B, 3, S, S) -> logits (B, num_classes), latent (B, C, h, w)."""
        logits, latent = self.encoder.run(np.ascontiguousarray(images, dtype=np.float32))
        return logits, latent

    def decode(self, latent: np.ndarray) -> np.ndarray:
        """latent (B, C, h, w) -> reconstruction float32 (B, 3, S, S) in the model's scaling."""
        (reconstruction,) = self.decoder.run(np.ascontiguousarray(latent, dtype=np.float32))
        return reconstruction

    def top_k(self, logits: np.ndarray, k: int) -> list[tuple[Prediction, ...]]:
        """Softmax (float64) and the k most probable classes per row, ties by label."""
        shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
        probs = np.exp(shifted)
        probs /= probs.sum(axis=1, keepdims=True)
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        return [
            tuple(Prediction(int(i), self.class_names[i], float(row[i])) for i in labels)
            for row, labels in zip(probs, order, strict=True)
        ]

    def load(self, source: ImageSource) -> np.ndarray:
        """One input -> uint8 (S, S, 3) crop, by the model's preprocessing rule."""
        return load_pixels(source, self.preprocess, jpeg_draft=self.jpeg_draft)

    def run(
        self,
        sources: Iterable[ImageSource],
        *,
        top_k: int = 5,
        reconstruct: bool = False,
        progress: ProgressFn | None = None,
    ) -> Iterator[ImageResult]:
        """One ImageResult per input, in order; a bad input becomes an error result, not a raise.

        Inputs are decoded batch_size at a time, the next batch while the model runs this one.
        """
        num_classes = len(self.class_names)
        if not 1 <= top_k <= num_classes:
            raise FlowaeError(f"top_k must be between 1 and {num_classes}, got {top_k}")
        if reconstruct:
            _ = self.decoder  # fail now, before any image is read, if there is none
        sources = list(sources)
        chunks = [sources[i : i + self.batch_size] for i in range(0, len(sources), self.batch_size)]
        workers = min(self.decode_workers, len(sources))
        done = 0
        if workers <= 1:
            for chunk in chunks:
                yield from self._run_chunk(chunk, [_settle(self.load, s) for s in chunk],
                                           top_k, reconstruct)
                done += len(chunk)
                if progress is not None:
                    progress(done, len(sources))
            return
        with ThreadPoolExecutor(workers, thread_name_prefix="flowae-decode") as pool:
            def submit(chunk: list[ImageSource]) -> list[Future]:
                return [pool.submit(_settle, self.load, source) for source in chunk]

            pending = submit(chunks[0]) if chunks else []
            for index, chunk in enumerate(chunks):
                current = pending
                if index + 1 < len(chunks):  # decode the next batch while this one runs
                    pending = submit(chunks[index + 1])
                loaded = [future.result() for future in current]
                yield from self._run_chunk(chunk, loaded, top_k, reconstruct)
                done += len(chunk)
                if progress is not None:
                    progress(done, len(sources))

    def _run_chunk(
        self, chunk: Sequence[ImageSource], loaded: list[np.ndarray | ImageError], top_k: int,
        reconstruct: bool,
    ) -> list[ImageResult]:
        """One model call for the images of a batch that loaded; errors for the rest."""
        good = [i for i, item in enumerate(loaded) if not isinstance(item, ImageError)]
        loaded_ok = set(good)
        results = [ImageResult(source, error=str(item)) if i not in loaded_ok else None
                   for i, (source, item) in enumerate(zip(chunk, loaded, strict=True))]
        if good:
            pixels = np.stack([loaded[i] for i in good])  # (B, S, S, 3) uint8
            logits, latent = self.infer(normalize(pixels, self.preprocess))
            inputs = recons = [None] * len(good)
            if reconstruct:
                recon_u8 = denormalize(self.decode(latent), self.preprocess)  # (B, S, S, 3)
                inputs = [Image.fromarray(p) for p in pixels]
                recons = [Image.fromarray(r) for r in recon_u8]
            tops = self.top_k(logits, top_k)
            for j, i in enumerate(good):
                results[i] = ImageResult(chunk[i], tops[j], model_input=inputs[j],
                                         reconstruction=recons[j])
        return results

    def predict(self, images: ImageSource | Sequence[ImageSource], top_k: int = 5
                ) -> list[list[Prediction]]:
        """Per image, its top_k Predictions (label, class_name, probability), best first.

        A single path, PIL image or array counts as a list of one. Raises ImageError for the
        first input that cannot be used; `run` reports every bad input and goes on instead.
        """
        return [list(result.top_k) for result in self._all(images, top_k, reconstruct=False)]

    def reconstruct(self, images: ImageSource | Sequence[ImageSource]) -> list[Image.Image]:
        """Per image, the decoder's reconstruction of the model's input as an RGB PIL image."""
        return [result.reconstruction for result in self._all(images, 1, reconstruct=True)]

    def _all(self, images, top_k: int, reconstruct: bool) -> list[ImageResult]:
        if isinstance(images, str | os.PathLike | Image.Image | np.ndarray):
            images = [images]
        results = list(self.run(images, top_k=top_k, reconstruct=reconstruct))
        for result in results:
            if not result.ok:
                raise ImageError(result.error)
        return results


def _settle(load: Callable[[ImageSource], np.ndarray], source: ImageSource
            ) -> np.ndarray | ImageError:
    """Run `load`, returning its ImageError instead of raising it (one bad image, not a batch)."""
    try:
        return load(source)
    except ImageError as exc:
        return exc




# Command-line style inputs: files, directories and globs, each image or a one-line error.
def _image_suffixes() -> set[str]:
    return {suffix.lower() for suffix in Image.registered_extensions()}


def expand_inputs(arguments: Iterable[str | os.PathLike]) -> list[Path | ImageResult]:
    """Each argument as image paths (a directory: the images inside, sorted; a glob: its
    matches, sorted), or an ImageResult error for an argument that names no image at all.
    A path that does not exist is kept, so that reading it reports 'no such file'."""
    suffixes = _image_suffixes()
    items: list[Path | ImageResult] = []
    for argument in arguments:
        path = Path(argument)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file()
                           and p.suffix.lower() in suffixes and not p.name.startswith("."))
            items.extend(found or [ImageResult(os.fspath(argument),
                                               error=f"{path}: directory holds no images")])
        elif not path.exists() and glob.has_magic(os.fspath(argument)):
            matches = sorted(glob.glob(os.fspath(argument), recursive=True))
            found = [Path(m) for m in matches if not Path(m).is_dir()]
            items.extend(found or [ImageResult(os.fspath(argument),
                                               error=f"{argument}: no file matches")])
        else:
            items.append(path)
    return items


def run_inputs(
    predictor: Predictor, items: Sequence[Path | ImageResult], *, top_k: int = 5,
    reconstruct: bool = False, progress: ProgressFn | None = None,
) -> Iterator[ImageResult]:
    """Results for `expand_inputs`'s items, in order: argument errors pass straight through."""
    total = len(items)
    done_before = 0

    def offset_progress(done: int, _: int) -> None:
        if progress is not None:
            progress(done_before + done, total)

    start = 0
    while start < total:
        if isinstance(items[start], ImageResult):
            yield items[start]
            start += 1
            done_before = start
            continue
        stop = start
        while stop < total and not isinstance(items[stop], ImageResult):
            stop += 1
        yield from predictor.run(items[start:stop], top_k=top_k, reconstruct=reconstruct,
                                 progress=offset_progress)
        start = done_before = stop


def side_by_side(result: ImageResult) -> Image.Image:
    """The model's input crop beside its reconstruction, one RGB image (2S x S)."""
    left, right = result.model_input, result.reconstruction
    canvas = Image.new("RGB", (left.width + right.width, max(left.height, right.height)))
    canvas.paste(left, (0, 0))
    canvas.paste(right, (left.width, 0))
    return canvas


def save_png_atomic(image: Image.Image, path: Path) -> Path:
    """Write a PNG through a temp file in the same folder: a good file is never half-replaced."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            image.save(handle, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def reconstruction_path(out_dir: Path, source: ImageSource, taken: set[Path]) -> Path:
    """OUT_DIR/<stem>.png, or <stem>-2.png, -3 ... when two inputs share a stem."""
    stem = Path(source).stem if isinstance(source, str | os.PathLike) else "image"
    path, n = out_dir / f"{stem}.png", 1
    while path in taken:
        n += 1
        path = out_dir / f"{stem}-{n}.png"
    taken.add(path)
    return path
