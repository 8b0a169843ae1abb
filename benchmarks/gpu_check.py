"""The GPU check: on a CUDA machine, every GPU path of flowae end to end in one bounded run.

Trains `res32` for a few epochs with --device cuda (and under torchrun on two processes when
two GPUs exist), exports it with --fp16, classifies the full-size photos with `flowae-infer
--provider cuda` and `--provider tensorrt,cuda,cpu`, records which onnxruntime providers the
sessions really started, and runs the latency benchmark's CUDA rows. Each step is a
subprocess with its own time limit inside one budget; its output goes to OUT/logs/STEP.log
and a row (status, seconds, command) to OUT/gpu_check.json and .md. Without a CUDA device
(no nvidia-smi, or torch sees none, e.g. CUDA_VISIBLE_DEVICES="") every step is a skipped
row and the exit status is 0. `benchmarks/gpu_check.sh` makes the environment (venv,
onnxruntime-gpu) and calls this module. Imports the standard library, click, the benchmarks'
helpers and the runtime; torch only to ask for devices. Nothing imports it.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import click

from benchmarks.machine import machine_header
from benchmarks.options import (
    DEFAULT_DATA_ROOT,
    DEFAULT_PHOTOS,
    REPO,
    BenchmarkError,
)
from benchmarks.report import Column, Section, echo_paths, write_report
from flowae.runtime.datasets import FLOWERS102_FOLDER
from flowae.runtime.errors import FlowaeError
from flowae.runtime.files import write_text_atomic

NAME = "gpu_check"
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
FALLBACK = "tensorrt,cuda,cpu"
MIN_STEP_S = 10  # a step is not started with less of the budget left
# Run in a subprocess by the "providers" step: which providers each session really started.
_PROVIDERS_PROBE = """
import json, sys
from flowae.runtime.modeldir import resolve_model
from flowae.runtime.session import create_session
out = {}
for spec in sys.argv[2:]:
    try:
        files = resolve_model(sys.argv[1], provider=spec)
        session = create_session(files.encoder_classifier, providers=spec)
        out[spec] = {"precision": files.precision, "verified": files.verified,
                     "file": files.encoder_classifier.name, "started": session.get_providers()}
    except Exception as exc:
        out[spec] = {"error": str(exc).splitlines()[0] if str(exc) else type(exc).__name__}
