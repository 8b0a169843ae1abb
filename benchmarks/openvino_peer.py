"""OpenVINO as the peer a user on an Intel (or any x86) CPU would pick, beside onnxruntime CPU.

One run, the same verified .onnx files (the encoder+classifier in fp32 and int8 QDQ) and the
same preprocessed test-split images for every row: onnxruntime's CPU provider through the
runtime's session factory (what flowae serves); the OpenVINO runtime (`Core().read_model` on
the .onnx file, compiled for CPU with static shapes per batch size, INFERENCE_NUM_THREADS,
the latency hint, and an explicit f32 inference precision plus, where the CPU's default
differs (bf16 on CPUs with bf16 instructions), a row with that default); and onnxruntime's
OpenVINO execution provider, which lives in the onnxruntime-openvino package that replaces
onnxruntime, so it runs in a subprocess of another venv given by --ovep-python (without it
the rows say why they are skipped). Per row: session/compile time, first call, batch-1
p50/p90 and batch-64 images/s (rows timed in turn, several rounds), test-split top-1, top-1
agreement and max |logit difference| with onnxruntime fp32, and ratios against onnxruntime
on the same graph and on the precision flowae serves. Writes openvino_peer.json and .md
into --out.

The measuring core (`prepare`, `measure`, `ort_ep_rows`) imports only the standard library,
numpy and benchmarks.timing, so the OpenVINO-EP worker can import this module in a venv
holding just numpy and onnxruntime-openvino; click, openvino and the runtime are imported
inside the functions that use them. Nothing imports this module but that worker.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np

from benchmarks.timing import (
    TimingPlan,
    latency_stats,
    ratio,
    time_calls_ms,
    time_once_ms,
)

NAME = "openvino_peer"
REPO = Path(__file__).resolve().parents[1]
INPUT, LOGITS = "image", "logits"  # the contract's names (flowae.runtime.contract), which
# the worker venv cannot import; main() checks they still agree.
ORT_CPU, OPENVINO, ORT_OPENVINO = "onnxruntime CPU", "OpenVINO runtime", "onnxruntime OpenVINO EP"
GRAPHS = ("fp32", "int8")  # the encoder_classifier files compared


@dataclass(frozen=True)
class PeerConfig:
    """Every default of a run; QUICK is the smoke-test size."""

    threads: tuple[int, ...] = (1, 2)  # CPU threads, one row per value
    batch_size: int = 64  # the throughput batch
    max_images: int | None = 2000  # test-split images for top-1 (None: all 6149)
    rounds: int = 3  # every row timed this many times over, in turn (load hits all alike)
    warmup: int = 5  # untimed calls before each timed series
    repeats: int = 100  # timed calls per series at most
    budget_s: float = 0.7  # seconds per series, after at least min_repeats calls
    min_repeats: int = 5


QUICK = PeerConfig(threads=(1,), batch_size=8, max_images=32, rounds=1, warmup=1, repeats=10,
                   budget_s=0.2, min_repeats=2)

Runner = Callable[[np.ndarray], np.ndarray]  # float32 (B, 3, S, S) -> logits (B, classes)
Compile = Callable[[int], Runner]  # batch size -> a runner for inputs of that batch size


# ----------------------------------------------------------------------------- measuring core
def _batch_of(images: np.ndarray, batch: int) -> np.ndarray:
    """The first `batch` images, repeated when there are fewer."""
    reps = -(-batch // len(images))
    return np.ascontiguousarray(np.concatenate([images] * reps)[:batch])


def all_logits(run: Runner, images: np.ndarray, batch: int) -> np.ndarray:
    """Logits of every image, `batch` at a time; the last batch padded (static shapes)."""
    out = []
    for start in range(0, len(images), batch):
        chunk = images[start:start + batch]
        padded = _batch_of(chunk, batch) if len(chunk) < batch else chunk
        out.append(np.asarray(run(padded), dtype=np.float32)[:len(chunk)])
    return np.concatenate(out)


@dataclass
class Engine:
    """One row's engine, ready to time: its row, and runners for batch 1 and the batch."""

    row: dict
    compile_for: Compile
    run_one: Runner | None = None
    run_many: Runner | None = None


