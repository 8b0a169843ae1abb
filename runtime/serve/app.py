"""The HTTP application: routes, upload limits, micro-batched inference, access log, page.

Starlette (on uvicorn) rather than FastAPI: the API is six routes whose request bodies are raw
image bytes read under a byte cap, so FastAPI's pydantic models would add a large compiled
dependency to a device extra and validate nothing; its one gift, the OpenAPI document, is
written out by hand in `openapi.py`. `create_app(config)` loads the model once (a Predictor,
verified against the hashes in its manifest before anything is served), decodes and
preprocesses each upload on a thread pool, and hands the model-sized crops to a
`MicroBatcher`, whose one model thread runs `Predictor.infer` on a whole batch. Every error
is a 4xx/5xx with a one-line JSON body `{"error": "..."}`. A body is read under a deadline
(408 past it); a request that is abandoned (timed out, or its client went away) gives up its
queued decode before that starts, and a client that disconnects is one quiet log line, not
a server error. A model directory without a manifest is refused unless `allow_unverified`.
Imports the runtime, numpy, Pillow and Starlette (the `[serve]` extra); uvicorn is only the
CLI's business.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import mimetypes
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from flowae.runtime import __version__
from flowae.runtime.contract import GRAPH_FORMATS, GRAPH_IO, MANIFEST_FILES, PRECISIONS, graph_file
from flowae.runtime.errors import FlowaeError, ImageError
from flowae.runtime.images import load_rgb_bytes
from flowae.runtime.modeldir import DEFAULT_MODEL_DIR, MANIFEST_NAME, read_manifest, verify_files
from flowae.runtime.predictor import DEFAULT_JPEG_DRAFT, ImageResult, Predictor
from flowae.runtime.preprocess import denormalize, normalize
from flowae.runtime.serve.batching import Busy, Closing, MicroBatcher
from flowae.runtime.serve.openapi import openapi_document

log = logging.getLogger("flowae.serve")
access_log = logging.getLogger("flowae.serve.access")

STATIC_DIR = Path(__file__).resolve().parent / "static"
VENDOR_DIR = STATIC_DIR / "vendor"  # onnxruntime-web, copied there by `npm ci` in web/
# Starlette serves static files by extension; these two are missing from older mimetypes.
mimetypes.add_type("application/wasm", ".wasm")
mimetypes.add_type("text/javascript", ".mjs")
RAW_IMAGE_TYPES = ("image/", "application/octet-stream")
RETRY_AFTER_S = 1  # what a 503 tells clients to wait
CLIENT_GONE_STATUS = 499  # what the access log records for a client that left (nginx's code)
GRAPH_SUFFIXES = tuple(f".{fmt}" for fmt in GRAPH_FORMATS)  # files /v1/model/files/ may serve


@dataclass(frozen=True)
class ServeConfig:
    """Everything `flowae-serve` can be told; the defaults are the command's defaults."""

    model: str | None = None  # model directory or encoder_classifier file; None: the bundled one
    provider: str = "auto"  # onnxruntime provider(s), as Predictor takes them
    threads: int | None = None  # onnxruntime intra-op threads; None: its default
    max_batch: int = 16  # images per model call
    max_wait_ms: float = 5.0  # how long the oldest waiting image waits for company
    max_queue: int = 64  # images admitted and not yet in a model call; more get 503
    max_upload_mb: float = 20.0  # request body limit (Content-Length and counted bytes)
    body_timeout_s: float = 30.0  # to receive a whole request body; past it 408
    timeout_s: float = 30.0  # per request, from admission to answer; past it 504
    jpeg_draft: bool = DEFAULT_JPEG_DRAFT  # decode JPEGs at reduced size, as flowae-infer does
    decode_workers: int = 2  # threads that decode and preprocess uploads
    # Decoded pixels per non-JPEG upload (JPEGs are decoded at reduced size to fit): lower
    # than a file's budget, as one decode holds a decode thread until it ends, answered or not.
    max_pixels: int = 24_000_000
    allow_unverified: bool = False  # serve a model directory that has no manifest.json
    max_connections: int = 128  # open connections uvicorn accepts; more are answered 503
    shutdown_timeout_s: float = 30.0  # graceful shutdown waits this long for requests

    def check(self) -> None:
        for name in ("max_batch", "max_queue", "decode_workers", "max_pixels",
                     "max_connections"):
            if getattr(self, name) < 1:
                raise FlowaeError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_upload_mb", "timeout_s", "body_timeout_s", "shutdown_timeout_s"):
            if getattr(self, name) <= 0:
                raise FlowaeError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_wait_ms < 0:
            raise FlowaeError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


