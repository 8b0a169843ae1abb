"""The seed's figures for a run: loss curves, accuracy per epoch, test reconstructions.

Imports matplotlib (Agg, no display), torch and the runtime; called by the training loop on
rank 0, written atomically.
"""

from __future__ import annotations

from pathlib import Path

import torch

from flowae.data import TensorSplit, to_float, to_uint8
from flowae.runtime.contract import Preprocess
from flowae.runtime.files import write_atomic

LOSS_PLOT = "loss.png"
ACCURACY_PLOT = "accuracy.png"
RECONSTRUCTION_PLOT = "reconstructions.png"
NUM_SHOWN = 10


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    write_atomic(path, lambda handle: fig.savefig(handle, format="png", dpi=110,
                                                  bbox_inches="tight"))
    plt.close(fig)


def plot_curves(run_dir: Path, history: dict) -> None:
    """Loss curves of both phases (a phase run for 0 epochs shows an empty panel) and, when
    phase 2 ran, accuracy per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = ["ae", "cls"] + (["dec"] if history.get("dec") else [])  # phase 3 when it ran
    titles = {"ae": "phase 1: autoencoder (MSE)", "cls": "phase 2: classifier (cross-entropy)",
              "dec": "phase 3: decoder refit (MSE)"}
    fig, axes = plt.subplots(1, len(phases), figsize=(5.5 * len(phases), 4))
    for ax, phase in zip(axes, phases, strict=True):
        rows, title = history[phase], titles[phase]
        epochs = [r["epoch"] for r in rows]
        ax.plot(epochs, [r["train_loss"] for r in rows], label="train")
        val_key = "val_loss" if phase == "cls" else "val_recon_mse"
        if all(val_key in r for r in rows):  # absent when val was trained on (cls_images)
            ax.plot(epochs, [r[val_key] for r in rows], label="val")
        ax.set(title=title if rows else f"{title}: not run", xlabel="epoch", ylabel="loss")
        ax.legend()
    _save(fig, run_dir / LOSS_PLOT)

    rows = history["cls"]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = [r["epoch"] for r in rows]
    ax.plot(epochs, [r["train_top1"] for r in rows], label="train top-1")
    if all("val_top1" in r for r in rows):
        ax.plot(epochs, [r["val_top1"] for r in rows], label="val top-1")
        ax.plot(epochs, [r["val_top5"] for r in rows], label="val top-5", linestyle="--")
    ax.set(title="accuracy per epoch (phase 2)", xlabel="epoch", ylabel="%")
    ax.legend()
    _save(fig, run_dir / ACCURACY_PLOT)


@torch.no_grad()
def plot_reconstructions(run_dir: Path, model, split: TensorSplit, preprocess: Preprocess,
                         device: torch.device) -> None:
    """10 fixed images (evenly spaced through the split; repeats when it holds fewer) above
    their reconstructions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    index = torch.linspace(0, len(split) - 1, NUM_SHOWN).round().long()
    images = to_float(split.images[index].to(device), preprocess)
    was_training = model.training
    model.eval()
    reconstructions = model.decoder(model.encoder(images))
    model.train(was_training)
    rows = (split.images[index], to_uint8(reconstructions.float().cpu(), preprocess))
    fig, axes = plt.subplots(2, NUM_SHOWN, figsize=(NUM_SHOWN * 1.3, 2.9))
    for row, (batch, label) in enumerate(zip(rows, ("input", "output"), strict=True)):
        for col in range(NUM_SHOWN):
            axes[row, col].imshow(batch[col].permute(1, 2, 0).numpy())
            axes[row, col].set_xticks([])
            axes[row, col].set_yticks([])
        axes[row, 0].set_ylabel(label)
    _save(fig, run_dir / RECONSTRUCTION_PLOT)


def save_plots(run_dir: Path, history: dict, model, test: TensorSplit, preprocess: Preprocess,
               device: torch.device) -> None:
    if history["ae"] or history["cls"]:  # e.g. --ae-epochs 0 still gets its loss curves
        plot_curves(run_dir, history)
    plot_reconstructions(run_dir, model, test, preprocess, device)
