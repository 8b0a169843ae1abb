"""Val top-1 of a trained run for several test-time resize sizes (resize the shorter side to R,
centre-crop the model's input side): choose `flowae-export --resize-px` on val, never on test.

A model trained on random resized crops sees flowers larger than a plain resize-to-100 shows
them; resizing a little larger before the centre crop can match the two (the "FixRes" effect).
The input size, and so the latency, stays the same. Prints a table, and with --out writes it
as Markdown plus JSON beside it.

    python -m benchmarks.resize runs/res32 --data-root ../shared/flowers102
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click


def sweep(run: Path, data_root: Path, sizes: tuple[int, ...], split: str = "val") -> list[dict]:
    """[{resize_px, top1, top5, images}] for each size, through the eval transform."""
    import torch

    from flowae.checkpoint import load_checkpoint, model_from_checkpoint
    from flowae.data import load_split, preprocess_for
    from flowae.distributed import DistInfo
    from flowae.train import evaluate

    model = model_from_checkpoint(load_checkpoint(run)).eval()
    rows = []
    for size in sizes:
        preprocess = preprocess_for(model.config, resize_px=size)
        data = load_split(data_root, split, preprocess)
        result = evaluate(model, data, preprocess, 128, torch.device("cpu"), DistInfo())
        rows.append({"resize_px": size, "top1": result["top1"], "top5": result["top5"],
                     "images": len(data), "split": split})
    return rows


def markdown(rows: list[dict], best: dict) -> str:
    lines = [f"| resize shorter side to (px) | {rows[0]['split']} top-1 % | top-5 % |",
             "|---|---|---|"]
    for row in rows:
        mark = " (best)" if row is best else ""
        lines.append(f"| {row['resize_px']}{mark} | {row['top1']:.2f} | {row['top5']:.2f} |")
    return "\n".join(lines) + "\n"


@click.command()
@click.argument("run", type=click.Path(exists=True, path_type=Path))
@click.option("--data-root", type=click.Path(file_okay=False, path_type=Path),
              default=Path("../shared/flowers102"), show_default=True)
@click.option("--sizes", default="100,107,114,121,128", show_default=True,
              help="Comma-separated shorter-side sizes, each >= the model's input side.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the table (Markdown) and rows (JSON beside it) here.")
def main(run: Path, data_root: Path, sizes: str, out: Path | None) -> None:
    """Val top-1 per test-time resize size; the best is what to pass to flowae-export."""
    from flowae.runtime.errors import FlowaeError

    try:
        values = tuple(int(v) for v in sizes.split(","))
    except ValueError:
        raise click.BadParameter(f"{sizes!r}: expected integers like 100,114,128",
                                 param_hint="--sizes") from None
    try:
        rows = sweep(run, data_root, values)
    except FlowaeError as exc:
        raise click.ClickException(str(exc)) from None
    best = max(rows, key=lambda row: (row["top1"], -abs(row["resize_px"] - values[0])))
    table = markdown(rows, best)
    click.echo(table, nl=False)
    click.echo(f"best on {best['split']}: --resize-px {best['resize_px']}")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(table)
        out.with_suffix(".json").write_text(json.dumps({"rows": rows, "best": best}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
