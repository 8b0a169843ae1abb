"""Micro-batching, back-pressure and timeouts on a real server: concurrent requests share a
model call (and still get their own right answers), a full queue answers 503 with
Retry-After, a request past --timeout-s answers 504, and --max-batch 1 turns grouping off."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

CONCURRENT = 4


def _post(server, photo):
    with server.client() as client:
        return client.post("/v1/classify", files={"file": (photo.name, photo.read_bytes())})


def _send_together(server, photos, count: int):
    """`count` uploads at once, cycling through `photos`; (photo, response) pairs."""
    chosen = [photos[i % len(photos)] for i in range(count)]
    with ThreadPoolExecutor(count) as pool:
        return list(zip(chosen, pool.map(lambda p: _post(server, p), chosen), strict=True))


def test_concurrent_requests_share_one_model_call(serve, photos, expected):
    # A long wait: the batch runs as soon as CONCURRENT images are in, never on the timer.
    server = serve("--max-batch", str(CONCURRENT), "--max-wait-ms", "30000")
    answers = _send_together(server, photos, CONCURRENT)
    for photo, response in answers:
        assert response.status_code == 200, response.text
        got, want = response.json(), expected[photo.name]
        assert [p["label"] for p in got["top_k"]] == [p["label"] for p in want["top_k"]]
        for a, b in zip(got["top_k"], want["top_k"], strict=True):
            assert a["probability"] == pytest.approx(b["probability"], abs=1e-5)
    with server.client() as client:
        stats = client.get("/v1/stats").json()
    assert stats["batch_sizes"] == {str(CONCURRENT): 1}
    assert stats["largest_batch"] == CONCURRENT > 1


def test_max_batch_one_never_groups(serve, photos):
    server = serve("--max-batch", "1", "--max-wait-ms", "30000")
    answers = _send_together(server, photos, CONCURRENT)
    assert [r.status_code for _, r in answers] == [200] * CONCURRENT
    with server.client() as client:
        stats = client.get("/v1/stats").json()
    assert stats["batch_sizes"] == {"1": CONCURRENT}


def test_full_queue_answers_503_with_retry_after(serve, photos):
    server = serve("--max-queue", "1", "--max-batch", "8", "--max-wait-ms", "3000")
    with ThreadPoolExecutor(1) as pool, server.client() as client:
        first = pool.submit(_post, server, photos[0])  # waits in the queue for company
        server.wait_until(client, lambda stats: stats["waiting"] == 1)
        refused = client.post("/v1/classify", files={"file": ("b.jpg", photos[1].read_bytes())})
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "1"
        assert "busy" in refused.json()["error"]
        assert first.result().status_code == 200  # the admitted one is still answered
        after = client.post("/v1/classify", files={"file": ("c.jpg", photos[1].read_bytes())})
        assert after.status_code == 200
        assert client.get("/v1/stats").json()["rejected_busy"] == 1


def test_request_past_its_timeout_answers_504(serve, photos):
    server = serve("--timeout-s", "0.000001")  # no image decodes in a microsecond
    with server.client() as client:
        response = client.post("/v1/classify", files={"file": ("a.jpg", photos[0].read_bytes())})
        assert response.status_code == 504
        assert "within" in response.json()["error"]
        assert client.get("/healthz").status_code == 200
        assert client.get("/v1/stats").json()["timeouts"] == 1