@dataclass(frozen=True)
class _Job:
    """One admitted image on its way through the batcher."""

    name: str  # how the answer names the image: the upload's file name, or "upload"
    pixels: np.ndarray  # uint8 (S, S, 3), the crop the model sees
    top_k: int
    reconstruct: bool


def _error(status: int, message: str, headers: dict | None = None) -> HTTPException:
    return HTTPException(status, message.splitlines()[0] if message else "error", headers)


def ascii_int(text: str) -> int | None:
    """`text` as a non-negative integer when it is ASCII digits only, else None (str.isdigit
    alone admits superscripts, which int() refuses, and other scripts' digits)."""
    return int(text) if text.isascii() and text.isdigit() else None


def _model_folder(model: str | None) -> Path:
    """The folder whose manifest vouches for `model` (a directory, a graph file, or None)."""
    path = Path(model) if model else DEFAULT_MODEL_DIR
    return path.parent if path.is_file() else path


def check_verifiable(model: str | None, allow_unverified: bool) -> None:
    """Refuse a model whose folder has no manifest (nothing to verify its graphs against)
    unless `allow_unverified`; then warn. A missing folder is left to the model loader."""
    folder = _model_folder(model)
    if not folder.is_dir() or (folder / MANIFEST_NAME).is_file():
        return
    if not allow_unverified:
        raise FlowaeError(f"{folder}: no {MANIFEST_NAME}, so its graphs cannot be verified; "
                          "refusing to serve them (--allow-unverified serves them anyway)")
    log.warning("%s: no %s: serving graphs that were not verified (--allow-unverified)",
                folder, MANIFEST_NAME)


def verified_graph_files(model_dir: Path) -> dict[str, Path]:
    """The graph files (.onnx/.ort) the manifest lists and that exist, each verified against
    the manifest (size and sha256): name -> path. A file that fails refuses the model."""
    manifest = read_manifest(model_dir)
    listed = manifest.get(MANIFEST_FILES)
    names = [name for name in (listed if isinstance(listed, dict) else {})
             if Path(name).name == name and name.endswith(GRAPH_SUFFIXES)
             and (model_dir / name).is_file()]  # only plain graph-file names are offered
    verify_files(model_dir, manifest, names)
    return {name: model_dir / name for name in names}