def prepare(engine: Engine, images: np.ndarray, batch_size: int) -> None:
    """Create the runners, timing the batch-1 creation and the first call; a failure
    becomes the row's status (e.g. a graph OpenVINO cannot read)."""
    try:
        start = time.perf_counter()
        engine.run_one = engine.compile_for(1)
        engine.row["create_ms"] = (time.perf_counter() - start) * 1e3
        single = _batch_of(images, 1)
        engine.row["first_ms"] = time_once_ms(lambda: engine.run_one(single))
        start = time.perf_counter()
        engine.run_many = engine.compile_for(batch_size)
        engine.row["create_batch_ms"] = (time.perf_counter() - start) * 1e3
    except Exception as exc:  # the row says why; the others go on
        engine.row["status"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0]}"
        engine.run_one = engine.run_many = None


def measure(engines: list[Engine], images: np.ndarray, config: PeerConfig
            ) -> dict[int, np.ndarray]:
    """Time the prepared engines side by side: `rounds` times over, each engine's batch-1
    series then its batch series, so that the load of a shared machine falls on every row
    alike; then stats into each row, and each engine's logits of every image (by index)."""
    plan = TimingPlan(config.warmup, config.repeats, config.min_repeats, config.budget_s)
    ready = [(i, e) for i, e in enumerate(engines) if e.run_one is not None]
    single, many = _batch_of(images, 1), _batch_of(images, config.batch_size)
    samples = {i: ([], []) for i, _ in ready}
    for _ in range(config.rounds):
        for i, engine in ready:
            samples[i][0].append(time_calls_ms(lambda e=engine: e.run_one(single), plan))
            samples[i][1].append(time_calls_ms(lambda e=engine: e.run_many(many), plan))
    logits = {}
    for i, engine in ready:
        one, batch = np.concatenate(samples[i][0]), np.concatenate(samples[i][1])
        engine.row.update(latency_stats(one))
        engine.row["ips_batch"] = 1e3 * config.batch_size * batch.size / batch.sum()
        engine.row["p50_ms_batch"] = float(np.median(batch))
        logits[i] = all_logits(engine.run_many, images, config.batch_size)
    return logits


def ort_compiler(path: Path, threads: int, providers: list[str], options: list[dict],
                 create_session: Callable | None = None) -> Compile:
    """One onnxruntime session (dynamic batch) for every batch size. create_session: the
    runtime's factory in the main venv; None in the worker, which uses onnxruntime directly."""
    cache: dict[str, Runner] = {}

    def compile_for(_batch: int) -> Runner:
        if "run" not in cache:
            if create_session is not None:
                session = create_session(path, providers=providers, threads=threads,
                                         provider_options=options)
            else:
                import onnxruntime as ort

                so = ort.SessionOptions()
                so.log_severity_level = 3
                so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
                session = ort.InferenceSession(str(path), so, providers=providers,
                                               provider_options=options)
                if providers[0] not in session.get_providers():
                    raise RuntimeError(f"onnxruntime did not start {providers[0]}")
            cache["run"] = lambda x: session.run([LOGITS], {INPUT: x})[0]
        return cache["run"]

    return compile_for


def ort_ep_rows(spec: dict) -> list[dict]:
    """The worker's job (in the onnxruntime-openvino venv): one row per graph and thread
    count on the OpenVINO execution provider; logits saved to spec['logits_dir']."""
    import onnxruntime as ort

    images = np.load(spec["images"])
    config = PeerConfig(**{**spec["config"], "threads": tuple(spec["config"]["threads"])})
    rows = []
    for threads in config.threads:
        engines = []
        for graph, path in spec["files"].items():
            options = [{"device_type": "CPU", "precision": "FP32",
                        "num_of_threads": str(threads)}, {}]
            row = {"engine": ORT_OPENVINO, "graph": graph, "threads": threads, "status": "ok",
                   "versions": f"onnxruntime-openvino {ort.__version__}"}
            engines.append(Engine(row, ort_compiler(
                Path(path), threads, ["OpenVINOExecutionProvider", "CPUExecutionProvider"],
                options)))
            prepare(engines[-1], images, config.batch_size)
        for i, logits in measure(engines, images, config).items():
            row = engines[i].row
            row["logits"] = str(Path(spec["logits_dir"]) / f"{row['graph']}-{threads}.npy")
            np.save(row["logits"], logits)
        rows += [engine.row for engine in engines]
    return rows