print(json.dumps(out))
"""


@dataclass(frozen=True)
class GpuCheckConfig:
    """Every default of a GPU check; the wrapper script passes what its 8 minutes leave."""

    variant: str = "res32"
    ae_epochs: int = 3  # a few epochs: the check is of the paths, not of accuracy
    cls_epochs: int = 5
    dec_epochs: int = 1
    export_max_images: int = 256  # parity-gate images (val split) for the export
    latency_repeats: int = 100  # timed batch-1 calls per CUDA latency row at most
    budget_s: float = 420.0  # all steps together; a step that would overrun is cut short


@dataclass
class Step:
    """One command of the check and the steps whose success it needs."""

    name: str
    what: str  # one line for the report
    command: list[str]
    cap_s: float  # its own time limit, inside the budget
    needs: tuple[str, ...] = ()
    row: dict = field(default_factory=dict)


def gpu_state() -> dict:
    """What this machine offers: nvidia-smi's GPU list, torch's CUDA devices, onnxruntime's
    providers; `reason` says why the check cannot run, None when it can."""
    state: dict = {"nvidia_smi": shutil.which("nvidia-smi"), "gpus": [], "reason": None}
    if state["nvidia_smi"] is None:
        state["reason"] = "no nvidia-smi on PATH"
    else:
        listed = subprocess.run([state["nvidia_smi"], "-L"], capture_output=True, text=True)
        state["gpus"] = [line for line in listed.stdout.splitlines() if line.strip()]
        if listed.returncode != 0 or not state["gpus"]:
            state["reason"] = f"nvidia-smi -L lists no GPU (exit {listed.returncode})"
    try:
        import torch
    except ImportError:
        state["torch_cuda_devices"] = 0
        state["reason"] = state["reason"] or "torch is not installed (pip install -e '.[train]')"
    else:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        state["torch_cuda_devices"] = count
        state["torch_cuda_names"] = [torch.cuda.get_device_name(i) for i in range(count)]
        if count == 0:
            state["reason"] = state["reason"] or "torch.cuda.is_available() is False"
    from flowae.runtime.session import available_providers

    state["onnxruntime_providers"] = list(available_providers())
    return state


def plan_steps(config: GpuCheckConfig, out: Path, data_root: Path, photos: Path,
               gpus: int) -> list[Step]:
    """The commands, in order; each names the steps it needs."""
    python = sys.executable
    bin_dir = Path(python).parent
    run, model = out / "run", out / "model"
    epochs = ["--ae-epochs", str(config.ae_epochs), "--cls-epochs", str(config.cls_epochs),
              "--dec-epochs", str(config.dec_epochs)]
    train = ["--variant", config.variant, "--data-root", str(data_root), "--device", "cuda",
             *epochs, "--no-progress"]
    infer = [str(bin_dir / "flowae-infer"), str(photos / "jpg"), "--model", str(model),
             "--json"]
    steps = [
        Step("train", f"flowae-train {config.variant} on cuda, {config.ae_epochs}+"
             f"{config.cls_epochs}+{config.dec_epochs} epochs",
             [str(bin_dir / "flowae-train"), *train, "--out", str(run)], 180),
    ]
    if gpus >= 2:
        steps.append(Step("train_torchrun", "the same under torchrun, 2 processes (nccl)",
                          [python, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", "-m", "flowae.cli", *train,
                           "--out", str(out / "run-torchrun")], 150))
    steps += [
        Step("export", "flowae-export --fp16 (fp32 and fp16 graphs, parity-gated)",
             [str(bin_dir / "flowae-export"), str(run), "--out", str(model), "--data-root",
              str(data_root), "--fp16", "--max-images", str(config.export_max_images)],
             120, needs=("train",)),
        Step("infer_cuda", "flowae-infer --provider cuda on the full-size photos",
             [*infer, "--provider", "cuda"], 60, needs=("export",)),
        Step("infer_fallback", f"flowae-infer --provider {FALLBACK} on the full-size photos",
             [*infer, "--provider", FALLBACK], 90, needs=("export",)),
        Step("providers", "providers each session started, per --provider value",
             [python, "-c", _PROVIDERS_PROBE, str(model), "cuda", FALLBACK, "tensorrt",
              "cpu"], 60, needs=("export",)),
        Step("latency", "python -m benchmarks.latency, encoder_classifier, batch 1 and 64",
             [python, "-m", "benchmarks.latency", "--run", str(run), "--model-dir", str(model),
              "--role", "encoder_classifier", "--batch-sizes", "1,64", "--threads", "1",
              "--repeats", str(config.latency_repeats), "--budget-s", "1",
              "--no-plain-export", "--out", str(out / "latency")], 150, needs=("export",)),
    ]
    return steps


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def run_step(step: Step, done: dict[str, str], deadline: float, logs: Path,
             min_s: float = MIN_STEP_S) -> dict:
    """Run one step (or say why not: a needed step did not succeed, or fewer than `min_s`
    seconds of the budget are left); its output goes to logs/NAME.log."""
    row = {"step": step.name, "what": step.what, "command": " ".join(step.command[:1] + [
        "<probe>" if part == _PROVIDERS_PROBE else part for part in step.command[1:]]),
        "status": "ok", "seconds": None, "log": None}
    missing = [name for name in step.needs if done.get(name) != "ok"]
    limit_s = min(step.cap_s, deadline - time.monotonic())
    if missing:
        row["status"] = f"skipped: needs {', '.join(missing)}"
    elif limit_s < min_s:
        row["status"] = "skipped: the time budget is spent"
    if row["status"] != "ok":
        return row
    start = time.monotonic()
    try:
        done_proc = subprocess.run(step.command, capture_output=True, text=True,
                                   timeout=limit_s, cwd=REPO)
        output, code = done_proc.stdout, done_proc.returncode
        errors = done_proc.stderr
    except subprocess.TimeoutExpired as exc:
        output = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        errors = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        code = None
    row["seconds"] = round(time.monotonic() - start, 1)
    log = logs / f"{step.name}.log"
    write_text_atomic(log, f"$ {row['command']}\n\n--- stdout\n{output}\n--- stderr\n{errors}")
    row["log"] = str(log)
    row["stdout"] = output
    if code is None:
        row["status"] = f"failed: timed out after {limit_s:.0f} s"
    elif code != 0:
        row["status"] = f"failed: exit {code}: {_last_line(errors or output)}"
    return row


def inference_summary(rows: dict[str, dict], photos: Path) -> list[dict]:
    """Images, failures and top-1 of each flowae-infer step; agreement of the two runs."""
    labels = {}
    table = photos / "labels.csv"
    if table.is_file():
        with open(table, newline="") as handle:
            labels = {r["file"]: int(r["label"]) for r in csv.DictReader(handle)}
    top1: dict[str, dict[str, int]] = {}
    summary = []
    for name in ("infer_cuda", "infer_fallback"):
        row = rows.get(name, {})
        records = [json.loads(line) for line in row.get("stdout", "").splitlines()
                   if line.startswith("{")]
        top1[name] = {Path(r["image"]).name: r["top_k"][0]["label"] for r in records
                      if "top_k" in r}
        right = sum(labels.get(image) == label for image, label in top1[name].items())
        summary.append({"step": name, "status": row.get("status", "skipped"),
                        "images": len(records), "failed": len(records) - len(top1[name]),
                        "top1_pct": 100 * right / len(top1[name]) if top1[name] else None})
    shared = set(top1["infer_cuda"]) & set(top1["infer_fallback"])
    if shared:
        agree = sum(top1["infer_cuda"][i] == top1["infer_fallback"][i] for i in shared)
        summary[1]["top1_agreement_with_cuda_pct"] = 100 * agree / len(shared)
    return summary


def provider_summary(row: dict) -> list[dict]:
    if row.get("status") != "ok":
        return []
    found = json.loads(_last_line(row["stdout"]))
    return [{"provider": spec, **{k: (", ".join(v) if isinstance(v, list) else v)
                                  for k, v in result.items()}}
            for spec, result in found.items()]


def cuda_latency(out: Path) -> list[dict]:
    path = out / "latency" / "latency.json"
    if not path.is_file():
        return []
    rows = json.loads(path.read_text())["rows"]
    return [{k: r.get(k) for k in ("graph", "format", "device_name", "status", "p50_ms_b1",
                                   "ips_b64", "create_ms")}
            for r in rows if r.get("device") == "cuda"]


def sections(steps: list[dict], inference: list[dict], providers: list[dict],
             latency: list[dict], state: dict) -> list[Section]:
    notes = [f"GPUs (nvidia-smi -L): {'; '.join(state['gpus']) or 'none'}; torch CUDA "
             f"devices: {state.get('torch_cuda_devices', 0)}; onnxruntime providers: "
             f"{', '.join(state['onnxruntime_providers'])}."]
    if state["reason"]:
        notes.append(f"Every step skipped: {state['reason']}.")
    return [
        Section("Steps", steps, [Column("step", "Step"), Column("what", "What"),
                                 Column("status", "Status"),
                                 Column("seconds", "Seconds", "{:.1f}")], notes),
        Section("flowae-infer on the full-size photos", inference, [
            Column("step", "Step"), Column("status", "Status"), Column("images", "Images"),
            Column("failed", "Failed"), Column("top1_pct", "top-1 %", "{:.2f}"),
            Column("top1_agreement_with_cuda_pct", "top-1 agrees with cuda %", "{:.2f}")]),
        Section("Providers each session started", providers, [
            Column("provider", "--provider"), Column("precision", "Precision (auto)"),
            Column("file", "Graph"), Column("started", "Started"), Column("error", "Error")]),
        Section("CUDA latency rows (benchmarks.latency)", latency, [
            Column("graph", "Graph"), Column("format", "Format"),
            Column("device_name", "Device"), Column("status", "Status"),
            Column("p50_ms_b1", "p50 ms (batch 1)", "{:.3f}"),
            Column("ips_b64", "images/s (batch 64)", "{:.0f}"),
            Column("create_ms", "Session ms", "{:.0f}")]),
    ]


def run_gpu_check(config: GpuCheckConfig, state: dict, out: Path, data_root: Path,
                  photos: Path, progress=None) -> tuple[list[dict], dict]:
    """(step rows, summaries) on the machine `state` describes (gpu_state); without a CUDA
    device every step is a skipped row (the two-GPU step listed too) and none runs."""
    gpus = 2 if state["reason"] else state.get("torch_cuda_devices", 0)
    steps = plan_steps(config, out, data_root, photos, gpus)
    rows: dict[str, dict] = {}
    deadline = time.monotonic() + config.budget_s
    for step in steps:
        if state["reason"]:
            rows[step.name] = {"step": step.name, "what": step.what,
                               "status": f"skipped: no CUDA device ({state['reason']})"}
            continue
        if progress is not None:
            progress(f"{step.name}: {step.what}")
        rows[step.name] = run_step(step, {k: v["status"] for k, v in rows.items()}, deadline,
                                   out / "logs")
    summaries = {"inference": inference_summary(rows, photos),
                 "providers": provider_summary(rows.get("providers", {})),
                 "cuda_latency": cuda_latency(out)}
    return [{k: v for k, v in r.items() if k != "stdout"} for r in rows.values()], summaries


def _check_paths(out: Path, data_root: Path, photos: Path, state: dict) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BenchmarkError(f"--out {out}: exists and is not an empty folder; give a new one")
    if state["reason"]:  # nothing will read the data
        return
    if not (data_root / FLOWERS102_FOLDER / "setid.mat").is_file():
        raise BenchmarkError(f"--data-root {data_root}: no {FLOWERS102_FOLDER}/setid.mat")
    if not (photos / "jpg").is_dir():
        raise BenchmarkError(f"--photos {photos}: no jpg/ folder of full-size photos")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="New folder for the run, model, logs and gpu_check.json/.md "
                   "[default: runs/gpu_check/UTC-TIME].")
@click.option("--data-root", type=click.Path(path_type=Path), default=DEFAULT_DATA_ROOT,
              show_default=True, help="Flowers102 folder for training and export.")
@click.option("--photos", type=click.Path(path_type=Path), default=DEFAULT_PHOTOS,
              show_default=True, help="Full-size photos (jpg/ and labels.csv).")
@click.option("--ae-epochs", type=click.IntRange(min=0), default=GpuCheckConfig.ae_epochs,
              show_default=True)
@click.option("--cls-epochs", type=click.IntRange(min=1), default=GpuCheckConfig.cls_epochs,
              show_default=True)
@click.option("--budget-s", type=click.FloatRange(min=1), default=GpuCheckConfig.budget_s,
              show_default=True, help="Seconds for all steps together.")
def main(out, data_root, photos, ae_epochs, cls_epochs, budget_s):
    """Train, export, serve and time flowae on CUDA; skip everything without a GPU."""
    config = GpuCheckConfig(ae_epochs=ae_epochs, cls_epochs=cls_epochs, budget_s=budget_s)
    out = out or REPO / "runs" / NAME / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    try:
        state = gpu_state()
        _check_paths(out, data_root, photos, state)
        steps, summaries = run_gpu_check(config, state, out, data_root, photos,
                                         progress=lambda text: click.echo(text, err=True))
        header = machine_header(torch_info=importlib.util.find_spec("torch") is not None)
        header["settings"] = {"config": asdict(config)}
        paths = write_report(
            out, NAME, "GPU check: train, export, serve and time on CUDA", header, steps,
            sections(steps, summaries["inference"], summaries["providers"],
                     summaries["cuda_latency"], state),
            extra={"gpu": state, **summaries})
    except FlowaeError as exc:
        click.echo(f"gpu_check: error: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    for row in steps:
        click.echo(f"{row['step']:<16} {row['status']}")
    click.echo(echo_paths(paths))
    sys.exit(EXIT_FAILED if any(r["status"].startswith("failed") for r in steps) else EXIT_OK)


if __name__ == "__main__":
    main()