class ModelService:
    """The model behind the routes: the Predictor, its files, and the batched model call."""

    def __init__(self, config: ServeConfig, predictor: Predictor | None = None):
        config.check()
        self.config = config
        if predictor is None:
            check_verifiable(config.model, config.allow_unverified)
        self.predictor = predictor or Predictor(
            config.model, provider=config.provider, threads=config.threads,
            batch_size=config.max_batch, jpeg_draft=config.jpeg_draft,
            max_pixels=config.max_pixels)
        self.spec = self.predictor.preprocess
        files = self.predictor.files
        self.model_dir = files.model_dir or files.encoder_classifier.parent
        if not files.verified and not config.allow_unverified:
            raise FlowaeError(f"{self.model_dir}: graphs not verified against a manifest; "
                              "refusing to serve them (--allow-unverified serves them anyway)")
        self.graph_files = verified_graph_files(self.model_dir)
        self.num_classes = len(self.predictor.class_names)
        self.max_pixels = config.max_pixels
        self.decodes_started = 0  # decodes a thread began (an abandoned request's never does)
        self.can_reconstruct = files.decoder is not None
        if self.can_reconstruct:
            _ = self.predictor.decoder  # load (and check) it now, not inside a request's batch

    def prepare(self, data: bytes, name: str) -> np.ndarray:
        """Upload bytes -> uint8 (S, S, 3) crop (runs on the decode pool): decoded as a file
        would be, then resized and cropped by the Predictor's own rule."""
        self.decodes_started += 1
        image = load_rgb_bytes(data, name, draft_px=self.spec.resize_px,
                              jpeg_draft=self.config.jpeg_draft, max_pixels=self.max_pixels)
        try:
            return self.predictor.load(image)
        except ImageError as exc:
            raise ImageError(f"{name}: {exc}") from exc

    def run_batch(self, jobs: list[_Job]) -> list[ImageResult]:
        """One model call for a batch of jobs (runs on the model thread)."""
        pixels = np.stack([job.pixels for job in jobs])  # (B, S, S, 3) uint8
        logits, latent = self.predictor.infer(normalize(pixels, self.spec))
        tops = self.predictor.top_k(logits, max(job.top_k for job in jobs))
        wanted = [i for i, job in enumerate(jobs) if job.reconstruct]
        recons: dict[int, np.ndarray] = {}
        if wanted:
            decoded = denormalize(self.predictor.decode(latent[wanted]), self.spec)  # (b, S, S, 3)
            recons = dict(zip(wanted, decoded, strict=True))
        return [
            ImageResult(job.name, tops[i][: job.top_k],
                        model_input=Image.fromarray(job.pixels) if i in recons else None,
                        reconstruction=Image.fromarray(recons[i]) if i in recons else None)
            for i, job in enumerate(jobs)
        ]

    def provider(self) -> str:
        """The provider that actually serves (short name, as flowae-infer --json prints it)."""
        return str(self.predictor.info["provider"])

    def describe(self, batcher: MicroBatcher) -> dict:
        """GET /v1/model: what the model is, how it is served, and its files for the browser."""
        import onnxruntime
        import PIL
        import starlette

        meta = self.predictor.metadata
        graphs = {}
        for precision in PRECISIONS:
            urls = {role: f"/v1/model/files/{graph_file(role, precision)}" for role in GRAPH_IO
                    if graph_file(role, precision) in self.graph_files}
            if urls:
                graphs[precision] = urls
        return {
            "variant": meta.variant,
            "class_names": list(meta.class_names),
            "preprocess": self.spec.to_dict(),
            "latent_shape": list(meta.latent_shape),
            "contract_version": meta.contract_version,
            "precision": self.predictor.files.precision,
            "provider": self.provider(),
            "predictor_info": {k: v for k, v in self.predictor.info.items()
                               if k != "model_dir"},  # no server paths to the world
            "jpeg_draft": self.config.jpeg_draft,
            "graphs": graphs,
            "io": {role: {"inputs": list(ins), "outputs": list(outs)}
                   for role, (ins, outs) in GRAPH_IO.items()},
            "files": {name: f"/v1/model/files/{name}" for name in sorted(self.graph_files)},
            "extra": meta.extra,
            "versions": {"flowae": __version__, "onnxruntime": onnxruntime.__version__,
                         "numpy": np.__version__, "pillow": PIL.__version__,
                         "starlette": starlette.__version__},
            "batching": {"max_batch": batcher.max_batch,
                         "max_wait_ms": batcher.max_wait_s * 1000.0,
                         "max_queue": batcher.max_queue},
            "limits": {"max_upload_mb": self.config.max_upload_mb,
                       "body_timeout_s": self.config.body_timeout_s,
                       "timeout_s": self.config.timeout_s, "max_pixels": self.max_pixels},
        }