_WORKER = """
import json, sys
sys.path.insert(0, {repo!r})
from benchmarks.openvino_peer import ort_ep_rows
print(json.dumps(ort_ep_rows(json.loads(sys.argv[1]))))
"""


# ----------------------------------------------------------------------------- engines
def openvino_compiler(path: Path, threads: int, precision_hint: str | None) -> Compile:
    """OpenVINO on the CPU, static shapes per batch size, one infer request each;
    precision_hint None keeps the CPU plugin's default inference precision."""
    import openvino as ov

    core = ov.Core()

    def compile_for(batch: int) -> Runner:
        model = core.read_model(str(path))
        (channels, height, width) = (int(d) for d in model.input(INPUT).get_partial_shape()[1:]
                                     .to_shape())
        model.reshape({INPUT: [batch, channels, height, width]})  # static: OpenVINO's fast path
        # Unpinned threads, as onnxruntime's: pinned ones lose badly on a shared machine.
        config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
                  "NUM_STREAMS": 1, "ENABLE_CPU_PINNING": False}
        if precision_hint is not None:
            config["INFERENCE_PRECISION_HINT"] = precision_hint
        compiled = core.compile_model(model, "CPU", config)
        request, port = compiled.create_infer_request(), compiled.output(LOGITS)
        return lambda x: request.infer({INPUT: x})[port]

    return compile_for


def openvino_default_precision() -> str:
    """The CPU plugin's default inference precision on this machine (f32, bf16, ...)."""
    import openvino as ov

    return ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT").to_string()


def plan_rows(default_hint: str) -> list[tuple[str, str, str | None]]:
    """(engine, graph, OpenVINO precision hint) of each in-process row, in run order."""
    rows = [(ORT_CPU, graph, None) for graph in GRAPHS]
    for graph in GRAPHS:
        rows.append((OPENVINO, graph, "f32"))
        if default_hint != "f32":
            rows.append((OPENVINO, graph, default_hint))
    return rows


def run_in_process(files: dict[str, Path], images: np.ndarray, config: PeerConfig,
                   progress=None) -> tuple[list[dict], dict[str, np.ndarray]]:
    """onnxruntime CPU and OpenVINO runtime rows, timed side by side per thread count;
    (rows, logits by row key)."""
    from flowae.runtime.session import create_session

    default_hint = openvino_default_precision()
    rows, logits = [], {}
    for threads in config.threads:
        engines = []
        for engine, graph, hint in plan_rows(default_hint):
            row = {"engine": engine, "graph": graph, "threads": threads, "status": "ok",
                   "precision_hint": hint}
            if engine == ORT_CPU:  # no spinning threads to steal cores from the other rows
                compile_for = ort_compiler(files[graph], threads, ["cpu"], [{}],
                                           partial(create_session, spinning=False))
            else:
                compile_for = openvino_compiler(files[graph], threads, hint)
            engines.append(Engine(row, compile_for))
            prepare(engines[-1], images, config.batch_size)
        if progress is not None:
            progress(f"{len(engines)} engines on {threads} thread(s), {config.rounds} rounds")
        for i, row_logits in measure(engines, images, config).items():
            logits[row_key(engines[i].row)] = row_logits
        rows += [engine.row for engine in engines]
        del engines  # sessions and compiled models go before the next thread count
    return rows, logits


