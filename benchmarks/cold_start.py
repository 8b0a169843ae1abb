"""Cold start: wall time of a whole `flowae-infer photo.jpg` process, and of importing the runtime.

Each row launches fresh Python processes (from a temporary working directory, so the repository
is not on sys.path) and times them from launch to exit with time.perf_counter: the interpreter
alone, importing numpy, Pillow, onnxruntime, the runtime and its CLI, importing torch (for
reference: what a torch-based runtime would pay before any work), and the full `flowae-infer
PHOTO` command. The first launch is reported apart from the rest. Two checks run beside the
timings: the modules a whole `flowae-infer` run loads must include neither torch nor any other
training-side module, and `-X importtime` shows where the CLI process spends its import time.
Writes cold_start.json and cold_start.md into --out (no plot: there is no batch axis here).
Imports the standard library, numpy and the runtime, and never torch itself (only the child
processes of the reference row do); nothing imports it.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import click
import numpy as np

from benchmarks.machine import machine_header
from benchmarks.options import (
    DEFAULT_DATA_ROOT,
    DEFAULT_OUT,
    DEFAULT_PHOTOS,
    BenchmarkError,
)
from benchmarks.report import Column, Section, echo_paths, write_report
from benchmarks.sources import check_one_model, one_runtime_model
from benchmarks.timing import latency_stats
from flowae.runtime.errors import FlowaeError

NAME = "cold_start"
TARGET_S = 0.5  # the target: a cold `flowae-infer photo.jpg` in at most 0.5 s wall
# Modules the device runtime must never load (its docstring and the style guide say so).
FORBIDDEN = ("torch", "torchvision", "scipy", "matplotlib", "flowae.export", "flowae.train",
             "flowae.models", "flowae.data", "flowae.checkpoint", "flowae.cli")
IMPORT_ROWS = (
    ("python -c pass (interpreter start-up)", "pass"),
    ("import numpy", "import numpy"),
    ("import PIL.Image", "import PIL.Image"),
    ("import onnxruntime", "import onnxruntime"),
    ("import flowae.runtime.predictor", "import flowae.runtime.predictor"),
    ("import flowae.runtime.cli", "import flowae.runtime.cli"),
    ("import torch (reference, not used by the runtime)", "import torch"),
)
# Runs the CLI inside a process and reports, at exit, which forbidden modules were loaded.
_PROBE = """
import atexit, json, sys
def report():
    loaded = sorted(m for m in sys.modules if any(m == f or m.startswith(f + ".")
                                                    for f in {forbidden!r}))
    with open({out!r}, "w") as handle:
        json.dump({{"loaded": loaded, "modules": len(sys.modules)}}, handle)
