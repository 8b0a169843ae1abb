"""Serve load: flowae-serve under concurrent clients, with and without micro-batching, against
flowae-infer on the same photos.

It starts `flowae-serve` as a subprocess on 127.0.0.1 (port 0) once with `--max-batch N` and
once with `--max-batch 1`, and drives each with `clients` concurrent HTTP clients (httpx,
asyncio) sending `requests` uploads of the full-size photos (bytes read once, in memory),
every `bad_every`-th one a bad upload (not an image, truncated JPEG, empty body, wrong
Content-Type, in turn). Every good answer is checked against the Python runtime's own answer
for that photo (same top-5 labels, probabilities within 1e-5); every bad one must be a 4xx.
Latency is per request (time.perf_counter around the HTTP call), the rate is requests over the
whole run's wall time; the batch sizes come from the server's /v1/stats. flowae-infer runs once
as a subprocess over the same photos (start-up, model load and every photo). Bounded by
`requests` and `time_limit_s`; the clients share the machine's cores with the server, and
the load average is recorded. Writes serve_load.json and .md into --out. Imports the standard
library, numpy, httpx, click and the runtime; nothing imports it.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import click

from benchmarks.machine import load_average, machine_header
from benchmarks.options import DEFAULT_OUT, DEFAULT_PHOTOS, REPO, BenchmarkError
from benchmarks.report import Column, Section, echo_paths, write_report
from benchmarks.timing import latency_stats
from flowae.runtime.errors import FlowaeError

NAME = "serve_load"
START_TIMEOUT_S = 120.0
PROBABILITY_ATOL = 1e-5  # the server rounds to 6 decimals, as flowae-infer --json does


@dataclass(frozen=True)
class LoadConfig:
    """Every default of a run; QUICK is the size the tests run."""

    requests: int = 2000  # per server configuration
    clients: int = 32  # concurrent connections
    bad_every: int = 10  # every n-th request is a bad upload (0: none)
    max_batch: int = 16  # the micro-batching configuration's --max-batch
    max_wait_ms: float = 5.0
    photos: int = 306  # how many of the full-size photos (sorted names)
    time_limit_s: float = 600.0  # per configuration: stop sending after this
    server_threads: int | None = None  # onnxruntime threads in the server (None: its default)


QUICK = LoadConfig(requests=50, clients=8, bad_every=5, photos=6, time_limit_s=120.0)


def bad_uploads(photo_bytes: bytes) -> list[tuple[str, dict]]:
    """(kind, httpx request arguments) for each kind of bad upload, sent in turn."""
    return [
        ("not an image", {"files": {"file": ("x.jpg", b"definitely not a JPEG")}}),
        ("truncated", {"files": {"file": ("t.jpg", photo_bytes[: len(photo_bytes) // 4])}}),
        ("empty body", {"content": b"", "headers": {"Content-Type": "image/jpeg"}}),
        ("wrong type", {"content": photo_bytes, "headers": {"Content-Type": "text/plain"}}),
    ]


def reference_answers(paths: list[Path]) -> dict[str, list[tuple[int, float]]]:
    """name -> the Python runtime's top-5 (label, probability), flowae-infer's defaults."""
    from flowae.runtime.predictor import Predictor

    predictor = Predictor(provider="cpu")
    return {Path(r.source).name: [(p.label, p.probability) for p in r.top_k]
            for r in predictor.run(paths, top_k=5)}


def start_server(options: list[str]) -> tuple[subprocess.Popen, str]:
    """flowae-serve on 127.0.0.1, port 0; returns the process and its URL once it listens."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "flowae.runtime.serve.cli", "--host", "127.0.0.1", "--port", "0",
         "--provider", "cpu", *options],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO)
    found: list[str] = []
    ready = threading.Event()

    def watch() -> None:  # reads stderr (the access log too) so the server never blocks on it
        for line in proc.stderr:
            if "running on http://" in line and not found:
                found.append(line.split("running on ", 1)[1].split(" ", 1)[0])
                ready.set()
        ready.set()

    threading.Thread(target=watch, daemon=True).start()
    if not ready.wait(START_TIMEOUT_S) or not found:
        proc.kill()
        raise BenchmarkError(f"flowae-serve {' '.join(options)} did not start")
    return proc, found[0]


