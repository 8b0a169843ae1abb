"""`flowae-serve`: the HTTP API and web page over a model directory (the bundled model by default).

A thin click wrapper: it checks that the `[serve]` extra is installed (else one line naming
`pip install 'flowae[serve]'` and exit 2), builds a ServeConfig, loads the model through
`create_app` (a bad model is a one-line error and exit 2, before the port is opened) and runs
uvicorn, whose graceful shutdown on SIGTERM/SIGINT lets in-flight requests finish; the app's
lifespan then drains the batcher and the process exits 0. uvicorn's own access log is
replaced by the app's (one line per request, with its time in ms). Imports click and the
runtime; Starlette and uvicorn inside `main`, after the extra is checked. Usage errors are
one line (`flowae-serve: error: ...`, exit 2), as in every flowae command; so is a host and
port it cannot listen on (the socket is bound here, before uvicorn gets it). uvicorn caps open
connections (`--max-connections`) and how long graceful shutdown waits (`--shutdown-timeout-s`).
"""

from __future__ import annotations

import importlib.util
import logging
import signal
import socket
import sys
from pathlib import Path

import click

from flowae.runtime import __version__
from flowae.runtime.cli import OneLineCommand, fail
from flowae.runtime.errors import FlowaeError
from flowae.runtime.predictor import DEFAULT_JPEG_DRAFT

EXIT_USAGE, EXIT_MISSING_EXTRA = 2, 2
_PROG = "flowae-serve"
_EXTRA_MODULES = ("starlette", "uvicorn", "python_multipart")


def missing_extra() -> list[str]:
    """The [serve] extra's modules that are not importable here."""
    return [name for name in _EXTRA_MODULES if importlib.util.find_spec(name) is None]


def listen_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port), for uvicorn to listen on; FlowaeError with the
    reason in words (address already in use, unknown host, ...) when it cannot be bound."""
    sock = None
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:  # socket.gaierror too: an unknown host
        if sock is not None:
            sock.close()
        raise FlowaeError(f"cannot listen on {host}:{port} "
                          f"({(exc.strerror or str(exc)).lower()})") from None
    return sock


@click.command(_PROG, cls=OneLineCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name=_PROG)
@click.option("--model", type=click.Path(path_type=Path), default=None,
              help="Model directory from flowae-export [default: the bundled model].")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--provider", default="auto", show_default=True,
              help="onnxruntime provider(s), e.g. cpu or cuda,cpu; auto: the best available.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="onnxruntime intra-op threads [default: one per core].")
@click.option("--max-batch", type=click.IntRange(min=1), default=16, show_default=True,
              help="Images per model call (1: no micro-batching).")
@click.option("--max-wait-ms", type=click.FloatRange(min=0), default=5.0, show_default=True,
              help="How long the oldest waiting image waits for others to join its batch.")
@click.option("--max-queue", type=click.IntRange(min=1), default=64, show_default=True,
              help="Images admitted and not yet in a model call; more are answered 503.")
@click.option("--max-upload-mb", type=click.FloatRange(min=0, min_open=True), default=20.0,
              show_default=True, help="Largest request body.")
@click.option("--timeout-s", type=click.FloatRange(min=0, min_open=True), default=30.0,
              show_default=True, help="Per request; past it the answer is 504.")
@click.option("--body-timeout-s", type=click.FloatRange(min=0, min_open=True), default=30.0,
              show_default=True, help="To receive a whole request body; past it 408.")
@click.option("--max-connections", type=click.IntRange(min=1), default=128, show_default=True,
              help="Open connections accepted; more are answered 503.")
@click.option("--shutdown-timeout-s", type=click.FloatRange(min=0, min_open=True),
              default=30.0, show_default=True,
              help="On SIGTERM/SIGINT, how long in-flight requests may take to finish.")
@click.option("--decode-workers", type=click.IntRange(min=1), default=2, show_default=True,
              help="Threads that decode and preprocess uploads.")
@click.option("--jpeg-draft/--no-jpeg-draft", default=DEFAULT_JPEG_DRAFT, show_default=True,
              help="Decode JPEGs at reduced size, as flowae-infer does by default.")
@click.option("--max-pixels", type=click.IntRange(min=1), default=24_000_000,
              show_default=True,
              help="Decoded pixels per upload (JPEGs are decoded at reduced size to fit).")
@click.option("--allow-unverified", is_flag=True,
              help="Serve a model directory that has no manifest.json (graphs not verified).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
              default="info", show_default=True)
def main(model: Path | None, host: str, port: int, provider: str, threads: int | None,
         max_batch: int, max_wait_ms: float, max_queue: int, max_upload_mb: float,
         timeout_s: float, body_timeout_s: float, max_connections: int,
         shutdown_timeout_s: float, decode_workers: int, jpeg_draft: bool, max_pixels: int,
         allow_unverified: bool, log_level: str) -> None:
    """Serve the model over HTTP: POST /v1/classify, POST /v1/reconstruct, GET / (the page)."""
    missing = missing_extra()
    if missing:
        click.echo(f"{_PROG}: needs the serve extra ({', '.join(missing)} missing): "
                   "pip install 'flowae[serve]'", err=True)
        sys.exit(EXIT_MISSING_EXTRA)
    import uvicorn

    from flowae.runtime.serve.app import ServeConfig, create_app

    class _Server(uvicorn.Server):
        """uvicorn's server on a socket bound here; it logs, once it listens, the start line
        it logs for a host and port it binds itself (not for a socket it is given)."""

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.started and sockets:
                host, port = sockets[0].getsockname()[:2]
                shown = f"[{host}]" if ":" in host else host
                logging.getLogger("uvicorn.error").info(
                    "Uvicorn running on http://%s:%d (Press CTRL+C to quit)", shown, port)

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(message)s",
                        stream=sys.stderr)
    config = ServeConfig(model=str(model) if model else None, provider=provider,
                         threads=threads, max_batch=max_batch, max_wait_ms=max_wait_ms,
                         max_queue=max_queue, max_upload_mb=max_upload_mb, timeout_s=timeout_s,
                         decode_workers=decode_workers, jpeg_draft=jpeg_draft,
                         max_pixels=max_pixels, allow_unverified=allow_unverified,
                         body_timeout_s=body_timeout_s, max_connections=max_connections,
                         shutdown_timeout_s=shutdown_timeout_s)
    try:
        app = create_app(config)
        sock = listen_socket(host, port)
    except FlowaeError as exc:
        fail(_PROG, str(exc), EXIT_USAGE)
    server = _Server(uvicorn.Config(
        app, host=host, port=sock.getsockname()[1], access_log=False, log_level=log_level,
        lifespan="on", limit_concurrency=config.max_connections,
        timeout_graceful_shutdown=config.shutdown_timeout_s))
    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then raises the signal again for the
    # handler it found; these make that a normal exit, not a KeyboardInterrupt traceback.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stopped)
    server.run(sockets=[sock])
    sys.exit(0 if server.started else EXIT_USAGE)  # not started: e.g. the lifespan failed


def _stopped(signum: int, frame: object) -> None:
    """After uvicorn's graceful shutdown: nothing left to do, so the process exits 0."""


if __name__ == "__main__":
    main()
