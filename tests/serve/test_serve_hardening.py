"""flowae-serve against hostile or unlucky clients, on a real server on 127.0.0.1: numbers in
scripts other than ASCII, clients that stall or vanish mid-upload, too many connections, huge
images under the file budget, a shutdown that cannot wait for ever, a port it cannot listen
on, and a model directory without a manifest. Plus the one in-process case: a request that
times out while its decode still waits for a thread never decodes."""

from __future__ import annotations

import asyncio
import io
import shutil
import signal
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import pytest
from PIL import Image

from flowae.runtime.modeldir import DEFAULT_MODEL_DIR

STALLED_HEAD = (b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                b"Content-Length: 1000\r\n\r\n")
POLLS = 200  # bound on retries while the server notices a closed connection


def _connect(url: str) -> socket.socket:
    parsed = urlparse(url)
    return socket.create_connection((parsed.hostname, parsed.port), timeout=60)


def _read_answer(sock: socket.socket) -> bytes:
    answer = b""
    while chunk := sock.recv(65536):
        answer += chunk
    return answer


def _get(sock: socket.socket, path: str) -> bytes:
    """One keep-alive GET on an open connection; its whole answer (the body is short)."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    answer = sock.recv(65536)
    assert b"\r\n\r\n" in answer, answer
    return answer


def _access_lines(server) -> list[str]:
    return [line for line in server.lines if "flowae.serve.access" in line]


def _blank_png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


def _serve_cli(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flowae.runtime.serve.cli", "--provider", "cpu",
                           *arguments], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("top_k", ["\u00b2", "\u0663", "3\u00b2", "\uff13", " 3", "-1"])
def test_only_ascii_digits_are_numbers(server, photos, top_k):
    with server.client() as client:
        response = client.post("/v1/classify", params={"top_k": top_k},
                               files={"file": (photos[0].name, photos[0].read_bytes())})
        assert response.status_code == 400, response.text
        assert "top_k must be an integer" in response.json()["error"]
        good = client.post("/v1/classify", params={"top_k": "3"},
                           files={"file": (photos[0].name, photos[0].read_bytes())})
    assert good.status_code == 200 and len(good.json()["top_k"]) == 3


@pytest.mark.parametrize("length", [b"\xc2\xb2", b"\xd9\xa3", b"+4"], ids=["sup2", "arabic3", "+4"])
def test_content_length_in_other_digits_is_400(server, length):
    """uvicorn's HTTP parser answers these before the app sees them; the app's own check
    (ascii_int) holds them to the same rule under any other parser."""
    with _connect(server.url) as sock:
        sock.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                     b"Content-Length: " + length + b"\r\n\r\nabcd")
        sock.shutdown(socket.SHUT_WR)
        assert _read_answer(sock).startswith(b"HTTP/1.1 400")
    assert not any("Traceback" in line for line in server.lines)


def test_ascii_int():
    from flowae.runtime.serve.app import ascii_int

    assert [ascii_int(t) for t in ("0", "17", "\u00b2", "\u0663", "", "1e3", "+1")] == \
        [0, 17, None, None, None, None, None]


def test_client_that_vanishes_mid_upload_is_one_quiet_line(serve):
    server = serve()
    with _connect(server.url) as sock:
        sock.sendall(STALLED_HEAD + b"\xff\xd8\xff\xe0")  # 4 of the 1000 bytes promised
    server.wait_for_line("went away")
    with server.client() as client:
        stats = server.wait_until(client, lambda s: s["disconnected"] == 1)
        client.get("/healthz", params={"probe": "after"})
    server.wait_for_line("/healthz?probe=after")
    assert not any("Traceback" in line or "Exception" in line for line in server.lines)
    posts = [line for line in _access_lines(server) if "POST /v1/classify" in line]
    assert len(posts) == 1 and '" 499 ' in posts[0], posts
    assert stats["requests"] == 1 and stats["ok"] == 0


def test_client_that_leaves_while_queued_frees_its_place(serve, photos):
    # The batch waits (up to 10 min) for a 2nd image: the 1st is queued when its client leaves.
    server = serve("--max-batch", "2", "--max-wait-ms", "600000")
    data = photos[0].read_bytes()
    with server.client() as client:
        with _connect(server.url) as sock:
            sock.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
            server.wait_until(client, lambda s: s["waiting"] == 1)
        stats = server.wait_until(client, lambda s: s["disconnected"] == 1)
    assert stats["waiting"] == 0 and stats["ok"] == 0
    assert not any("Traceback" in line for line in server.lines)


def test_stalled_upload_gets_408_and_lets_go(serve, photos):
    server = serve("--body-timeout-s", "0.5")
    with _connect(server.url) as sock:
        sock.sendall(STALLED_HEAD + b"\xff\xd8\xff\xe0")
        answer = _read_answer(sock)  # the server answers and closes; the client never did
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    head, body = answer.split(b"\r\n\r\n", 1)
    assert body.startswith(b'{"error":"the request body did not arrive within 0.5 s"')
    with server.client() as client:
        assert client.get("/v1/stats").json()["body_timeouts"] == 1
        response = client.post("/v1/classify",
                               files={"file": (photos[0].name, photos[0].read_bytes())})
    assert response.status_code == 200
    assert any('" 408 ' in line for line in _access_lines(server))


def test_connections_over_the_cap_get_503(serve):
    server = serve("--max-connections", "3")
    idle = [_connect(server.url) for _ in range(2)]
    try:
        for sock in idle:  # answered: the server holds these connections open now
            assert _get(sock, "/healthz").startswith(b"HTTP/1.1 200")
        with _connect(server.url) as third:
            assert _get(third, "/healthz").startswith(b"HTTP/1.1 503")
    finally:
        for sock in idle:
            sock.close()
    for _ in range(POLLS):  # the server notices the closed connections soon after
        with _connect(server.url) as sock:
            if _get(sock, "/healthz").startswith(b"HTTP/1.1 200"):
                break
    else:
        raise AssertionError("connections were still refused after the others closed")


def test_images_over_the_serve_pixel_budget_are_refused_before_decoding(server, photos):
    """Three 9000x9000 PNGs (81 Mpx, under the file budget, a few seconds of decoding each)
    would hold both decode threads; the server's budget refuses them from their headers."""
    huge = _blank_png(9000, 9000)

    def post(data: bytes, name: str):
        with server.client() as client:
            return client.post("/v1/classify", files={"file": (name, data)})

    with ThreadPoolExecutor(3) as pool:
        refused = list(pool.map(post, [huge] * 3, ["huge.png"] * 3))
    for response in refused:
        assert response.status_code == 422, response.text
        assert "over the pixel budget of 24,000,000 px" in response.json()["error"]
    assert post(photos[0].read_bytes(), photos[0].name).status_code == 200
    with server.client() as client:
        assert client.get("/v1/model").json()["limits"]["max_pixels"] == 24_000_000


