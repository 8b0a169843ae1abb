"""A class-folder view of some Flowers102 classes: the data behind the class-folder training
figures, rebuilt by one command instead of by hand.

`python -m benchmarks.flowers_view ../shared/flowers102 /tmp/flowers10` links the official
train and val images of classes 0, 10, ..., 90 (`--every 10 --classes 10`) into
DEST/train/<class>/ and DEST/val/<class>/ (ImageFolder layout; symlinks to the source images,
nothing copied), ready for `flowae-train --data DEST`. The view is built in a scratch folder
beside DEST and renamed into place, so DEST is either complete or absent; an existing DEST
that is not an empty folder is refused. Prints the images per class and split (with --out,
also flowers_view.json and .md). Imports the standard library, click, the runtime's dataset
reader and the benchmarks' helpers; tests/flowae uses `build_view` for its real-data test.
Nothing in the package imports it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import click

from benchmarks.options import BenchmarkError
from benchmarks.report import Column, Section, echo_paths, markdown_table
from flowae.runtime.contract import CLASS_NAMES
from flowae.runtime.datasets import flowers102_split
from flowae.runtime.errors import FlowaeError

NAME = "flowers_view"
SPLITS = ("train", "val")  # the official splits linked into the view, under these names
COLUMNS = [Column("label", "label"), Column("class_name", "class"), Column("folder", "folder"),
           *(Column(split, f"{split} images") for split in SPLITS)]


def every_nth_label(every: int, classes: int) -> tuple[int, ...]:
    """Labels 0, every, 2*every, ... (`classes` of them), all inside Flowers102's 0..101."""
    if every < 1 or classes < 1:
        raise BenchmarkError(f"--every {every} --classes {classes}: both must be at least 1")
    last = every * (classes - 1)
    if last >= len(CLASS_NAMES):
        raise BenchmarkError(f"--every {every} --classes {classes}: the last label would be "
                             f"{last}; labels must stay in 0..{len(CLASS_NAMES) - 1}")
    return tuple(range(0, last + 1, every))


def class_folder(label: int) -> str:
    """The folder name of a Flowers102 class: its name, with no path separator in it."""
    return CLASS_NAMES[label].replace("/", "_")


def _check_destination(dest: Path) -> None:
    if dest.is_symlink() or (dest.exists() and (not dest.is_dir() or any(dest.iterdir()))):
        raise BenchmarkError(f"{dest}: exists and is not an empty folder; give a new one")


def build_view(flowers_root: Path, dest: Path, labels: Sequence[int]) -> list[dict]:
    """Link the train and val images of `labels` into DEST/<split>/<class>/; one row a class.

    Each link points at the source image's absolute path, so the view works from any
    directory. Raises BenchmarkError for a bad destination or label, DataError (from the
    runtime's reader) when flowers_root is not Flowers102.
    """
    dest, labels = Path(dest), tuple(labels)
    if not labels or len(set(labels)) != len(labels) or not all(
            0 <= label < len(CLASS_NAMES) for label in labels):
        raise BenchmarkError(f"labels {labels}: expected distinct labels in "
                             f"0..{len(CLASS_NAMES) - 1}")
    _check_destination(dest)
    splits = {split: flowers102_split(Path(flowers_root), split) for split in SPLITS}
    dest.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    rows = {label: {"label": label, "class_name": CLASS_NAMES[label],
                    "folder": class_folder(label), **dict.fromkeys(SPLITS, 0), "status": "ok"}
            for label in labels}
    try:
        for split, (paths, split_labels) in splits.items():
            for path, label in zip(paths, split_labels, strict=True):
                if label in rows:
                    folder = scratch / split / class_folder(label)
                    folder.mkdir(parents=True, exist_ok=True)
                    (folder / path.name).symlink_to(path.resolve())
                    rows[label][split] += 1
        os.chmod(scratch, 0o755)  # mkdtemp makes it private; the view is an ordinary folder
        if dest.is_dir():
            dest.rmdir()  # empty (checked above); rename cannot replace it otherwise on all OSes
        os.rename(scratch, dest)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)  # removes the links, never their targets
        raise
    return list(rows.values())


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument("flowers_root", type=click.Path(path_type=Path))
@click.argument("dest", type=click.Path(path_type=Path))
@click.option("--every", type=click.IntRange(min=1), default=10,
              help="Take every n-th class label, starting at 0.")
@click.option("--classes", type=click.IntRange(min=1), default=10, help="How many classes.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Also write flowers_view.json and .md into this folder.")
def main(flowers_root: Path, dest: Path, every: int, classes: int, out: Path | None) -> None:
    """Link some Flowers102 classes into DEST/train/<class>/ and DEST/val/<class>/."""
    try:
        rows = build_view(flowers_root, dest, every_nth_label(every, classes))
    except FlowaeError as exc:
        raise click.ClickException(str(exc)) from None
    totals = {split: sum(row[split] for row in rows) for split in SPLITS}
    click.echo(f"# {dest}: {len(rows)} Flowers102 classes as class folders (symlinks to "
               f"{flowers_root}); " + ", ".join(f"{n} {s} images" for s, n in totals.items()))
    click.echo(markdown_table(rows, COLUMNS))
    if out is not None:
        from benchmarks.machine import machine_header
        from benchmarks.report import write_report

        header = machine_header(torch_info=False)
        header["settings"] = {"source": str(flowers_root), "view": str(dest),
                              "labels": ", ".join(str(row["label"]) for row in rows)}
        notes = [f"Train with it: `flowae-train --data {dest} ...` (val/ serves as the test "
                 "split when there is no test/)."]
        click.echo(echo_paths(write_report(
            out, NAME, "Flowers102 class-folder view", header, rows,
            [Section("Images per class", rows, COLUMNS, notes)], extra={"totals": totals})))


if __name__ == "__main__":
    main()
