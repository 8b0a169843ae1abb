"""`flowae-train`: click options -> ModelConfig + TrainConfig -> flowae.train.train().

Thin by design: parsing, one library call, a summary line. FlowaeError becomes a one-line
message and exit code 1.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import click

from flowae import distributed
from flowae.data import DEFAULT_DATA_ROOT
from flowae.data import download as fetch
from flowae.models import VARIANTS, get_variant
from flowae.runtime.errors import FlowaeError
from flowae.train import TrainConfig, train

_D = TrainConfig()  # the defaults live in the dataclass alone


def _finite(ctx, param, value: float) -> float:
    # FloatRange lets nan and inf through; either would train into NaN weights.
    if not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number")
    return value


@click.command(context_settings={"show_default": True})
@click.option("--variant", type=click.Choice(list(VARIANTS)), default="upsample",
              help="Model variant from the registry.")
@click.option("--data-root", type=click.Path(file_okay=False, path_type=Path),
              default=DEFAULT_DATA_ROOT, help="Folder holding flowers-102/.")
@click.option("--download", is_flag=True, help="Fetch Flowers102 into --data-root first.")
@click.option("--out", "run_dir", type=click.Path(file_okay=False, path_type=Path),
              required=True, help="Run directory: checkpoint, metrics.json, plots.")
@click.option("--ae-epochs", type=click.IntRange(min=0), default=_D.ae_epochs)
@click.option("--cls-epochs", type=click.IntRange(min=0), default=_D.cls_epochs)
@click.option("--batch-size", type=click.IntRange(min=1), default=_D.batch_size)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=_D.lr,
              callback=_finite)
@click.option("--seed", type=int, default=_D.seed)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=_D.device)
@click.option("--augment/--no-augment", default=_D.augment,
              help="Random resized crops, flips, colour jitter (off in the seed recipe).")
@click.option("--resume", is_flag=True, help="Continue the run in --out where it stopped.")
@click.option("--stop-after-epochs", type=click.IntRange(min=1), default=None,
              help="End after this many epochs (both phases counted); --resume continues.")
@click.option("--progress/--no-progress", default=True, help="Progress bars on stderr.")
def main(variant, data_root, download, run_dir, ae_epochs, cls_epochs, batch_size, lr, seed,
         device, augment, resume, stop_after_epochs, progress):
    """Train a flowae variant with the seed's two-phase recipe."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    config = TrainConfig(ae_epochs=ae_epochs, cls_epochs=cls_epochs, batch_size=batch_size,
                         lr=lr, seed=seed, device=device, augment=augment)
    dist = None
    try:
        dist = distributed.init_from_env(device)
        if download and dist.is_main:
            fetch(data_root)
        dist.barrier()
        metrics = train(get_variant(variant), config, data_root, run_dir, resume=resume,
                        stop_after_epochs=stop_after_epochs, progress=progress, dist=dist)
    except FlowaeError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        if dist is not None:
            distributed.shutdown(dist)
    if not dist.is_main:
        return
    if metrics.get("stopped"):
        done = metrics["progress"]
        click.echo(f"stopped after ae {done['ae']}/{ae_epochs}, cls {done['cls']}/{cls_epochs} "
                   f"epochs; continue with --resume")
        return
    test = metrics["test"]
    click.echo(f"{variant}: test top-1 {test['top1']:.2f}%  top-5 {test['top5']:.2f}%  "
               f"recon MSE {test['recon_mse']:.4f}  train {metrics['train_seconds']:.0f} s  "
               f"-> {run_dir}")


if __name__ == "__main__":  # `python -m flowae.cli`, e.g. under `python -m torch.distributed.run`
    main()
