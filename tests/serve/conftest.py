"""Serve fixtures: the real `flowae-serve` as a subprocess on 127.0.0.1 (port 0: the kernel
picks a free one, read back from uvicorn's start line), its log lines collected, and the
full-size photos with the Python runtime's own answers to compare the server's with."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest

# The [serve] extra, and httpx (a dev dependency) that drives the server in these tests.
NEEDED = ("starlette", "uvicorn", "python_multipart", "httpx")
MISSING = [name for name in NEEDED if importlib.util.find_spec(name) is None]

REPO = Path(__file__).resolve().parents[2]
FULLRES = REPO.parent / "shared" / "flowers102-fullres"
START_TIMEOUT_S = 60.0  # a bound on waiting, not a speed assertion: the machine is shared


@dataclass
class Server:
    """A running flowae-serve subprocess and everything it has logged so far."""

    proc: subprocess.Popen
    url: str = ""
    lines: list[str] = field(default_factory=list)
    _started: threading.Event = field(default_factory=threading.Event)
    _logged: threading.Condition = field(default_factory=threading.Condition)

    def _read(self) -> None:
        for line in self.proc.stderr:
            with self._logged:
                self.lines.append(line.rstrip("\n"))
                self._logged.notify_all()
            if "Uvicorn running on http://" in line:
                self.url = line.split("running on ", 1)[1].split(" ", 1)[0]
                self._started.set()
        self._started.set()  # the process ended (perhaps before it started)

    def wait_for_line(self, text: str, timeout_s: float = 60.0) -> str:
        """The first logged line containing `text`, waiting (bounded) for it to be read."""
        with self._logged:
            self._logged.wait_for(lambda: any(text in line for line in self.lines), timeout_s)
            found = [line for line in self.lines if text in line]
        assert found, f"no log line contains {text!r}:\n" + "\n".join(self.lines[-20:])
        return found[0]

    def wait_until(self, client, predicate, limit: int = 2000) -> dict:
        """Poll GET /v1/stats until predicate(stats) holds (at most `limit` polls)."""
        for _ in range(limit):
            stats = client.get("/v1/stats").json()
            if predicate(stats):
                return stats
        raise AssertionError(f"stats never reached the state; last: {stats}")

    def client(self, **kwargs):
        import httpx

        return httpx.Client(base_url=self.url, timeout=60.0, **kwargs)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=60)


def start_server(*options: str) -> Server:
    """`python -m flowae.runtime.serve.cli --port 0 OPTIONS`, returned once it listens."""
    skip_without_extra()  # module-scoped users start before the autouse check runs
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "flowae.runtime.serve.cli", "--host", "127.0.0.1", "--port", "0",
         "--provider", "cpu", "--threads", "1", *options],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    server = Server(proc)
    threading.Thread(target=server._read, daemon=True).start()
    if not server._started.wait(START_TIMEOUT_S) or not server.url:
        proc.kill()
        raise RuntimeError("flowae-serve did not start:\n" + "\n".join(server.lines))
    return server


def skip_without_extra() -> None:
    if MISSING:
        pytest.skip(f"needs {', '.join(MISSING)}: pip install 'flowae[serve,dev]'")


@pytest.fixture(autouse=True)
def _serve_extra() -> None:
    """Skip every test here, with the reason, where the [serve] extra is not installed."""
    skip_without_extra()


@pytest.fixture
def serve():
    """Factory: start a server with the given options; every one is stopped at teardown."""
    servers: list[Server] = []

    def make(*options: str) -> Server:
        server = start_server(*options)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def server():
    """One default server (bundled model, micro-batching on) shared by a module's tests."""
    running = start_server()
    yield running
    running.stop()


@pytest.fixture(scope="session")
def photos() -> list[Path]:
    """Three full-size test photos (the first three of labels.csv's order, sorted)."""
    if not (FULLRES / "labels.csv").exists():
        pytest.skip(f"full-size photos not found at {FULLRES}")
    return sorted((FULLRES / "jpg").glob("*.jpg"))[:3]


@pytest.fixture(scope="session")
def predictor():
    """The Python runtime as the server builds it (its pixel budget is the server's)."""
    skip_without_extra()
    from flowae.runtime.predictor import Predictor
    from flowae.runtime.serve.app import ServeConfig

    return Predictor(provider="cpu", threads=1, max_pixels=ServeConfig().max_pixels)


@pytest.fixture(scope="session")
def expected(predictor, photos) -> dict[str, dict]:
    """file name -> the object flowae-infer --json prints for it (the Python runtime's answer)."""
    return {Path(r.source).name: r.to_dict() for r in predictor.run(photos, top_k=5)}