async def _drive(url: str, photos: list[tuple[str, bytes]], config: LoadConfig) -> list[dict]:
    """Send config.requests uploads over config.clients connections; one record per request."""
    import httpx

    bad = bad_uploads(photos[0][1])
    records: list[dict] = []
    counter = iter(range(config.requests))
    deadline = time.perf_counter() + config.time_limit_s
    limits = httpx.Limits(max_connections=config.clients)

    async def client_loop(client: httpx.AsyncClient) -> None:
        for index in counter:
            if time.perf_counter() > deadline:
                return
            is_bad = config.bad_every and index % config.bad_every == config.bad_every - 1
            if is_bad:
                kind, request = bad[(index // config.bad_every) % len(bad)]
                name = None
            else:
                name, data = photos[index % len(photos)]
                kind, request = "good", {"files": {"file": (name, data, "image/jpeg")}}
            start = time.perf_counter()
            try:
                response = await client.post("/v1/classify", **request)
                status, body = response.status_code, response.content
            except httpx.HTTPError as exc:  # a dropped connection counts as a failure
                status, body = 0, str(exc).encode()
            records.append({"kind": kind, "name": name, "status": status, "body": body,
                            "latency_ms": (time.perf_counter() - start) * 1e3})

    async with httpx.AsyncClient(base_url=url, timeout=120.0, limits=limits) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(config.clients)))
    return records


def _correct(record: dict, reference: dict) -> bool:
    answer = json.loads(record["body"])["top_k"]
    want = reference[record["name"]]
    return [p["label"] for p in answer] == [label for label, _ in want] and all(
        abs(p["probability"] - prob) <= PROBABILITY_ATOL
        for p, (_, prob) in zip(answer, want, strict=True))


def summarize(label: str, records: list[dict], wall_s: float, stats: dict,
              reference: dict) -> dict:
    good = [r for r in records if r["kind"] == "good"]
    bad = [r for r in records if r["kind"] != "good"]
    good_ok = [r for r in good if r["status"] == 200]
    sizes = {int(k): v for k, v in stats.get("batch_sizes", {}).items()}
    images = sum(k * v for k, v in sizes.items())
    return {
        "server": label, "requests": len(records), "good": len(good), "bad": len(bad),
        "status_5xx": sum(r["status"] >= 500 for r in records),
        "failed_connections": sum(r["status"] == 0 for r in records),
        "good_not_200": len(good) - len(good_ok),
        "good_wrong": sum(not _correct(r, reference) for r in good_ok),
        "bad_not_4xx": sum(not 400 <= r["status"] < 500 for r in bad),
        "wall_s": wall_s, "requests_per_s": len(records) / wall_s,
        "images_per_s": len(good_ok) / wall_s,
        **latency_stats([r["latency_ms"] for r in good_ok], "good_"),
        **latency_stats([r["latency_ms"] for r in bad], "bad_"),
        "batches": stats.get("batches"), "largest_batch": stats.get("largest_batch"),
        "mean_batch": images / max(sum(sizes.values()), 1), "batch_sizes": sizes,
    }


def load_row(label: str, options: list[str], photos: list[tuple[str, bytes]],
             config: LoadConfig, reference: dict) -> dict:
    """Start a server with `options`, warm it up, run the load, stop it cleanly."""
    import httpx

    proc, url = start_server(options)
    try:
        warm = httpx.post(url + "/v1/classify", files={"file": photos[0]}, timeout=120)
        if warm.status_code != 200:
            raise BenchmarkError(f"warm-up request answered {warm.status_code}: {warm.text}")
        before = httpx.get(url + "/v1/stats").json()
        start = time.perf_counter()
        records = asyncio.run(_drive(url, photos, config))
        wall_s = time.perf_counter() - start
        after = httpx.get(url + "/v1/stats").json()
    finally:
        proc.terminate()
        exit_code = proc.wait(timeout=120)
    run_sizes = {k: v - before["batch_sizes"].get(k, 0) for k, v in after["batch_sizes"].items()}
    stats = {"batch_sizes": {k: v for k, v in run_sizes.items() if v},
             "batches": after["batches"] - before["batches"],
             "largest_batch": max((int(k) for k, v in run_sizes.items() if v), default=0)}
    row = summarize(label, records, wall_s, stats, reference)
    row["server_exit_code"] = exit_code
    return row


def infer_row(paths: list[Path]) -> dict:
    """flowae-infer --json over the same photos, as one subprocess (start-up included)."""
    command = [sys.executable, "-m", "flowae.runtime.cli", "--json", "--provider", "cpu",
               "--no-progress", *map(str, paths)]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    wall_s = time.perf_counter() - start
    if done.returncode != 0:
        raise BenchmarkError(f"flowae-infer failed: {done.stderr.strip().splitlines()[-1:]}")
    return {"server": "flowae-infer (one process, no HTTP)", "requests": len(paths),
            "good": len(paths), "bad": 0, "wall_s": wall_s,
            "images_per_s": len(paths) / wall_s, "requests_per_s": None}