def test_shutdown_waits_at_most_shutdown_timeout(serve, photos):
    # The one queued image waits 10 min for company: only the shutdown timeout ends it.
    server = serve("--max-batch", "2", "--max-wait-ms", "600000", "--shutdown-timeout-s", "1")

    def post():
        with server.client() as client:
            return client.post("/v1/classify",
                               files={"file": (photos[0].name, photos[0].read_bytes())})

    with ThreadPoolExecutor(1) as pool, server.client() as client:
        pending = pool.submit(post)
        server.wait_until(client, lambda s: s["waiting"] == 1)
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=120) == 0
        cut_off = pending.result()
    assert cut_off.status_code == 503
    assert cut_off.json() == {"error": "the server shut down before answering"}
    assert not any("Traceback" in line for line in server.lines)
    assert any("graceful shutdown" in line.lower() for line in server.lines), server.lines[-5:]


def test_port_in_use_is_one_line_and_exit_2():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _serve_cli("--host", "127.0.0.1", "--port", str(port))
    assert result.returncode == 2
    assert result.stderr == (f"flowae-serve: error: cannot listen on 127.0.0.1:{port} "
                             "(address already in use)\n")


def test_unknown_host_is_one_line_and_exit_2():
    result = _serve_cli("--host", "no-such-host.invalid", "--port", "0")
    assert result.returncode == 2
    assert result.stderr.startswith(
        "flowae-serve: error: cannot listen on no-such-host.invalid:0 (")
    assert result.stderr.count("\n") == 1


@pytest.fixture
def unverified_model(tmp_path):
    """The bundled model's graphs without the manifest that vouches for them."""
    model = shutil.copytree(DEFAULT_MODEL_DIR, tmp_path / "model")
    (model / "manifest.json").unlink()
    return model


def test_model_without_manifest_is_refused(unverified_model):
    result = _serve_cli("--model", str(unverified_model), "--port", "0")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "--allow-unverified" in result.stderr
    assert result.stderr.startswith("flowae-serve: error: ") and "manifest.json" in result.stderr


def test_allow_unverified_serves_with_a_warning(serve, unverified_model, photos, expected):
    server = serve("--model", str(unverified_model), "--allow-unverified")
    server.wait_for_line("serving graphs that were not verified")
    with server.client() as client:
        response = client.post("/v1/classify",
                               files={"file": (photos[0].name, photos[0].read_bytes())})
        assert client.get("/v1/model").json()["files"] == {}  # nothing unverified offered
    assert response.status_code == 200
    assert response.json()["top_k"][0]["label"] == expected[photos[0].name]["top_k"][0]["label"]


def test_a_timed_out_request_never_decodes(predictor, photos):
    """The one decode thread is busy when the request comes; it times out (504) while its
    decode waits; once the thread is free, only the next request's decode runs."""
    import httpx

    from flowae.runtime.serve.app import ServeConfig, create_app

    app = create_app(ServeConfig(provider="cpu", threads=1, decode_workers=1, timeout_s=0.5),
                     predictor)
    upload = {"file": (photos[0].name, photos[0].read_bytes())}

    async def scenario() -> tuple[int, int, dict]:
        release = threading.Event()
        async with app.router.lifespan_context(app):
            busy = app.state.decode_pool.submit(release.wait)
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://serve") as client:
                abandoned = await client.post("/v1/classify", files=upload)
                release.set()
                await asyncio.wrap_future(busy)
                answered = await client.post("/v1/classify", files=upload)
                stats = (await client.get("/v1/stats")).json()
        return abandoned.status_code, answered.status_code, stats

    abandoned, answered, stats = asyncio.run(scenario())
    assert (abandoned, answered) == (504, 200)
    assert stats["decodes_started"] == 1 and stats["timeouts"] == 1
