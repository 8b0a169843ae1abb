"""The device predictor: exported ONNX graphs in, top-k flower names and reconstructions out.

`Predictor` finds a model's files with runtime.modeldir (which verifies them against the
manifest), opens each graph through runtime.session on a fallback list of providers, and
refuses, with runtime.contract.validate, metadata that does not fit the contract or the
graph's own tensors. It keeps one session per graph (the decoder's built on first use),
takes paths, PIL images and uint8 arrays, decodes them on a small thread pool (Pillow
releases the GIL) while the model runs on the previous batch, and is safe to call from many
threads at once: sessions are only read after they are built, and each call keeps its own
state. Without an explicit model it serves the one bundled in runtime/models/. Imports
onnxruntime, numpy, Pillow and the runtime only.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnxruntime as ort
from PIL import Image

from flowae.runtime import __version__
from flowae.runtime.contract import (
    GRAPH_IO,
    INPUT_IMAGE,
    INPUT_LATENT,
    METADATA_KEY,
    OUTPUT_LATENT,
    OUTPUT_LOGITS,
    OUTPUT_RECONSTRUCTION,
    ROLE_DECODER,
    ROLE_ENCODER_CLASSIFIER,
    ModelMetadata,
    graph_file,
    validate,
)
from flowae.runtime.errors import ContractError, FlowaeError, ImageError, ModelLoadError
from flowae.runtime.images import DEFAULT_MAX_PIXELS
from flowae.runtime.modeldir import resolve_model
from flowae.runtime.preprocess import ImageSource, denormalize, describe, load_pixels, normalize
from flowae.runtime.session import available_providers, create_session, parse_providers, short_name

DEFAULT_PROVIDERS = "auto"  # every provider this onnxruntime offers, best first
DEFAULT_BATCH_SIZE = 32  # images per model call; larger only adds memory on this small model
# Upper bounds of the numeric options, so that a typo is refused instead of exhausting the host.
# onnxruntime starts one OS thread per intra-op thread for each session (two per Predictor);
# 256 covers the largest common hosts (2 x 64 cores with SMT), more only contend for cores.
MAX_THREADS = 256
# A batch of 4096 100 px images is about 0.5 GB of float32 input plus ~0.3 GB of latents;
# throughput stops growing long before that, so larger batches only risk running out of memory.
MAX_BATCH_SIZE = 4096
MAX_DECODE_WORKERS = MAX_THREADS
# Reduced-size JPEG decoding is on by default: large JPEGs decode about 2.5x faster and top-1
# did not drop; `flowae-infer --evaluate DATA_ROOT --fullres DIR` measures both for a model.
DEFAULT_JPEG_DRAFT = True

ProgressFn = Callable[[int, int], None]  # (images done, images in total)
ProviderOptions = Mapping[str, Mapping[str, object]]  # {provider: {key: value}}


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

    def to_dict(self) -> dict:
        """The JSON object `flowae-infer --json` prints (and the HTTP server answers)."""
        if not self.ok:
            return {"image": self.name, "error": self.error}
        return {"image": self.name, "top_k": [
            {"label": p.label, "class_name": p.class_name, "probability": round(p.probability, 6)}
            for p in self.top_k
        ]}


@dataclass(frozen=True)
class Graph:
    """One loaded ONNX graph: its session, what its metadata says, and its tensor names."""

    path: Path
    session: ort.InferenceSession
    metadata: ModelMetadata

    @property
    def provider(self) -> str:
        """onnxruntime's name of the provider that serves this graph (the first it started)."""
        return self.session.get_providers()[0]

    def run(self, inputs: np.ndarray) -> list[np.ndarray]:
        (input_name,), output_names = GRAPH_IO[self.metadata.role]
        try:
            return self.session.run(list(output_names), {input_name: inputs})
        except Exception as exc:  # onnxruntime's errors subclass Exception directly
            lines = str(exc).strip().splitlines()
            raise ModelLoadError(f"{self.path}: onnxruntime could not run this graph on a "
                                 f"batch of {len(inputs)} "
                                 f"({lines[0] if lines else type(exc).__name__})") from exc


