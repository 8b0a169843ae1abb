"""Training-step time of the seed variants' plain layers vs flowae/fastconv.py's exact fast paths.

`python -m benchmarks.fast_kernels --variant upsample --threads 1 --steps 5` builds the
variant with seeded weights in channels-last training mode and runs full training steps
(forward, loss, backward, Adam step) on one random batch of 255 images, switching the fast
kernels on and off every step, so that load from other jobs falls on both alike. After one
warm-up step of each, it reports the median (and minimum) seconds per step of `steps` steps
each, and plain/fast (above 1: the fast path is faster), for phase 1 (autoencoder: encoder +
decoder, MSE) and phase 2 (classifier: cross-entropy on the logits). Only the four seed
variants have fast paths (flowae.models.SeedConfig); the res family runs plain layers either
way. Prints the table (with --out, also fast_kernels.json and .md). Imports torch, click,
flowae.models and the benchmarks' helpers; nothing imports it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import click

from benchmarks.report import Column, Section, echo_paths, markdown_table
from flowae.config import VARIANTS, SeedConfig

NAME = "fast_kernels"
PHASES = ("ae", "cls")  # phase 1 (autoencoder) and phase 2 (classifier), as flowae.train names them
SEED_VARIANTS = [name for name, config in VARIANTS.items() if isinstance(config, SeedConfig)]
COLUMNS = [Column("variant", "variant"), Column("threads", "threads"),
           Column("phase", "phase"), Column("batch", "batch"), Column("steps", "steps each"),
           Column("plain_s", "plain s/step (median)", "{:.3f}"),
           Column("fast_s", "fast s/step (median)", "{:.3f}"),
           Column("plain_min_s", "plain min", "{:.3f}"), Column("fast_min_s", "fast min", "{:.3f}"),
           Column("plain_over_fast", "plain/fast", "{:.2f}x")]


def time_phase(model, optimizer, images, labels, phase: str, steps: int) -> dict[bool, list]:
    """Seconds per training step, fast kernels on (True) and off (False), alternated step by
    step; the first step of each is a warm-up and not kept."""
    import torch.nn.functional as F

    times: dict[bool, list[float]] = {True: [], False: []}
    for step in range(2 * steps + 2):
        fast = step % 2 == 0
        model.use_fast_kernels(fast)
        start = time.perf_counter()
        if phase == "ae":
            loss = F.mse_loss(model.decoder(model.encoder(images)), images)
        else:
            loss = F.cross_entropy(model(images)[0], labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step >= 2:
            times[fast].append(time.perf_counter() - start)
    model.use_fast_kernels(True)  # as flowae builds it
    return times


def measure(variant: str, threads: int, steps: int, batch: int = 255,
            seed: int = 0) -> list[dict]:
    """One row per phase: median and minimum seconds per step, plain layers vs fast paths."""
    import torch

    from flowae.models import build_model

    config = VARIANTS[variant]
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(seed)
        model = build_model(config).train().to(memory_format=torch.channels_last)
        optimizer = torch.optim.Adam(model.parameters(), 1e-3)
        side = config.image_size_px
        # (B, 3, side, side) in [-1, 1], the range training feeds the model
        images = (torch.rand(batch, 3, side, side) * 2 - 1).contiguous(
            memory_format=torch.channels_last)
        labels = torch.randint(0, config.num_classes, (batch,))
        rows = []
        for phase in PHASES:
            times = time_phase(model, optimizer, images, labels, phase, steps)
            plain, fast = statistics.median(times[False]), statistics.median(times[True])
            rows.append({"variant": variant, "threads": threads, "phase": phase,
                         "batch": batch, "steps": steps, "plain_s": plain, "fast_s": fast,
                         "plain_min_s": min(times[False]), "fast_min_s": min(times[True]),
                         "plain_over_fast": plain / fast, "status": "ok"})
        return rows
    finally:
        torch.set_num_threads(previous_threads)


def measure_all(variants: Sequence[str], threads: Sequence[int], steps: int,
                batch: int) -> list[dict]:
    return [row for variant in variants for count in threads
            for row in measure(variant, count, steps, batch)]


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--variant", "variants", type=click.Choice(SEED_VARIANTS), multiple=True,
              default=("upsample",), help="Seed variant (repeatable).")
@click.option("--threads", type=click.IntRange(min=1), multiple=True, default=(1,),
              help="torch intra-op threads (repeatable).")
@click.option("--steps", type=click.IntRange(min=1), default=5,
              help="Timed steps of each kind (plain, fast) per phase, after one warm-up each.")
@click.option("--batch", type=click.IntRange(min=1), default=255,
              help="Images per step (the seed recipe's batch size).")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Also write fast_kernels.json and .md into this folder.")
def main(variants: tuple[str, ...], threads: tuple[int, ...], steps: int, batch: int,
         out: Path | None) -> None:
    """Seconds per training step: plain layers vs flowae's fast kernels, alternated."""
    import torch

    from benchmarks.machine import machine_header

    header = machine_header()
    rows = measure_all(variants, threads, steps, batch)
    click.echo(f"# plain layers vs fast kernels per training step: batch {batch}, median of "
               f"{steps} steps each; {header['cpu_model']}, torch {torch.__version__}, load "
               f"average (1 min) {header['load_average_1m_at_start']}")
    click.echo(markdown_table(rows, COLUMNS))
    if out is not None:
        from benchmarks.report import write_report

        header["settings"] = {"input": f"random images in [-1, 1], channels-last, batch {batch}",
                              "optimizer": "Adam, lr 1e-3, one step per timed step"}
        notes = ["Plain and fast steps alternate in one process on the same model and batch; "
                 "the first of each is a warm-up. plain/fast above 1: the fast path is faster.",
                 "ae: phase 1 (encoder + decoder, MSE); cls: phase 2 (encoder + classifier, "
                 "cross-entropy)."]
        click.echo(echo_paths(write_report(
            out, NAME, "Fast kernels: training step, plain layers vs fast paths", header, rows,
            [Section("Seconds per training step", rows, COLUMNS, notes)])))


if __name__ == "__main__":
    main()