def run_ort_openvino(python: Path | None, files: dict[str, Path], images: np.ndarray,
                     config: PeerConfig, work: Path) -> tuple[list[dict], dict]:
    """The onnxruntime OpenVINO EP rows from the worker venv, or rows saying why not."""
    if python is None:
        reason = ("skipped: onnxruntime-openvino replaces onnxruntime in a venv (same "
                  "`onnxruntime` package, older release); make a separate venv with it and "
                  "give --ovep-python VENV/bin/python")
        return [{"engine": ORT_OPENVINO, "graph": g, "threads": t, "status": reason}
                for t in config.threads for g in GRAPHS], {}
    np.save(work / "images.npy", images)
    spec = {"images": str(work / "images.npy"), "files": {g: str(p) for g, p in files.items()},
            "config": asdict(config), "logits_dir": str(work)}
    done = subprocess.run([str(python), "-c", _WORKER.format(repo=str(REPO)),
                           json.dumps(spec)], capture_output=True, text=True)
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        status = f"failed: worker exit {done.returncode}: {lines[-1] if lines else ''}"
        return [{"engine": ORT_OPENVINO, "graph": g, "threads": t, "status": status}
                for t in config.threads for g in GRAPHS], {}
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    logits = {row_key(r): np.load(r.pop("logits")) for r in rows if "logits" in r}
    return rows, logits


# ----------------------------------------------------------------------------- comparing
def row_key(row: dict) -> str:
    hint = row.get("precision_hint")
    return f"{row['engine']}|{row['graph']}|{hint or ''}|{row['threads']}"


def label(row: dict) -> str:
    hint = row.get("precision_hint")
    return f"{row['engine']} {row['graph']} graph" + (f", {hint} inference" if hint else "")


def add_comparisons(rows: list[dict], logits: dict[str, np.ndarray], labels: np.ndarray,
                    served: str) -> None:
    """top-1, agreement with onnxruntime fp32, and speed ratios, in place. speedup_* > 1:
    this row is faster than the onnxruntime CPU row it is compared with (same threads)."""
    ort = {(r["graph"], r["threads"]): r for r in rows if r["engine"] == ORT_CPU}
    for row in rows:
        row["row"] = label(row)
        mine = logits.get(row_key(row))
        reference = logits.get(row_key(ort.get(("fp32", row["threads"]), {"engine": ORT_CPU,
                                                "graph": "fp32", "threads": row["threads"]})))
        if mine is not None:
            row["top1_pct"] = 100 * float(np.mean(mine.argmax(1) == labels))
            if reference is not None:
                row["top1_agree_ort_fp32_pct"] = 100 * float(np.mean(
                    mine.argmax(1) == reference.argmax(1)))
                row["max_abs_logit_diff"] = float(np.abs(mine - reference).max())
        for name, base in (("same_graph", ort.get((row["graph"], row["threads"]))),
                           ("served", ort.get((served, row["threads"])))):
            if base is None or "p50_ms" not in row:
                continue
            row[f"speedup_p50_vs_ort_{name}"] = ratio(base.get("p50_ms"), row["p50_ms"])
            row[f"speedup_ips_vs_ort_{name}"] = ratio(row.get("ips_batch"), base.get("ips_batch"))


