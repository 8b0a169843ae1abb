"""Results table of training runs: variant, test top-1/top-5, parameters, wall time, command.

Reads the metrics.json that flowae-train writes into each run directory and prints (and with
--out saves) the Markdown table that docs/RESULTS.md quotes. The command column is rebuilt from
the run's saved TrainConfig: the recipe it is closest to, then a flag for every field that
differs. Imports click, the standard library and flowae.config (the torch-free recipes).

    python -m benchmarks.results runs/base runs/bn runs/bn-dropout runs/upsample
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import click

METRICS_NAME = "metrics.json"  # as flowae.train writes it


def result_row(run_dir: Path) -> dict:
    """One table row from a finished run directory."""
    path = Path(run_dir) / METRICS_NAME
    try:
        metrics = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise click.ClickException(f"{path}: not a finished run ({exc})") from None
    config = metrics["train_config"]
    history = metrics["history"]
    val_top1 = [row["val_top1"] for row in history["cls"] if "val_top1" in row]  # none when
    # val was trained on (cls_images=train+val)
    best_val = max(val_top1, default=float("nan"))
    command = train_command(metrics["variant"], config, run_dir)
    return {
        "variant": metrics["variant"],
        "test_top1": metrics["test"]["top1"],
        "test_top5": metrics["test"]["top5"],
        "final_val_top1": val_top1[-1] if val_top1 else float("nan"),
        "best_val_top1": best_val,
        "test_recon_mse": metrics["test"]["recon_mse"],
        "parameters": metrics["parameters"],
        "epochs": f"{config['ae_epochs']}+{config['cls_epochs']}"
                  + (f"+{config['dec_epochs']}" if config.get("dec_epochs") else ""),
        "train_min": metrics["train_seconds"] / 60.0,
        "data_load_s": metrics["data_load_seconds"],
        "device": metrics["device"],
        "command": command,
    }


FLAGS = {"ae_epochs": "--ae-epochs", "cls_epochs": "--cls-epochs", "dec_epochs": "--dec-epochs",
         "batch_size": "--batch-size", "lr": "--lr", "seed": "--seed"}


def train_command(variant: str, config: dict, run_dir: Path) -> str:
    """The flowae-train command line that reproduces `config` (device left to auto)."""
    from flowae.config import RECIPES, default_recipe

    def differing(name: str) -> dict:
        recipe = RECIPES[name].to_dict()
        return {k: v for k, v in config.items() if k != "device" and recipe.get(k) != v}

    default = default_recipe(variant)
    recipe = min(RECIPES, key=lambda name: (len(differing(name)), name != default))
    parts = [f"flowae-train --variant {variant} --data-root DATA --out {run_dir}"]
    if recipe != default:
        parts.append(f"--recipe {recipe}")
    for key, value in differing(recipe).items():
        if key in FLAGS:
            parts.append(f"{FLAGS[key]} {value}")
        elif key == "augment":
            parts.append("--augment" if value else "--no-augment")
        else:
            parts.append(f"--set {key}={str(value).lower() if isinstance(value, bool) else value}")
    return " ".join(parts)


def _val_cell(row: dict) -> str:
    if math.isnan(row["best_val_top1"]):
        return "trained on val"
    return f"{row['final_val_top1']:.2f} / {row['best_val_top1']:.2f}"


def markdown(rows: list[dict]) -> str:
    header = ("| variant | test top-1 % | test top-5 % | val top-1 % (last / best) "
              "| test recon MSE "
              "| parameters | epochs | train time (min) | command |")
    lines = [header, "|" + "---|" * 9]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['test_top1']:.2f} | {r['test_top5']:.2f} | "
            f"{_val_cell(r)} | {r['test_recon_mse']:.4f} | "
            f"{r['parameters']:,} | {r['epochs']} | {r['train_min']:.1f} | `{r['command']}` |"
        )
    return "\n".join(lines) + "\n"


def plot(run_dirs: tuple[Path, ...], rows: list[dict], path: Path) -> None:
    """Phase-2 val top-1 per epoch of each run that scored val (left) and each run's test
    top-1 at the end of training (right), one colour per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (curves, bars) = plt.subplots(1, 2, figsize=(12, 4.2),
                                       gridspec_kw={"width_ratios": [3, 2]})
    names = [Path(run_dir).name for run_dir in run_dirs]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, (run_dir, name) in enumerate(zip(run_dirs, names, strict=True)):
        history = json.loads((Path(run_dir) / METRICS_NAME).read_text())["history"]["cls"]
        scored = [row for row in history if "val_top1" in row]
        if scored:
            curves.plot([row["epoch"] for row in scored], [row["val_top1"] for row in scored],
                        label=name, color=colours[index % len(colours)], linewidth=1)
    curves.set(title="val top-1 per phase-2 epoch (resize 100)", xlabel="epoch", ylabel="%")
    curves.legend(fontsize=8)
    tops = [row["test_top1"] for row in rows]
    bars.barh(names, tops, color=[colours[i % len(colours)] for i in range(len(rows))])
    for y, top in enumerate(tops):
        bars.text(top, y, f" {top:.1f}", va="center", fontsize=8)
    bars.set(title="test top-1 at the end of training (resize 100)", xlabel="%")
    bars.invert_yaxis()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


@click.command()
@click.argument("run_dirs", nargs=-1, required=True,
                type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the table (Markdown) and rows (JSON beside it) here.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Also draw val curves and test top-1 of the runs (PNG).")
def main(run_dirs: tuple[Path, ...], out: Path | None, plot_path: Path | None) -> None:
    """Tabulate finished flowae-train runs."""
    rows = [result_row(run_dir) for run_dir in run_dirs]
    table = markdown(rows)
    click.echo(table, nl=False)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(table)
        out.with_suffix(".json").write_text(json.dumps(rows, indent=2))
    if plot_path is not None:
        plot(run_dirs, rows, plot_path)


if __name__ == "__main__":
    sys.exit(main())
