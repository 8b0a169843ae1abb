"""Side-by-side decoder latency: PyTorch eager vs onnxruntime, naive and rewritten export.

`python -m benchmarks.decoder_latency [--variant base] [--threads 1 --threads 2]` exports the
decoder twice (the exporter's own graph, and the CPU rewrite of flowae.export.convs with
explicit padding), checks both against eager, then times them in turns, so that other load
on the machine falls on all of them alike, and prints median/p90 milliseconds per call and
the eager/onnxruntime ratio (above 1: onnxruntime is faster). "eager" runs the decoder's
layers one by one (nn.Sequential's forward, plain PyTorch); "model" calls the decoder
module itself, which may take other exact fast paths flowae uses for training. It measures
what flowae.export.convs's cost model decides (which convolutions to fold, where explicit
padding goes); benchmarks.latency times whole models. Imports torch, onnxruntime, click,
flowae, flowae.export, the runtime's session factory and benchmarks.machine; nothing imports
it.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from benchmarks.machine import machine_header
from flowae.checkpoint import load_checkpoint, model_from_checkpoint
from flowae.export.onnx_export import (
    export_graph,
    graph_modules,
    tensor_shapes,
    with_explicit_pads,
    write_model,
)
from flowae.models import VARIANTS, build_model
from flowae.runtime.contract import INPUT_LATENT, ROLE_DECODER
from flowae.runtime.session import create_session


def export_decoders(model, out_dir: Path) -> dict[str, Path]:
    """name -> decoder ONNX file: the exporter's graph and the CPU-rewritten one."""
    shapes = tensor_shapes(model)
    example = torch.zeros(2, *shapes[INPUT_LATENT])
    paths = {}
    for name, rewrite in (("naive", False), ("rewritten", True)):
        proto = export_graph(graph_modules(model, rewrite)[ROLE_DECODER], ROLE_DECODER, example,
                             None, shapes)
        paths[name] = out_dir / f"decoder_{name}.onnx"
        write_model(with_explicit_pads(proto) if rewrite else proto, paths[name])
    return paths


def measure(model, paths: dict[str, Path], threads: int, batch: int, rounds: int,
            calls_per_round: int = 5) -> dict:
    """One row: median and p90 ms per call of eager and each ONNX file, max abs diffs."""
    torch.set_num_threads(threads)
    latent = torch.rand(batch, *model.latent_shape())
    feed = latent.numpy()
    # Idle onnxruntime workers spin by default and would take the cores PyTorch's next call
    # needs (the calls alternate); without spinning onnxruntime only loses a little.
    sessions = {name: create_session(path, threads=threads, spinning=False)
                for name, path in paths.items()}
    with torch.inference_mode():
        expected = nn.Sequential.forward(model.decoder, latent).numpy()
        calls = {"eager": lambda: nn.Sequential.forward(model.decoder, latent),
                 "model": lambda: model.decoder(latent)}
        row: dict = {"threads": threads, "batch": batch}
        for name, session in sessions.items():
            calls[name] = lambda s=session: s.run(None, {INPUT_LATENT: feed})
            row[f"{name}_max_abs_diff"] = float(np.abs(calls[name]()[0] - expected).max())
        for call in calls.values():  # warm-up
            for _ in range(calls_per_round):
                call()
        samples: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(rounds):
            for name, call in calls.items():
                start = time.perf_counter()
                for _ in range(calls_per_round):
                    call()
                samples[name].append((time.perf_counter() - start) * 1e3 / calls_per_round)
    for name, values in samples.items():
        row[f"{name}_p50_ms"] = float(np.percentile(values, 50))
        row[f"{name}_p90_ms"] = float(np.percentile(values, 90))
    for name in ("model", *sessions):
        row[f"eager_over_{name}"] = row["eager_p50_ms"] / row[f"{name}_p50_ms"]
    return row


@click.command(context_settings={"show_default": True})
@click.option("--variant", type=click.Choice(list(VARIANTS)), default="base",
              help="Decoder of this variant, seeded random weights (speed does not depend "
                   "on them).")
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
              help="A run directory or checkpoint to take the model from instead.")
@click.option("--threads", type=click.IntRange(min=1), multiple=True, default=(1, 2))
@click.option("--batch", type=click.IntRange(min=1), default=1)
@click.option("--rounds", type=click.IntRange(min=1), default=40)
def main(variant, checkpoint, threads, batch, rounds):
    """Time a decoder in PyTorch eager and onnxruntime (naive and rewritten export)."""
    ort.set_default_logger_severity(3)
    torch.manual_seed(0)
    if checkpoint is not None:
        model = model_from_checkpoint(load_checkpoint(checkpoint))
    else:
        model = build_model(VARIANTS[variant]).eval()
    click.echo(f"# {model.config.name} decoder, batch {batch}, {rounds} rounds; "
               f"{machine_header()['cpu_model']}, {torch.get_num_threads()} torch threads "
               f"available; "
               f"torch {torch.__version__}, onnxruntime {ort.__version__}, "
               f"numpy {np.__version__}")
    click.echo("| threads | eager p50 (p90) ms | model p50 (p90) ms | ort naive p50 (p90) ms "
               "| ort rewritten p50 (p90) ms | eager/naive | eager/rewritten | "
               "max abs diff naive, rewritten |")
    click.echo("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        paths = export_decoders(model, Path(tmp))
        for count in threads:
            r = measure(model, paths, count, batch, rounds)
            click.echo(
                f"| {count} | {r['eager_p50_ms']:.3f} ({r['eager_p90_ms']:.3f}) "
                f"| {r['model_p50_ms']:.3f} ({r['model_p90_ms']:.3f}) "
                f"| {r['naive_p50_ms']:.3f} ({r['naive_p90_ms']:.3f}) "
                f"| {r['rewritten_p50_ms']:.3f} ({r['rewritten_p90_ms']:.3f}) "
                f"| {r['eager_over_naive']:.2f}x | {r['eager_over_rewritten']:.2f}x "
                f"| {r['naive_max_abs_diff']:.1e}, {r['rewritten_max_abs_diff']:.1e} |")


if __name__ == "__main__":
    sys.exit(main())
