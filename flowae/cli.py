"""`flowae-train`: click options -> dataset + ModelConfig + TrainConfig -> flowae.train.train().

Thin by design: parsing, opening the data, one training call, a summary line. A bad dataset
(DataError) becomes a one-line message and exit code 2, like a bad option; any other
FlowaeError a one-line message and exit code 1. torch is imported only once a run starts, so
`--help`/`-h`, `--version` and option errors answer at once.
"""

from __future__ import annotations

import logging
import math
from dataclasses import fields, replace
from pathlib import Path

import click

from flowae import __version__
from flowae.config import RECIPES, VARIANTS, TrainConfig, default_recipe, get_variant
from flowae.runtime.datasets import DEFAULT_DATA_ROOT
from flowae.runtime.errors import DataError, FlowaeError

_FIELD_TYPES = {f.name: f.type for f in fields(TrainConfig)}  # "int", "float", "bool", "str"


def _settings(ctx, param, values: tuple[str, ...]) -> dict:
    """--set KEY=VALUE pairs -> TrainConfig fields, typed as the dataclass declares them."""
    parsed = {}
    for item in values:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in _FIELD_TYPES:
            raise click.BadParameter(f"{item!r}: expected KEY=VALUE with KEY one of "
                                     f"{', '.join(_FIELD_TYPES)}")
        kind = _FIELD_TYPES[key]
        try:
            if kind == "bool":
                if text.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(text)
                parsed[key] = text.lower() in ("true", "1")
            else:
                parsed[key] = {"int": int, "float": float}.get(kind, str)(text)
        except ValueError:
            raise click.BadParameter(f"{item!r}: {key} takes a {kind}") from None
        if kind == "float" and not math.isfinite(parsed[key]):
            raise click.BadParameter(f"{item!r}: not a finite number")
    return parsed


def _finite(ctx, param, value: float) -> float:
    # FloatRange lets nan and inf through; either would train into NaN weights.
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number")
    return value


class _BadData(click.ClickException):
    exit_code = 2  # the data is bad input, as a bad option is


def _given(ctx: click.Context, name: str) -> bool:
    return ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT


@click.command("flowae-train",
               context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="flowae-train",
                      message="%(prog)s %(version)s")
@click.option("--variant", type=click.Choice(list(VARIANTS)), default="upsample",
              help="Model variant from the registry.")
@click.option("--data-root", type=click.Path(file_okay=False, path_type=Path),
              default=DEFAULT_DATA_ROOT, help="Folder holding flowers-102/ (Flowers102).")
@click.option("--download", is_flag=True, help="Fetch Flowers102 into --data-root first.")
@click.option("--data", "data_dir", type=click.Path(file_okay=False, path_type=Path),
              default=None, help="Your own images instead of Flowers102: DATA/train/<class>/, "
                                 "DATA/val/<class>/ [DATA/test/<class>/], or DATA/<class>/.")
@click.option("--val-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              default=None, help="--data DATA/<class>/ only: share of each class held out "
                                 "for val (seeded, stratified). [default: 0.1]")
@click.option("--strict", is_flag=True,
              help="--data: refuse unreadable images instead of skipping them.")
@click.option("--out", "run_dir", type=click.Path(file_okay=False, path_type=Path),
              required=True, help="Run directory: checkpoint, metrics.json, plots.")
@click.option("--recipe", type=click.Choice(list(RECIPES)), default=None,
              help="Training recipe the options below start from. [default: seed for the "
                   "seed's four variants, modern for the others]")
@click.option("--ae-epochs", type=click.IntRange(min=0), default=None,
              help="Phase 1 epochs. [default: from --recipe; seed 100]")
@click.option("--cls-epochs", type=click.IntRange(min=0), default=None,
              help="Phase 2 epochs. [default: from --recipe; seed 60]")
@click.option("--dec-epochs", type=click.IntRange(min=0), default=None,
              help="Phase 3 (decoder refit) epochs. [default: from --recipe; seed 0]")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="[default: from --recipe; seed 255]")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None,
              callback=_finite, help="Peak learning rate. [default: from --recipe; seed 1e-3]")
@click.option("--seed", type=int, default=None, help="[default: from --recipe; 0]")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto")
@click.option("--augment/--no-augment", default=None,
              help="Random resized crops, flips, colour jitter. [default: from --recipe; "
                   "seed no-augment]")
@click.option("--set", "settings", multiple=True, callback=_settings, metavar="KEY=VALUE",
              help="Any other recipe field, e.g. --set cutmix=0.5 --set weight_decay=0.1 "
                   "(repeatable; see flowae.config.TrainConfig).")
@click.option("--resume", is_flag=True, help="Continue the run in --out where it stopped.")
@click.option("--stop-after-epochs", type=click.IntRange(min=1), default=None,
              help="End after this many epochs (both phases counted); --resume continues.")
@click.option("--progress/--no-progress", default=True, help="Progress bars on stderr.")
@click.pass_context
def main(ctx, variant, data_root, download, data_dir, val_fraction, strict, run_dir, recipe,
         ae_epochs, cls_epochs, dec_epochs, batch_size, lr, seed, device, augment, settings,
         resume, stop_after_epochs, progress):
    """Train a flowae variant on Flowers102 or on your own class folders: autoencoder, then
    classifier (then, in the modern recipe, a decoder refit), with a named recipe whose fields
    the options override."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if data_dir is not None and (_given(ctx, "data_root") or download):
        raise click.UsageError("--data (your own class folders) and --data-root/--download "
                               "(Flowers102) exclude each other")
    if data_dir is None and (val_fraction is not None or strict):
        raise click.UsageError("--val-fraction and --strict apply to --data only")
    given = {"ae_epochs": ae_epochs, "cls_epochs": cls_epochs, "dec_epochs": dec_epochs,
             "batch_size": batch_size, "lr": lr, "seed": seed, "augment": augment}
    given = {**settings, **{k: v for k, v in given.items() if v is not None}}
    config = replace(RECIPES[recipe or default_recipe(variant)], **{**given, "device": device})
    from flowae import distributed
    from flowae.data import download as fetch
    from flowae.data import open_training_data
    from flowae.train import train

    dist = None
    try:
        dist = distributed.init_from_env(device)
        if download and dist.is_main:
            fetch(data_root)
        dist.barrier()
        dataset = open_training_data(data_dir or data_root, class_folders=data_dir is not None,
                                     val_fraction=val_fraction)
        model_config = get_variant(variant, num_classes=len(dataset.class_names))
        result = train(model_config, config, dataset, run_dir, resume=resume,
                       stop_after_epochs=stop_after_epochs, progress=progress, dist=dist,
                       strict=strict)
    except DataError as exc:
        raise _BadData(str(exc)) from None
    except FlowaeError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        if dist is not None:
            distributed.shutdown(dist)
    if not dist.is_main:
        return
    if result.stopped:
        done = result.progress
        click.echo(f"stopped after ae {done['ae']}/{config.ae_epochs}, cls {done['cls']}/"
                   f"{config.cls_epochs}, dec {done['dec']}/{config.dec_epochs} epochs; "
                   f"continue with --resume")
        return
    test, split = result.test, result.metrics["test_split"]
    click.echo(f"{variant}: {split} top-1 {test['top1']:.2f}%  top-5 {test['top5']:.2f}%  "
               f"recon MSE {test['recon_mse']:.4f}  train {result.metrics['train_seconds']:.0f} "
               f"s  {len(dataset.class_names)} classes -> {run_dir}")


if __name__ == "__main__":  # `python -m flowae.cli`, e.g. under `python -m torch.distributed.run`
    main()
