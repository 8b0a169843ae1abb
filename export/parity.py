"""Measuring an exported graph against PyTorch: outputs, accuracy and speed on this CPU.

`torch_reference` computes what the untouched PyTorch model says, `run_graph` what an
onnxruntime session (made by flowae.runtime.session.create_session) says for the same input,
`compare` turns the two into the parity figures that go into the manifest and `check` is the
gate. `top1_pct` and `latency_ms` give the accuracy and speed figures that pick the
precision served by default. Imports torch, numpy, onnxruntime, flowae.models and the
runtime's contract and errors.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
import torch

from flowae.models import FlowAE
from flowae.runtime.contract import OUTPUT_LATENT, OUTPUT_LOGITS, OUTPUT_RECONSTRUCTION
from flowae.runtime.errors import ExportError


@dataclass(frozen=True)
class Tolerance:
    """Elementwise |onnx - torch| <= atol + rtol * |torch|, and top-1 agreement on logits."""

    atol: float | None  # None: figures reported, not gated (int8 has its accuracy gate)
    rtol: float = 0.0
    min_top1_agreement_pct: float | None = 100.0  # None: reported, not gated

    def describe(self) -> str:
        if self.atol is None:
            return "not gated"
        text = f"|onnx - torch| <= {self.atol:g}"
        if self.rtol:
            text += f" + {self.rtol:g} * |torch|"
        if self.min_top1_agreement_pct is not None:
            text += f"; top-1 agreement >= {self.min_top1_agreement_pct:g}%"
        return text


@torch.no_grad()
def torch_reference(model: FlowAE, images: torch.Tensor, batch_size: int = 64) -> dict:
    """name -> float32 array of what PyTorch computes: logits, latent, decoder(latent)."""
    model.eval()
    parts: dict[str, list[np.ndarray]] = {OUTPUT_LOGITS: [], OUTPUT_LATENT: [],
                                          OUTPUT_RECONSTRUCTION: []}
    for start in range(0, len(images), batch_size):
        logits, latent = model(images[start : start + batch_size])  # (b, 102), (b, 16, 22, 22)
        parts[OUTPUT_LOGITS].append(logits.numpy())
        parts[OUTPUT_LATENT].append(latent.numpy())
        parts[OUTPUT_RECONSTRUCTION].append(model.decoder(latent).numpy())  # (b, 3, 100, 100)
    return {name: np.concatenate(chunks) for name, chunks in parts.items()}


def run_graph(session: ort.InferenceSession, inputs: np.ndarray, batch_size: int = 64) -> dict:
    """output name -> array over all of `inputs`, run `batch_size` at a time."""
    input_name = session.get_inputs()[0].name
    names = [output.name for output in session.get_outputs()]
    parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for start in range(0, len(inputs), batch_size):
        batch = np.ascontiguousarray(inputs[start : start + batch_size], dtype=np.float32)
        for name, value in zip(names, session.run(names, {input_name: batch}), strict=True):
            parts[name].append(value)
    return {name: np.concatenate(chunks) for name, chunks in parts.items()}


def compare(outputs: dict, reference: dict, tolerance: Tolerance) -> dict:
    """Parity figures of `outputs` against `reference`; "passed" says if the gate holds
    (None when the tolerance gates nothing)."""
    figures: dict = {"images": 0, "max_abs_diff": {}, "tolerance": tolerance.describe()}
    failures = []
    for name, value in outputs.items():
        expected = reference[name].astype(np.float64)
        figures["images"] = len(expected)
        diff = np.abs(value.astype(np.float64) - expected)
        figures["max_abs_diff"][name] = float(diff.max())
        if tolerance.atol is not None and \
                not np.all(diff <= tolerance.atol + tolerance.rtol * np.abs(expected)):
            failures.append(f"{name} max abs diff {diff.max():.3g} exceeds the tolerance")
    if OUTPUT_LOGITS in outputs:
        agree = outputs[OUTPUT_LOGITS].argmax(1) == reference[OUTPUT_LOGITS].argmax(1)
        figures["top1_agreement_pct"] = 100.0 * float(agree.mean())
        wanted = tolerance.min_top1_agreement_pct
        if wanted is not None and figures["top1_agreement_pct"] < wanted:
            failures.append(f"top-1 agrees on {figures['top1_agreement_pct']:.2f}% of images, "
                            f"needs {wanted:g}%")
    gated = tolerance.atol is not None or tolerance.min_top1_agreement_pct is not None
    figures["passed"] = not failures if gated else None
    figures["failures"] = failures
    return figures


def check(figures: dict, file_name: str) -> None:
    """The gate: a one-line ExportError naming the file, the figures and the tolerance."""
    if figures["passed"] is False:
        raise ExportError(f"parity gate failed for {file_name} on {figures['images']} images: "
                          f"{'; '.join(figures['failures'])} ({figures['tolerance']})")


def top1_pct(logits: np.ndarray, labels: np.ndarray) -> float:
    return 100.0 * float((logits.argmax(1) == labels).mean())


def latency_ms(sessions: dict[str, ort.InferenceSession], inputs: np.ndarray,
               rounds: int = 30, calls_per_round: int = 5, warmup: int = 10) -> dict:
    """name -> {"p10": ms, "p50": ms} per call on `inputs`, the sessions timed in turns so
    that other load on the machine falls on all of them alike. p10 is the figure to compare
    on a shared machine: other processes only ever add time."""
    feeds = {name: {session.get_inputs()[0].name: inputs} for name, session in sessions.items()}
    for name, session in sessions.items():
        for _ in range(warmup):
            session.run(None, feeds[name])
    samples: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(rounds):
        for name, session in sessions.items():
            start = time.perf_counter()
            for _ in range(calls_per_round):
                session.run(None, feeds[name])
            samples[name].append((time.perf_counter() - start) * 1e3 / calls_per_round)
    return {name: {"p10": float(np.percentile(values, 10)), "p50": float(np.median(values))}
            for name, values in samples.items()}