async def _read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The request body, refused with 413 past `limit` bytes: by Content-Length before reading,
    and by counting what arrives (a chunked upload has no Content-Length); 408 when it has not
    all arrived within `timeout_s` (a stalled upload must not hold its bytes for ever). A client
    that goes away meanwhile raises ClientDisconnect."""
    declared = request.headers.get("content-length")
    if declared is not None:
        size = ascii_int(declared)
        if size is None:
            raise _error(400, f"bad Content-Length {declared!r}")
        if size > limit:
            raise _error(413, f"upload of {size} bytes is over the limit of {limit}")
    chunks: list[bytes] = []

    async def read() -> None:
        total = 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise _error(413, f"upload is over the limit of {limit} bytes")
            chunks.append(chunk)

    try:
        await asyncio.wait_for(read(), timeout_s)
    except asyncio.TimeoutError:
        chunks.clear()
        raise _error(408, f"the request body did not arrive within {timeout_s} s",
                     {"Connection": "close"}) from None
    return b"".join(chunks)


async def _until_disconnected(request: Request) -> None:
    """Return when the client goes away (call only once the body has been read: then the
    next ASGI message is the disconnect, or comes once the response is complete)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _upload(request: Request, limit: int, timeout_s: float) -> tuple[str, bytes]:
    """(name, image bytes) from a multipart form (field `file`, else the first file) or from
    a raw image body (Content-Type image/* or application/octet-stream)."""
    content_type = request.headers.get("content-type", "").lower()
    is_form = content_type.startswith("multipart/form-data")
    if not is_form and not content_type.startswith(RAW_IMAGE_TYPES):
        shown = content_type or "none"
        raise _error(415, f"Content-Type {shown} is not an image; send multipart/form-data with "
                          "a file, or the image bytes as image/* or application/octet-stream")
    body = await _read_body(request, limit, timeout_s)
    if not body:
        raise _error(400, "empty body: no image bytes were sent")
    if not is_form:
        return "upload", body

    async def stream():
        yield body

    parser = MultiPartParser(request.headers, stream(), max_files=1, max_fields=16)
    parser.spool_max_size = limit + 1  # keep the upload in memory: it is within the limit
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise _error(400, f"malformed multipart form: {exc.message}") from exc
    files = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
    chosen = form.get("file") if isinstance(form.get("file"), UploadFile) else None
    chosen = chosen or (files[0] if files else None)
    if chosen is None:
        raise _error(400, "multipart form holds no file (send the image as field 'file')")
    data = await chosen.read()
    name = chosen.filename or "upload"
    await form.close()
    if not data:
        raise _error(400, f"{name}: empty file (0 bytes)")
    return name, data


async def _unless_disconnected(request: Request, work):
    """Await `work` (a coroutine); if the client goes away first, cancel it (a decode still
    queued for a thread never starts) and raise ClientDisconnect."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
    if not task.done() or task.cancelled():
        raise ClientDisconnect()
    return task.result()


class AccessLog:
    """ASGI middleware: one line per HTTP request, `client "METHOD path HTTP/v" status ms`."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = [500]

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            client = scope.get("client") or ("-", 0)
            path = scope.get("path", "")
            if scope.get("query_string"):
                path += "?" + scope["query_string"].decode("latin-1")
            access_log.info('%s:%s "%s %s HTTP/%s" %d %.1fms', client[0], client[1],
                            scope["method"], path, scope.get("http_version", "1.1"), status[0],
                            (time.perf_counter() - start) * 1000.0)


