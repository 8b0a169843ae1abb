"""The HTTP API against a real flowae-serve subprocess: every endpoint, every kind of bad
input (each a 4xx with a one-line JSON error, worded as for a file, the next good request
still answered), model files without path traversal, and the access log."""

from __future__ import annotations

import io
import json
import socket
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
from PIL import Image

from flowae.runtime.contract import MANIFEST_FILES, Preprocess
from flowae.runtime.errors import ImageError
from flowae.runtime.images import load_rgb
from flowae.runtime.modeldir import DEFAULT_MODEL_DIR


def _classify(client, data: bytes, name: str = "photo.jpg", **params):
    return client.post("/v1/classify", params=params, files={"file": (name, data, "image/jpeg")})


def _assert_same_answer(got: dict, want: dict, name: str) -> None:
    assert got["image"] == name
    assert [p["label"] for p in got["top_k"]] == [p["label"] for p in want["top_k"]]
    assert [p["class_name"] for p in got["top_k"]] == [p["class_name"] for p in want["top_k"]]
    for a, b in zip(got["top_k"], want["top_k"], strict=True):
        assert a["probability"] == pytest.approx(b["probability"], abs=1e-5)


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_classify_answers_what_flowae_infer_prints(server, photos, expected):
    with server.client() as client:
        for photo in photos:  # multipart upload
            response = _classify(client, photo.read_bytes(), photo.name)
            assert response.status_code == 200, response.text
            _assert_same_answer(response.json(), expected[photo.name], photo.name)
        raw = client.post("/v1/classify", content=photos[0].read_bytes(),
                          headers={"Content-Type": "image/jpeg"}, params={"top_k": 2})
    assert raw.status_code == 200
    assert raw.json()["image"] == "upload"
    assert raw.json()["top_k"] == expected[photos[0].name]["top_k"][:2]


def test_reconstruct_is_a_png_of_input_beside_reconstruction(server, photos, predictor):
    with server.client() as client:
        response = client.post("/v1/reconstruct",
                               files={"file": (photos[0].name, photos[0].read_bytes())})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    pair = np.asarray(Image.open(io.BytesIO(response.content)))
    side = predictor.preprocess.image_size_px
    assert pair.shape == (side, 2 * side, 3)
    (result,) = predictor.run([photos[0]], reconstruct=True)
    np.testing.assert_array_equal(pair[:, :side], np.asarray(result.model_input))
    diff = np.abs(pair[:, side:].astype(int) - np.asarray(result.reconstruction).astype(int))
    assert diff.max() <= 1  # the same decoder on the same latent, batched differently


def test_model_describes_itself_and_serves_only_manifest_graphs(server, predictor):
    with server.client() as client:
        model = client.get("/v1/model").json()
        assert model["class_names"] == list(predictor.class_names)
        assert Preprocess.from_dict(model["preprocess"]) == predictor.preprocess
        assert model["precision"] == predictor.files.precision
        assert model["provider"] == "cpu"
        assert model["versions"]["flowae"]
        manifest = json.loads((DEFAULT_MODEL_DIR / "manifest.json").read_text())
        for precision in ("fp32", "int8"):
            url = model["graphs"][precision]["encoder_classifier"]
            body = client.get(url)
            assert body.status_code == 200
            name = url.rsplit("/", 1)[1]
            assert len(body.content) == manifest[MANIFEST_FILES][name]["size_bytes"]
    for bad in ("manifest.json", "..%2Fpredictor.py", "%2Fetc%2Fpasswd", "..", "nope.onnx",
                "../../contract.py", "..%2F..%2Fpyproject.toml", "%2e%2e/manifest.json"):
        # Sent byte for byte: an HTTP client would tidy "../" away before the server saw it.
        answer = _raw_request(server.url, f"GET /v1/model/files/{bad} HTTP/1.1\r\n"
                                          "Host: x\r\nConnection: close\r\n\r\n".encode())
        assert answer.startswith(b"HTTP/1.1 404"), (bad, answer[:100])
        assert answer.endswith(b"}") and b'{"error":' in answer, bad


def test_health_openapi_page_and_unknown_routes(server):
    with server.client() as client:
        assert client.get("/healthz").json()["status"] == "ok"
        spec = client.get("/openapi.json").json()
        assert {"/v1/classify", "/v1/reconstruct", "/v1/model", "/healthz"} <= set(spec["paths"])
        page = client.get("/")
        assert page.status_code == 200 and "on this device" in page.text
        assert client.get("/nowhere").json() == {"error": "Not Found"}
        assert client.get("/v1/classify").status_code == 405


