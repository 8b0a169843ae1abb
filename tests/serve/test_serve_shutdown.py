"""Clean shutdown of a real flowae-serve process: on SIGTERM or SIGINT the requests already
in flight are answered (uvicorn's graceful shutdown, then the batcher drains), the process
exits 0, and nothing listens any more. Also the command's own exits: a missing [serve]
extra, a bad model, --version."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

IN_FLIGHT = 3


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_lets_in_flight_requests_finish(serve, photos, expected, sig):
    # The batch waits for a 4th image that never comes: the requests are in flight, queued.
    server = serve("--max-batch", str(IN_FLIGHT + 1), "--max-wait-ms", "2000")

    def post(photo):
        with server.client() as client:
            return client.post("/v1/classify", files={"file": (photo.name, photo.read_bytes())})

    with ThreadPoolExecutor(IN_FLIGHT) as pool, server.client() as client:
        futures = [pool.submit(post, photos[i % len(photos)]) for i in range(IN_FLIGHT)]
        server.wait_until(client, lambda stats: stats["waiting"] == IN_FLIGHT)
        server.proc.send_signal(sig)
        answers = [future.result() for future in futures]
    assert server.proc.wait(timeout=60) == 0
    for i, response in enumerate(answers):
        assert response.status_code == 200, response.text
        name = photos[i % len(photos)].name
        assert response.json()["top_k"][0]["label"] == expected[name]["top_k"][0]["label"]
    import httpx

    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/healthz", timeout=5)
    assert any("Finished server process" in line for line in server.lines)


def _serve_cli(*arguments: str, blocked: str = "") -> subprocess.CompletedProcess:
    """Run flowae-serve's main in a fresh interpreter, optionally with a module unimportable."""
    code = (f"import sys; sys.modules.update({{m: None for m in {blocked!r}.split() if m}}); "
            "from flowae.runtime.serve.cli import main; sys.argv[0] = 'flowae-serve'; main()")
    return subprocess.run([sys.executable, "-c", code, *arguments], capture_output=True,
                          text=True, timeout=120)


def test_missing_extra_is_one_line_and_exit_2():
    result = _serve_cli("--port", "0", blocked="starlette uvicorn")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "pip install 'flowae[serve]'" in result.stderr


def test_bad_model_is_one_line_and_exit_2(tmp_path):
    result = _serve_cli("--model", str(tmp_path / "nowhere"), "--port", "0")
    assert result.returncode == 2
    assert result.stderr.startswith("flowae-serve: ") and "Traceback" not in result.stderr


def test_version():
    result = _serve_cli("--version")
    assert result.returncode == 0 and "flowae-serve" in result.stdout


def test_a_tampered_graph_file_refuses_the_model(tmp_path):
    """Every graph the page may download is checked against the manifest before serving,
    not only the ones the Predictor loads (here the fp32 decoder, unused on CPU)."""
    from flowae.runtime.modeldir import DEFAULT_MODEL_DIR

    model = shutil.copytree(DEFAULT_MODEL_DIR, tmp_path / "model")
    graph = model / "decoder.onnx"
    data = graph.read_bytes()
    graph.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))  # one bit pattern changed
    result = _serve_cli("--model", str(model), "--port", "0")
    assert result.returncode == 2
    assert "decoder.onnx" in result.stderr and "sha256" in result.stderr
    assert result.stderr.count("\n") == 1