def run_load(photo_dir: Path, config: LoadConfig, progress=None) -> list[dict]:
    paths = sorted(photo_dir.glob("*.jpg"))[: config.photos]
    if not paths:
        raise BenchmarkError(f"{photo_dir}: no .jpg photos")
    say = progress or (lambda text: None)
    photos = [(p.name, p.read_bytes()) for p in paths]
    reference = reference_answers(paths)
    common = ["--max-wait-ms", str(config.max_wait_ms), "--max-queue", "1024"]
    if config.server_threads:
        common += ["--threads", str(config.server_threads)]
    rows = []
    for label, max_batch in ((f"micro-batching (--max-batch {config.max_batch})",
                              config.max_batch), ("no batching (--max-batch 1)", 1)):
        say(f"{label}: {config.requests} requests, {config.clients} clients")
        rows.append(load_row(label, [*common, "--max-batch", str(max_batch)], photos, config,
                             reference))
    say("flowae-infer on the same photos")
    rows.append(infer_row(paths))
    return rows


COLUMNS = [Column("server", "server"), Column("requests", "requests"),
           Column("bad", "bad uploads"), Column("status_5xx", "5xx"),
           Column("good_not_200", "good not 200"), Column("good_wrong", "wrong answers"),
           Column("bad_not_4xx", "bad not 4xx"),
           Column("good_p50_ms", "p50 ms", "{:.1f}"), Column("good_p99_ms", "p99 ms", "{:.1f}"),
           Column("requests_per_s", "requests/s", "{:.1f}"),
           Column("images_per_s", "photos/s", "{:.1f}"),
           Column("mean_batch", "mean batch", "{:.2f}"), Column("largest_batch", "largest batch")]


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--photos", type=click.Path(path_type=Path), default=DEFAULT_PHOTOS,
              show_default=True, help="Folder with jpg/ of full-size photos.")
@click.option("--out", type=click.Path(path_type=Path), default=DEFAULT_OUT / NAME,
              show_default=True, help="Folder for serve_load.json and .md.")
@click.option("--quick", is_flag=True, help="Test size: 50 requests, 8 clients, 6 photos.")
@click.option("--requests", default=LoadConfig.requests, type=click.IntRange(min=1),
              show_default=True, help="Requests per server configuration.")
@click.option("--clients", default=LoadConfig.clients, type=click.IntRange(min=1),
              show_default=True, help="Concurrent connections.")
@click.option("--bad-every", default=LoadConfig.bad_every, type=click.IntRange(min=0),
              show_default=True, help="Every n-th request is a bad upload (0: none).")
@click.option("--max-batch", default=LoadConfig.max_batch, type=click.IntRange(min=2),
              show_default=True, help="--max-batch of the micro-batching server.")
@click.option("--time-limit-s", default=LoadConfig.time_limit_s, type=click.FloatRange(min=1),
              show_default=True, help="Per configuration: stop sending after this.")
def main(photos: Path, out: Path, quick: bool, requests: int, clients: int, bad_every: int,
         max_batch: int, time_limit_s: float) -> None:
    """flowae-serve under load, with and without micro-batching, vs flowae-infer."""
    config = QUICK if quick else LoadConfig(requests=requests, clients=clients,
                                            bad_every=bad_every, max_batch=max_batch,
                                            time_limit_s=time_limit_s)
    header = machine_header(torch_info=False)
    try:
        rows = run_load(photos / "jpg", config,
                        progress=lambda text: click.echo(f"{NAME}: {text}", err=True))
    except FlowaeError as exc:
        raise click.ClickException(str(exc)) from None
    header["settings"] = {"config": json.dumps(asdict(config)),
                          "server": "flowae-serve --provider cpu, default onnxruntime threads, "
                                    "2 decode workers, JPEG draft decoding (flowae-infer's "
                                    "default); clients: httpx.AsyncClient in this process"}
    notes = ["Latency is per good request, client side (upload, queue, batch, answer); "
             "requests/s counts every request over the run's wall time.",
             "The clients run on the same cores as the server; the machine is shared (load "
             "average above): compare rows of one report, not across reports.",
             "flowae-infer's row is one process over the photos once (start-up and model load "
             "included), the runtime without HTTP."]
    paths = write_report(out, NAME, "Serve load: flowae-serve with and without micro-batching",
                         header, rows, [Section("Load", rows, COLUMNS, notes)])
    click.echo(paths["markdown"].read_text())
    click.echo(echo_paths(paths))
    click.echo(f"load average (1 min) at end: {load_average()}", err=True)


if __name__ == "__main__":
    main()