def sections(rows: list[dict], config: PeerConfig, served: str, images: int):
    from benchmarks.report import Column, Section

    columns = [
        Column("row", "Engine / graph"), Column("threads", "Threads"),
        Column("status", "Status"), Column("create_ms", "Create ms", "{:.0f}"),
        Column("first_ms", "First ms", "{:.2f}"), Column("min_ms", "min ms (b1)", "{:.3f}"),
        Column("p50_ms", "p50 ms (b1)", "{:.3f}"),
        Column("p90_ms", "p90 ms (b1)", "{:.3f}"),
        Column("ips_batch", f"images/s (b{config.batch_size})", "{:.0f}"),
        Column("top1_pct", "top-1 %", "{:.2f}"),
        Column("top1_agree_ort_fp32_pct", "agrees w/ ORT fp32 %", "{:.2f}"),
        Column("max_abs_logit_diff", "max |Δlogit|", "{:.4f}"),
    ]
    ratios = [
        Column("row", "Engine / graph"), Column("threads", "Threads"),
        Column("speedup_p50_vs_ort_same_graph", "b1 speed-up vs ORT same graph", "{:.2f}x"),
        Column("speedup_ips_vs_ort_same_graph", f"b{config.batch_size} speed-up vs ORT same "
               "graph", "{:.2f}x"),
        Column("speedup_p50_vs_ort_served", f"b1 speed-up vs ORT {served} (served)", "{:.2f}x"),
        Column("speedup_ips_vs_ort_served", f"b{config.batch_size} speed-up vs ORT {served} "
               "(served)", "{:.2f}x"),
    ]
    notes = [
        f"Same verified .onnx files and the same {images} preprocessed test-split images "
        "(the runtime's preprocessing, full JPEG decode) for every row; model-only time, "
        "NumPy in and out, one call at a time. Per thread count the in-process rows are "
        f"timed in turn, {config.rounds} rounds over, so a busy machine's load falls on all "
        "alike; percentiles pool the rounds. The onnxruntime OpenVINO EP rows run the same "
        "way in their own process (another venv) afterwards.",
        "OpenVINO: static shapes per batch size (its fast path; a dynamic batch axis ran "
        "several times slower here), PERFORMANCE_HINT=LATENCY, NUM_STREAMS=1, "
        "INFERENCE_NUM_THREADS=threads, ENABLE_CPU_PINNING=False (onnxruntime does not pin "
        "either; pinned threads lost badly on this shared machine); compile time is the "
        "batch-1 compile.",
        "On a busy machine p50 carries others' load; min ms is the least disturbed call.",
        "onnxruntime CPU: the runtime's create_session (dynamic batch, intra-op threads, "
        f"inter-op 1). flowae serves the {served} graph on CPU (the manifest's choice).",
        "Speed-up > 1: faster than the onnxruntime CPU row it is compared with, same threads.",
    ]
    return [Section("Latency, throughput and top-1", rows, columns, notes),
            Section("Ratios against onnxruntime CPU", [r for r in rows if r.get("p50_ms")],
                    ratios)]


def summary_line(row: dict, batch_size: int) -> str:
    """One printed line per row: status, p50, images/s, top-1 and speed-ups."""
    head = f"{row['row']:<50} {row['threads']}t"
    if "p50_ms" not in row:
        return f"{head}  {row['status']}"
    def times(key: str) -> str:
        value = row.get(key)
        return "-" if value is None else f"{value:.2f}x"
    return (f"{head}  p50 {row['p50_ms']:.3f} ms  {row['ips_batch']:.0f} img/s (b{batch_size})"
            f"  top-1 {row.get('top1_pct', float('nan')):.2f}%  vs ORT same graph: b1 "
            f"{times('speedup_p50_vs_ort_same_graph')}, b{batch_size} "
            f"{times('speedup_ips_vs_ort_same_graph')}")


def run_peer(model: Path | None, data_root: Path, config: PeerConfig, ovep_python: Path | None,
             progress=None) -> tuple[list[dict], dict]:
    """Every row, compared; plus what the run used (files, images, served precision)."""
    from benchmarks.accuracy import load_inputs
    from flowae.runtime.contract import (
        GRAPH_IO,
        METADATA_KEY,
        ROLE_ENCODER_CLASSIFIER,
        ModelMetadata,
    )
    from flowae.runtime.modeldir import resolve_model
    from flowae.runtime.session import create_session

    (input_name,), outputs = GRAPH_IO[ROLE_ENCODER_CLASSIFIER]
    if (input_name, outputs[0]) != (INPUT, LOGITS):
        raise RuntimeError("openvino_peer's tensor names disagree with the contract")
    files = {g: resolve_model(model, precision=g, provider="cpu").encoder_classifier
             for g in GRAPHS}  # verified against the manifest
    served = resolve_model(model, provider="cpu").precision
    session = create_session(files["fp32"], threads=1)
    spec = ModelMetadata.from_json(session.get_modelmeta().custom_metadata_map[METADATA_KEY]
                                   ).preprocess
    images, labels, _ = load_inputs(data_root, "test", spec, config.max_images, workers=2)
    rows, logits = run_in_process(files, images, config, progress)
    with tempfile.TemporaryDirectory(prefix="openvino_peer-") as work:
        if progress is not None:
            progress(f"{ORT_OPENVINO} (worker {ovep_python or 'not given'})")
        ep_rows, ep_logits = run_ort_openvino(ovep_python, files, images, config, Path(work))
    rows += ep_rows
    logits.update(ep_logits)
    add_comparisons(rows, logits, labels, served)
    return rows, {"files": {g: str(p) for g, p in files.items()}, "served_precision": served,
                  "images": int(len(images)), "openvino_default_precision":
                  openvino_default_precision()}


