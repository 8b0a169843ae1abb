"""The GPU check without a GPU: the wrapper script and the module skip every step, install
nothing, say why and exit 0; the step runner's own rules (needs, time limit, failures,
logs) on real subprocesses; the summaries on a real flowae-infer --json run.

Every test hides the GPUs (CUDA_VISIBLE_DEVICES="") so that it means the same thing on a
machine that has one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.gpu_check import (
    FALLBACK,
    GpuCheckConfig,
    Step,
    gpu_state,
    inference_summary,
    plan_steps,
    run_step,
)

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
NO_GPU = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}


def test_the_script_is_valid_bash_and_shellcheck_clean():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    found = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True)
    assert found.returncode == 0, found.stdout


def test_the_script_without_a_gpu_skips_everything_and_installs_nothing(tmp_path):
    venv = tmp_path / "venv"
    done = subprocess.run(["bash", str(SCRIPT), "--out", str(tmp_path / "out")],
                          env={**NO_GPU, "VENV": str(venv)}, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert "no GPU: CUDA_VISIBLE_DEVICES is set empty" in done.stdout
    assert "skipped:" in done.stdout and "tensorrt,cuda,cpu" in done.stdout
    assert not venv.exists() and not (tmp_path / "out").exists()


def test_the_module_without_a_gpu_reports_every_step_skipped(tmp_path):
    out = tmp_path / "report"
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--out", str(out),
                           "--data-root", str(tmp_path / "no-data")],
                          cwd=REPO, env=NO_GPU, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "gpu_check.json").read_text())
    steps = [row["step"] for row in report["rows"]]
    assert steps == ["train", "train_torchrun", "export", "infer_cuda", "infer_fallback",
                     "providers", "latency"]
    assert all(row["status"].startswith("skipped: no CUDA device") for row in report["rows"])
    assert report["gpu"]["reason"] and report["gpu"]["torch_cuda_devices"] == 0
    assert "| infer_fallback |" in (out / "gpu_check.md").read_text()
    assert not (out / "run").exists() and not (out / "logs").exists()
    again = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--out", str(out)],
                           cwd=REPO, env=NO_GPU, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2
    assert "not an empty folder" in again.stderr and "Traceback" not in again.stderr


def test_gpu_state_names_why_it_cannot_run(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    state = gpu_state()
    if state["nvidia_smi"] is None:
        assert state["reason"] == "no nvidia-smi on PATH"
    assert state["reason"] and "CPUExecutionProvider" in state["onnxruntime_providers"]


def test_the_plan_runs_torchrun_only_with_two_gpus(tmp_path):
    config = GpuCheckConfig()
    one = plan_steps(config, tmp_path, tmp_path / "data", tmp_path / "photos", gpus=1)
    two = plan_steps(config, tmp_path, tmp_path / "data", tmp_path / "photos", gpus=2)
    assert "train_torchrun" not in [s.name for s in one]
    assert [s.name for s in two if s.name == "train_torchrun"] == ["train_torchrun"]
    infer = {s.name: s.command for s in one}
    assert infer["infer_fallback"][-2:] == ["--provider", FALLBACK]
    device = infer["train"].index("--device")
    assert infer["train"][device + 1] == "cuda" and "--fp16" in infer["export"]


def test_a_step_runs_or_says_why_not(tmp_path):
    python = sys.executable
    deadline = time.monotonic() + 60
    ok = run_step(Step("ok", "prints", [python, "-c", "print('hello')"], 30), {}, deadline,
                  tmp_path)
    assert ok["status"] == "ok" and "hello" in Path(ok["log"]).read_text()
    bad = run_step(Step("bad", "fails", [python, "-c", "raise SystemExit('broken input')"], 30),
                   {}, deadline, tmp_path)
    assert bad["status"] == "failed: exit 1: broken input"
    needs = run_step(Step("later", "needs bad", [python, "-c", "pass"], 30, needs=("bad",)),
                     {"bad": bad["status"]}, deadline, tmp_path)
    assert needs["status"] == "skipped: needs bad" and needs["log"] is None
    stuck = [python, "-c", "import signal; signal.pause()"]  # waits until it is killed
    slow = run_step(Step("stuck", "never ends", stuck, 1), {}, deadline, tmp_path, min_s=1)
    assert slow["status"] == "failed: timed out after 1 s"
    spent = run_step(Step("spent", "no time", [python, "-c", "pass"], 30), {},
                     time.monotonic() + 5, tmp_path)  # less than the 10 s a step needs
    assert spent["status"] == "skipped: the time budget is spent"


def test_inference_summary_scores_real_flowae_infer_output(photos_dir):
    done = subprocess.run([str(Path(sys.executable).parent / "flowae-infer"),
                           str(photos_dir / "jpg"), "--json", "--provider", "cpu",
                           str(photos_dir / "missing.jpg")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1  # the missing photo
    rows = {"infer_cuda": {"status": "ok", "stdout": done.stdout},
            "infer_fallback": {"status": "ok", "stdout": done.stdout}}
    cuda, fallback = inference_summary(rows, photos_dir)
    assert (cuda["images"], cuda["failed"]) == (5, 1)
    assert 0 <= cuda["top1_pct"] <= 100
    assert fallback["top1_agreement_with_cuda_pct"] == 100.0