def load_graph(path: Path, role: str, providers: str | Sequence[str] = "cpu",
               threads: int | None = None, *,
               provider_options: ProviderOptions | None = None) -> Graph:
    """Build a session for `path` and check it is a flowae graph of `role` in this contract.

    providers: a fallback list as flowae.runtime.session reads it ("cuda,cpu", full names,
    "auto"). The metadata is validated against the dims the graph itself declares.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such ONNX file")
    if path.stat().st_size == 0:
        raise ModelLoadError(f"{path}: empty file (0 bytes), not an ONNX model")
    session = create_session(path, providers=providers, provider_options=provider_options,
                             threads=threads)
    text = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    if text is None:
        raise ContractError(
            f"{path}: no '{METADATA_KEY}' metadata; not a graph written by flowae-export"
        )
    try:
        metadata = ModelMetadata.from_json(text)
        if metadata.role != role:
            raise ContractError(f"is a {metadata.role} graph, expected {role}")
        _check_io(session, metadata)
    except ContractError as exc:
        raise ContractError(f"{path}: {exc}") from exc
    return Graph(path, session, metadata)


def _check_io(session: ort.InferenceSession, metadata: ModelMetadata) -> None:
    """Tensor names must be the contract's; the metadata must fit the graph's declared dims."""
    inputs, outputs = GRAPH_IO[metadata.role]
    found_in = {node.name: node.shape for node in session.get_inputs()}
    found_out = {node.name: node.shape for node in session.get_outputs()}
    if tuple(found_in) != inputs or set(found_out) != set(outputs):
        raise ContractError(f"tensors {tuple(found_in)} -> {tuple(found_out)}, the contract "
                            f"says {inputs} -> {outputs}")
    shapes = {**found_out, **found_in}  # "latent" is the encoder's output, the decoder's input
    if any(len(shape) < 1 for shape in shapes.values()):
        raise ContractError("a tensor has no batch axis")
    dims = {name: tuple(shape[1:]) for name, shape in shapes.items()}  # the batch axis is free
    if metadata.role == ROLE_ENCODER_CLASSIFIER:
        if len(dims[OUTPUT_LOGITS]) != 1:
            raise ContractError(f"logits tensor is {shapes[OUTPUT_LOGITS]}, the contract says "
                                "(batch, classes)")
        validate(metadata, logits_dim=dims[OUTPUT_LOGITS][0],
                 latent_shape=dims[OUTPUT_LATENT], image_shape=dims[INPUT_IMAGE])
    else:
        validate(metadata, latent_shape=dims[INPUT_LATENT],
                 image_shape=dims[OUTPUT_RECONSTRUCTION])


def _check_cap(name: str, value: int | None, maximum: int) -> None:
    if value is not None and not 1 <= value <= maximum:
        raise FlowaeError(f"{name} must be from 1 to {maximum}, got {value}")


class Predictor:
    """Top-k flower names and reconstructions from exported ONNX graphs, on any provider.

    model: a model directory (flowae-export's --out), an encoder_classifier .onnx file, or
    None for the bundled model. providers: a fallback list ("tensorrt,cuda,cpu", a sequence
    of names, or "auto": every provider this onnxruntime offers, best first); `provider` is
    the same argument under its older name. provider_options: {key: value} for the first
    provider. threads: onnxruntime intra-op threads (None: one per core), 1..MAX_THREADS.
    batch_size: images per model call, 1..MAX_BATCH_SIZE. precision: fp32, int8, fp16, or
    auto (the manifest's choice for the provider that serves). jpeg_draft: decode JPEGs at
    reduced size (faster). decode_workers: threads that decode images (default: up to 4).
    max_pixels: most decoded pixels an input may have (runtime.images' budget).
    """

    def __init__(
        self,
        model: str | os.PathLike | None = None,
        *,
        providers: str | Sequence[str] | None = None,
        provider: str | Sequence[str] | None = None,
        provider_options: Mapping[str, object] | None = None,
        threads: int | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        precision: str = "auto",
        jpeg_draft: bool = DEFAULT_JPEG_DRAFT,
        decode_workers: int | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ):
        if providers is not None and provider is not None and providers != provider:
            raise FlowaeError(f"give providers or provider, not both ({providers!r} and "
                              f"{provider!r})")
        _check_cap("batch size", batch_size, MAX_BATCH_SIZE)
        _check_cap("threads", threads, MAX_THREADS)
        _check_cap("decode workers", decode_workers, MAX_DECODE_WORKERS)
        if max_pixels < 1:
            raise FlowaeError(f"max pixels must be >= 1, got {max_pixels}")
        self.providers_asked = parse_providers(providers or provider or DEFAULT_PROVIDERS)
        if not self.providers_asked:
            raise ModelLoadError("this onnxruntime build offers no provider flowae knows")
        self.threads = threads
        self.batch_size = batch_size
        self.jpeg_draft = jpeg_draft
        self.max_pixels = max_pixels
        self.decode_workers = decode_workers or min(4, os.cpu_count() or 1)
        # Options belong to the first provider asked; onnxruntime gets them under its name.
        self._provider_options = ({self.providers_asked[0]: dict(provider_options)}
                                  if provider_options else None)
        # The precision "auto" picks depends on the provider: expect the first one present
        # to serve, and choose again if onnxruntime had to fall back past it.
        offered = {short_name(name) for name in available_providers()}
        expected = next((name for name in self.providers_asked if name in offered), None)
        self.files = resolve_model(model, precision, provider=self.providers_asked)
        self.encoder = self._load(self.files.encoder_classifier, ROLE_ENCODER_CLASSIFIER)
        served = short_name(self.encoder.provider)
        if precision == "auto" and served != expected:
            files = resolve_model(model, precision, provider=served)
            if files != self.files:
                self.files = files
                self.encoder = self._load(files.encoder_classifier, ROLE_ENCODER_CLASSIFIER)
        self.provider = self.encoder.provider  # onnxruntime's name, e.g. CPUExecutionProvider
        self.metadata = self.encoder.metadata
        self.preprocess = self.metadata.preprocess
        self.class_names = self.metadata.class_names
        self._decoder: Graph | None = None
        self._decoder_lock = threading.Lock()

    def _load(self, path: Path, role: str) -> Graph:
        return load_graph(path, role, self.providers_asked, self.threads,
                          provider_options=self._provider_options)

    @property
    def info(self) -> dict:
        """What serves: model, variant, precision, provider (asked and actual), versions."""
        return {
            "model_dir": str(self.files.model_dir),
            "variant": self.metadata.variant,
            "precision": self.files.precision,
            "provider": short_name(self.provider),
            "providers_asked": list(self.providers_asked),
            "threads": self.threads,
            "batch_size": self.batch_size,
            "num_classes": len(self.class_names),
            "onnxruntime": ort.__version__,
            "flowae": __version__,
        }

    @property
    def decoder(self) -> Graph:
        """The decoder graph, loaded on first use (prediction alone never pays for it)."""
        if self._decoder is not None:
            return self._decoder
        with self._decoder_lock:
            if self._decoder is None:
                if self.files.decoder is None:
                    raise ModelLoadError(
                        f"{self.files.model_dir}: no "
                        f"{graph_file(ROLE_DECODER, self.files.precision)} beside the "
                        "classifier, so this model cannot reconstruct"
                    )
                decoder = self._load(self.files.decoder, ROLE_DECODER)
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
        return load_pixels(source, self.preprocess, jpeg_draft=self.jpeg_draft,
                           max_pixels=self.max_pixels)

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