def main(argv: Sequence[str] | None = None) -> None:
    """The command line. click is imported here, not at the top, so that the OpenVINO-EP
    worker can import this module's measuring core in a venv without click."""
    import click

    from benchmarks.machine import machine_header
    from benchmarks.options import DEFAULT_DATA_ROOT, DEFAULT_OUT, parse_int_list
    from benchmarks.report import echo_paths, write_report
    from flowae.runtime.errors import FlowaeError

    @click.command(context_settings={"help_option_names": ["-h", "--help"]})
    @click.option("--model", type=click.Path(path_type=Path), default=None,
                  help="Model directory (flowae-export's --out) [default: the bundled model].")
    @click.option("--data-root", type=click.Path(path_type=Path), default=DEFAULT_DATA_ROOT,
                  show_default=True, help="Flowers102 folder (its test split).")
    @click.option("--max-images", type=click.IntRange(min=1), default=None,
                  help=f"Test-split images for top-1 [default {PeerConfig.max_images}; "
                       f"--quick {QUICK.max_images}].")
    @click.option("--threads", "threads_text", default=None,
                  help="Comma-separated thread counts [default 1,2; --quick 1].")
    @click.option("--batch-size", type=click.IntRange(min=2), default=None,
                  help=f"Throughput batch [default {PeerConfig.batch_size}].")
    @click.option("--rounds", type=click.IntRange(min=1), default=None,
                  help=f"Times every row is timed, in turn [default {PeerConfig.rounds}].")
    @click.option("--ovep-python", type=click.Path(exists=True, dir_okay=False,
                                                   path_type=Path), default=None,
                  help="Python of a venv with onnxruntime-openvino and numpy, for the "
                       "onnxruntime OpenVINO EP rows [default: those rows are skipped].")
    @click.option("--quick", is_flag=True, help="Smoke-test sizes.")
    @click.option("--out", type=click.Path(file_okay=False, path_type=Path),
                  default=DEFAULT_OUT / NAME, show_default=True,
                  help="Folder for openvino_peer.json and .md.")
    def command(model, data_root, max_images, threads_text, batch_size, rounds, ovep_python,
                quick, out):
        """onnxruntime CPU vs OpenVINO (runtime and onnxruntime EP), side by side."""
        config = QUICK if quick else PeerConfig()
        try:
            given = (("max_images", max_images), ("batch_size", batch_size), ("rounds", rounds))
            changes = {k: v for k, v in given if v is not None}
            if threads_text is not None:
                changes["threads"] = parse_int_list(threads_text, "--threads")
            config = replace(config, **changes)
            header = machine_header(torch_info=False)
            rows, used = run_peer(model, data_root, config, ovep_python,
                                  progress=lambda text: click.echo(text, err=True))
        except (FlowaeError, ImportError) as exc:
            click.echo(f"openvino_peer: error: {str(exc).splitlines()[0]}", err=True)
            sys.exit(2)
        import openvino

        header["versions"]["openvino"] = openvino.__version__
        header["settings"] = {"config": asdict(config), **used}
        served = used["served_precision"]
        paths = write_report(out, NAME, "onnxruntime CPU vs OpenVINO on the same graphs",
                             header, rows, sections(rows, config, served, used["images"]),
                             extra={"used": used})
        for row in rows:
            click.echo(summary_line(row, config.batch_size))
        click.echo(echo_paths(paths))

    command.main(args=argv, prog_name="python -m benchmarks.openvino_peer")


if __name__ == "__main__":
    main()