atexit.register(report)
sys.argv = {argv!r}
from flowae.runtime.cli import main
main()
"""


@dataclass(frozen=True)
class ColdStartConfig:
    """Every default of a cold-start run; QUICK is the smoke-test size."""

    repeats: int = 10  # timed launches per row after the first one
    import_breakdown: int = 12  # packages listed by the -X importtime breakdown
    torch_reference: bool = True  # also time `import torch` (seconds per launch)


QUICK = ColdStartConfig(repeats=2, import_breakdown=8)


def infer_command() -> list[str]:
    """The installed `flowae-infer` console script, run with this interpreter."""
    script = Path(sys.executable).parent / "flowae-infer"
    found = str(script) if script.is_file() else shutil.which("flowae-infer")
    if found is None:
        raise BenchmarkError("flowae-infer is not installed in this environment "
                                    "(pip install -e . gives it)")
    return [sys.executable, found]


def launch(command: list[str], cwd: Path) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    return (time.perf_counter() - start) * 1e3, done


def time_launches(label: str, command: list[str], repeats: int, cwd: Path) -> dict:
    """First launch apart, then `repeats` more; a non-zero exit makes the row a failure."""
    row = {"row": label, "command": " ".join(command[1:]) if command[0] == sys.executable
           else " ".join(command), "status": "ok"}
    first_ms, done = launch(command, cwd)
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        row["status"] = f"failed: exit {done.returncode}: {lines[-1] if lines else ''}"
        return row
    samples = [launch(command, cwd)[0] for _ in range(repeats)]
    row.update({"first_ms": first_ms, **latency_stats(samples)})
    row["max_ms"] = float(np.max(samples))
    return row


def forbidden_check(argv: list[str], cwd: Path) -> dict:
    """Run the CLI in one process and list the forbidden modules it loaded."""
    out = cwd / "loaded-modules.json"
    code = _PROBE.format(forbidden=FORBIDDEN, out=str(out), argv=argv)
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True)
    row = {"check": "modules loaded by a whole flowae-infer run", "exit_code": done.returncode}
    if not out.is_file():
        lines = done.stderr.strip().splitlines()
        row["status"] = f"failed: no report ({lines[-1] if lines else 'no output'})"
        return row
    report = json.loads(out.read_text())
    row["modules_loaded"] = report["modules"]
    row["forbidden_loaded"] = ", ".join(report["loaded"]) or "none"
    row["status"] = ("ok: torch not imported" if not report["loaded"]
                     else f"FAILED: imported {', '.join(report['loaded'])}")
    if done.returncode != 0:
        row["status"] += f" (but flowae-infer exited {done.returncode})"
    return row


_IMPORTTIME = re.compile(r"import time:\s+(\d+)\s+\|\s+(\d+)\s+\|\s*(\S+)")


def import_breakdown(command: list[str], cwd: Path, top: int) -> tuple[list[dict], dict]:
    """Import time of one process by top-level package (-X importtime self times, summed).

    Self times add up to the whole import time, so each package's share is its own: numpy's
    time counts once, whoever imported it first.
    """
    wall_ms, done = launch([command[0], "-X", "importtime", *command[1:]], cwd)
    by_package: dict[str, dict] = {}
    for line in done.stderr.splitlines():
        match = _IMPORTTIME.match(line)
        if match is None:
            continue
        entry = by_package.setdefault(match.group(3).split(".")[0],
                                      {"self_ms": 0.0, "modules": 0})
        entry["self_ms"] += int(match.group(1)) / 1e3
        entry["modules"] += 1
    imports_ms = sum(e["self_ms"] for e in by_package.values())
    ranked = sorted(by_package.items(), key=lambda item: -item[1]["self_ms"])
    rows = [{"package": name, **entry} for name, entry in ranked[:top]]
    rest = ranked[top:]
    if rest:
        rows.append({"package": f"({len(rest)} other packages)",
                     "self_ms": sum(e["self_ms"] for _, e in rest),
                     "modules": sum(e["modules"] for _, e in rest)})
    for row in rows:
        row["share_of_wall_pct"] = 100.0 * row["self_ms"] / wall_ms
    totals = {"wall_ms": wall_ms, "imports_ms": imports_ms, "exit_code": done.returncode,
              "rest_ms": wall_ms - imports_ms}
    return rows, totals


def run_cold_start(photo: Path, model: Path | None, config: ColdStartConfig, progress=None
                   ) -> tuple[list[dict], list[dict], list[dict], dict]:
    """(timing rows, check rows, import breakdown rows, breakdown totals)."""
    infer = infer_command()
    args = [str(photo), *(["--model", str(model)] if model is not None else [])]
    rows = []
    with tempfile.TemporaryDirectory(prefix="flowae-cold-") as tmp:
        cwd = Path(tmp)
        for label, code in IMPORT_ROWS:
            if code == "import torch" and not config.torch_reference:
                rows.append({"row": label, "command": f"-c {code}",
                             "status": "skipped: --no-torch-reference"})
                continue
            if progress is not None:
                progress(label)
            rows.append(time_launches(label, [sys.executable, "-c", code], config.repeats, cwd))
        label = f"flowae-infer {photo.name}" + (" --model MODEL" if model is not None else "")
        if progress is not None:
            progress(label)
        rows.append(time_launches(label, [*infer, *args], config.repeats, cwd))
        checks = [forbidden_check(["flowae-infer", *args], cwd)]
        breakdown, totals = import_breakdown([*infer, *args], cwd, config.import_breakdown)
    base = next((r for r in rows if r["row"].startswith("python -c pass")), {})
    for row in rows:
        row["minus_interpreter_ms"] = (row["p50_ms"] - base["p50_ms"]
                                       if "p50_ms" in row and "p50_ms" in base else None)
    return rows, checks, breakdown, totals


def sections(rows, checks, breakdown, totals) -> list[Section]:
    infer = rows[-1]
    notes = ["Wall time of whole processes, launch to exit (perf_counter in the parent). "
             "First: the first launch of that row in this run; p50/min/max over the rest. "
             "'- interpreter' subtracts the p50 of `python -c pass`."]
    if "p50_ms" in infer:
        p50_s, first_s = infer["p50_ms"] / 1e3, infer["first_ms"] / 1e3
        notes.append(f"Target: a cold `flowae-infer photo.jpg` in <= {TARGET_S} s. p50 "
                     f"{p50_s:.3f} s ({'met' if p50_s <= TARGET_S else 'missed'}), first "
                     f"launch {first_s:.3f} s ({'met' if first_s <= TARGET_S else 'missed'}).")
    return [
        Section("Process wall time", rows, [
            Column("row", "What"), Column("status", "Status"),
            Column("first_ms", "First (ms)", "{:.0f}"),
            Column("p50_ms", "p50 (ms)", "{:.0f}"),
            Column("min_ms", "min (ms)", "{:.0f}"),
            Column("max_ms", "max (ms)", "{:.0f}"),
            Column("minus_interpreter_ms", "- interpreter (ms)", "{:.0f}"),
            Column("n", "n"),
        ], notes),
        Section("Runtime imports no torch", checks, [
            Column("check", "Check"), Column("status", "Status"),
            Column("forbidden_loaded", "Forbidden modules loaded"),
            Column("modules_loaded", "Modules loaded"),
        ], [f"Forbidden: {', '.join(FORBIDDEN)}."]),
        Section("Where a flowae-infer process spends its import time", breakdown, [
            Column("package", "Package"),
            Column("self_ms", "Import time (ms)", "{:.1f}"),
            Column("modules", "Modules"),
            Column("share_of_wall_pct", "% of wall", "{:.1f}"),
        ], [f"One `python -X importtime` launch (import timing adds its own overhead): wall "
            f"{totals['wall_ms']:.0f} ms, all imports {totals['imports_ms']:.0f} ms, the rest "
            f"(interpreter, session creation, decoding, inference, output) "
            f"{totals['rest_ms']:.0f} ms."]),
    ]


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--photo", type=click.Path(path_type=Path),
              help="The image given to flowae-infer [default: the first full-size photo in "
                   f"{DEFAULT_PHOTOS}/jpg].")
@click.option("--model", type=click.Path(path_type=Path),
              help="Pass --model to flowae-infer [default: none, the bundled model].")
@click.option("--run", type=click.Path(path_type=Path),
              help="Instead of --model: a training run, exported here with flowae.export.")
@click.option("--variant", help="Instead of --model: fresh seeded weights of this variant, "
                                "exported here.")
@click.option("--repeats", type=click.IntRange(min=1),
              help="Timed launches per row after the first [default 10; --quick 2].")
@click.option("--torch-reference/--no-torch-reference", default=True, show_default=True,
              help="Also time `import torch`, for reference.")
@click.option("--quick", is_flag=True, help="Smoke-test size: 2 launches per row.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of --variant.")
@click.option("--data-root", type=click.Path(path_type=Path), default=DEFAULT_DATA_ROOT,
              show_default=True, help="Flowers102 folder for exporting a --run or --variant.")
@click.option("--out", type=click.Path(path_type=Path), default=DEFAULT_OUT / NAME,
              show_default=True, help="Folder for cold_start.json and cold_start.md.")
def main(photo, model, run, variant, repeats, torch_reference, quick, seed, data_root, out):
    """Time whole flowae-infer processes and runtime imports; check torch stays out."""
    config = replace(QUICK if quick else ColdStartConfig(), torch_reference=torch_reference,
                     **({"repeats": repeats} if repeats else {}))
    try:
        check_one_model(model, run, variant)
        photo = Path(photo) if photo else _default_photo()
        if not photo.is_file():
            raise BenchmarkError(f"--photo {photo}: no such file")
        with tempfile.TemporaryDirectory(prefix="flowae-bench-") as tmp:
            model_path, origin = one_runtime_model(
                model, run, variant, seed=seed, work_dir=Path(tmp), data_root=data_root,
                quick_export=quick)
            header = machine_header(torch_info=False)
            rows, checks, breakdown, totals = run_cold_start(
                photo.resolve(), model_path and Path(model_path).resolve(), config,
                progress=lambda text: click.echo(f"timing {text}", err=True))
    except FlowaeError as exc:
        raise click.ClickException(str(exc)) from None
    header["settings"] = {"model": origin, "photo": str(photo),
                          "launches": f"1 first + {config.repeats} timed per row",
                          "working directory": "a fresh temporary folder (repo not on path)"}
    secs = sections(rows, checks, breakdown, totals)
    paths = write_report(
        out, NAME, "Cold start: flowae-infer process and runtime import", header, rows, secs,
        extra={"checks": checks, "import_breakdown": breakdown, "import_totals": totals,
               "config": asdict(config), "forbidden": list(FORBIDDEN)})
    click.echo(paths["markdown"].read_text())
    click.echo(echo_paths(paths))
    broken = [c["forbidden_loaded"] for c in checks if c["status"].startswith("FAILED")]
    if broken:  # the runtime imported torch: a broken promise, not a timing
        raise click.ClickException(f"flowae-infer imported {broken[0]}")


def _default_photo() -> Path:
    photos = sorted((DEFAULT_PHOTOS / "jpg").glob("*.jpg"))
    if not photos:
        raise BenchmarkError(f"no photos in {DEFAULT_PHOTOS / 'jpg'}; "
                                    "give --photo")
    return photos[0]


if __name__ == "__main__":
    main()