def _bad_inputs(photo: Path) -> list[tuple[str, dict, int]]:
    data = photo.read_bytes()
    bomb = io.BytesIO()
    Image.new("1", (12_000, 12_000)).save(bomb, format="PNG")  # 144 Mpx in a few kB
    return [
        ("not an image", {"files": {"file": ("a.jpg", b"hello, not a JPEG")}}, 422),
        ("truncated", {"files": {"file": ("t.jpg", data[: len(data) // 3])}}, 422),
        ("bomb", {"files": {"file": ("bomb.png", bomb.getvalue())}}, 422),
        ("empty body", {"content": b"", "headers": {"Content-Type": "image/jpeg"}}, 400),
        ("empty file", {"files": {"file": ("e.jpg", b"")}}, 400),
        ("no file in form", {"data": {"name": "x"}, "files": {"other": ("", b"")}}, 400),
        ("wrong type", {"content": data, "headers": {"Content-Type": "application/json"}}, 415),
        ("no type", {"content": data}, 415),
        ("bad top_k", {"files": {"file": ("a.jpg", data)}, "params": {"top_k": "0"}}, 400),
        ("huge top_k", {"files": {"file": ("a.jpg", data)}, "params": {"top_k": "500"}}, 400),
        ("broken form", {"content": b"--x\r\nbroken",
                         "headers": {"Content-Type": "multipart/form-data; boundary=x"}}, 400),
    ]


def test_bad_inputs_get_one_line_json_4xx_and_the_server_goes_on(server, photos, expected):
    with server.client() as client:
        for label, request, status in _bad_inputs(photos[0]):
            response = client.post("/v1/classify", **request)
            assert response.status_code == status, (label, response.text)
            body = response.json()
            assert set(body) == {"error"} and "\n" not in body["error"], label
            good = _classify(client, photos[1].read_bytes(), photos[1].name)
            assert good.status_code == 200, label
            _assert_same_answer(good.json(), expected[photos[1].name], photos[1].name)


def test_an_unusable_upload_gets_the_error_the_same_file_gets(server, photos, predictor,
                                                              tmp_path):
    """The server decodes bytes by the rules flowae-infer applies to a file: the same line,
    with the upload's name where the file's path was."""
    by_label = {label: request["files"]["file"] for label, request, status
                in _bad_inputs(photos[0]) if status == 422}
    assert set(by_label) == {"not an image", "truncated", "bomb"}
    with server.client() as client:
        for label, (name, data) in by_label.items():
            path = tmp_path / name
            path.write_bytes(data)
            with pytest.raises(ImageError) as caught:
                load_rgb(path, draft_px=predictor.preprocess.resize_px,
                         jpeg_draft=predictor.jpeg_draft, max_pixels=predictor.max_pixels)
            answer = client.post("/v1/classify", files={"file": (name, data)})
            assert answer.status_code == 422, label
            assert answer.json()["error"] == str(caught.value).replace(str(path), name, 1)


def _raw_request(url: str, head: bytes, body: bytes = b"") -> bytes:
    """Send bytes as they are (a lying Content-Length, a chunked body) and read the answer."""
    parsed = urlparse(url)
    with socket.create_connection((parsed.hostname, parsed.port), timeout=60) as sock:
        sock.sendall(head + body)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def test_uploads_over_the_limit_get_413_by_length_and_by_counted_bytes(serve, photos):
    server = serve("--max-upload-mb", "1")
    declared = _raw_request(server.url, b"POST /v1/classify HTTP/1.1\r\nHost: x\r\n"
                            b"Content-Type: image/jpeg\r\nContent-Length: 5000000\r\n\r\n")
    assert declared.startswith(b"HTTP/1.1 413"), declared[:200]
    assert b'{"error":' in declared
    chunk = b"\xff" * 65536
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(17)) + b"0\r\n\r\n"
    counted = _raw_request(server.url, b"POST /v1/classify HTTP/1.1\r\nHost: x\r\n"
                           b"Content-Type: image/jpeg\r\nTransfer-Encoding: chunked\r\n\r\n", body)
    assert counted.startswith(b"HTTP/1.1 413"), counted[:200]
    with server.client() as client:
        assert _classify(client, photos[0].read_bytes()).status_code == 200  # 1 MB is enough
        big = _png(np.random.default_rng(0).integers(0, 256, (700, 700, 3), dtype=np.uint8))
        assert len(big) > 1024 * 1024
        response = _classify(client, big, "big.png")
        assert response.status_code == 413 and "limit" in response.json()["error"]


def test_access_log_has_one_line_per_request(server):
    with server.client() as client:
        client.get("/healthz", params={"probe": "access-log"})
        client.post("/v1/classify", content=b"x", headers={"Content-Type": "text/plain"})
        client.get("/healthz", params={"probe": "last"})
    server.wait_for_line("/healthz?probe=last")  # lines come in order: the others are in
    lines = [line for line in server.lines if "flowae.serve.access" in line]
    probe = [line for line in lines if "/healthz?probe=access-log" in line]
    assert len(probe) == 1
    assert '"GET /healthz?probe=access-log HTTP/1.1" 200 ' in probe[0]
    assert probe[0].endswith("ms")
    assert any('"POST /v1/classify HTTP/1.1" 415 ' in line for line in lines)