def create_app(config: ServeConfig, predictor: Predictor | None = None) -> Starlette:
    """The ASGI application for `config` (the model loads here, before anything is served)."""
    service = ModelService(config, predictor)
    decode_pool = ThreadPoolExecutor(config.decode_workers, thread_name_prefix="flowae-decode")
    model_pool = ThreadPoolExecutor(1, thread_name_prefix="flowae-model")
    batcher = MicroBatcher(service.run_batch, model_pool, max_batch=config.max_batch,
                           max_wait_ms=config.max_wait_ms, max_queue=config.max_queue)
    counters = {"requests": 0, "ok": 0, "bad_input": 0, "busy": 0, "timeouts": 0,
                "body_timeouts": 0, "disconnected": 0, "cut_off": 0}

    def top_k_of(request: Request) -> int:
        text = request.query_params.get("top_k", "5")
        top_k = ascii_int(text)
        if top_k is None or not 1 <= top_k <= service.num_classes:
            raise _error(400, f"top_k must be an integer from 1 to {service.num_classes}, "
                              f"got {text!r}")
        return top_k

    async def predict(request: Request, reconstruct: bool) -> ImageResult:
        try:
            return await admit_and_run(request, reconstruct)
        except asyncio.CancelledError:
            # uvicorn cancels the requests still running when graceful shutdown runs out of
            # time (--shutdown-timeout-s): answer them 503, not an application error.
            current = asyncio.current_task()
            if current is not None and hasattr(current, "uncancel"):  # Python 3.11+
                current.uncancel()
            counters["cut_off"] += 1
            raise _error(503, "the server shut down before answering",
                         {"Connection": "close"}) from None

    async def admit_and_run(request: Request, reconstruct: bool) -> ImageResult:
        counters["requests"] += 1
        top_k = top_k_of(request)
        try:
            name, data = await _upload(request, config.max_upload_bytes, config.body_timeout_s)
        except HTTPException as exc:
            if exc.status_code == 408:
                counters["body_timeouts"] += 1
            raise
        try:
            slot = batcher.slot()
        except (Busy, Closing) as exc:
            counters["busy"] += 1
            raise _error(503, str(exc), {"Retry-After": str(RETRY_AFTER_S)}) from exc
        loop = asyncio.get_running_loop()

        async def work() -> ImageResult:
            pixels = await loop.run_in_executor(decode_pool, service.prepare, data, name)
            return await slot.submit(_Job(name, pixels, top_k, reconstruct))

        with slot:
            try:
                result = await _unless_disconnected(
                    request, asyncio.wait_for(work(), config.timeout_s))
            except ImageError as exc:
                counters["bad_input"] += 1
                raise _error(422, str(exc)) from exc
            except asyncio.TimeoutError as exc:
                counters["timeouts"] += 1
                raise _error(504, f"no answer within {config.timeout_s} s") from exc
        counters["ok"] += 1
        return result

    async def classify(request: Request) -> Response:
        result = await predict(request, reconstruct=False)
        return JSONResponse({**result.to_dict(), "provider": service.provider()})

    async def reconstruct(request: Request) -> Response:
        if not service.can_reconstruct:
            raise _error(404, "this model has no decoder graph, so it cannot reconstruct")
        result = await predict(request, reconstruct=True)

        def png() -> bytes:  # (S, 2S, 3): the model's input crop | its reconstruction
            pair = np.concatenate([np.asarray(result.model_input),
                                   np.asarray(result.reconstruction)], axis=1)
            buffer = io.BytesIO()
            Image.fromarray(pair).save(buffer, format="PNG")
            return buffer.getvalue()

        data = await asyncio.get_running_loop().run_in_executor(decode_pool, png)
        return Response(data, media_type="image/png", headers={
            "X-Flowae-Top1": json.dumps(result.top_k[0].class_name),
            "X-Flowae-Layout": "input|reconstruction"})

    async def model(request: Request) -> Response:
        return JSONResponse(service.describe(batcher))

    async def model_file(request: Request) -> Response:
        name = request.path_params["name"]
        path = service.graph_files.get(name)
        if path is None:  # only manifest-listed graph files: no other path can be named
            raise _error(404, f"no model file {name!r}; GET /v1/model lists them")
        return FileResponse(path, media_type="application/octet-stream",
                            headers={"Cache-Control": "no-cache"})

    async def stats(request: Request) -> Response:
        return JSONResponse({**batcher.stats.to_dict(), "waiting": batcher.waiting,
                             "running": batcher.running,
                             "decodes_started": service.decodes_started, **counters})

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": service.predictor.metadata.variant})

    async def index(request: Request) -> Response:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    async def openapi(request: Request) -> Response:
        return JSONResponse(openapi_document(__version__))

    async def client_gone(request: Request, exc: ClientDisconnect) -> Response:
        counters["disconnected"] += 1
        log.info("client %s went away before its answer (%s %s)",
                 request.client.host if request.client else "-", request.method,
                 request.url.path)
        return Response(status_code=CLIENT_GONE_STATUS)  # never sent: for the access log

    async def http_error(request: Request, exc: HTTPException) -> Response:
        return JSONResponse({"error": exc.detail}, exc.status_code, headers=exc.headers)

    async def server_error(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse({"error": f"internal error ({type(exc).__name__})"}, 500)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.start()
        try:
            yield
        finally:
            await batcher.close()  # every submitted image gets its answer
            decode_pool.shutdown(wait=True)
            model_pool.shutdown(wait=True)

    routes = [
        Route("/", index),
        Route("/healthz", healthz),
        Route("/openapi.json", openapi),
        Route("/v1/model", model),
        Route("/v1/model/files/{name}", model_file),
        Route("/v1/stats", stats),
        Route("/v1/classify", classify, methods=["POST"]),
        Route("/v1/reconstruct", reconstruct, methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC_DIR, check_dir=False), name="static"),
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: http_error, ClientDisconnect: client_gone,
                                        Exception: server_error})
    app.state.service = service
    app.state.batcher = batcher
    app.state.decode_pool = decode_pool
    app.add_middleware(AccessLog)
    return app
