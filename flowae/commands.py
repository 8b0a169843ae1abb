"""The console scripts' entry points: each checks that its extra is installed, then runs.

`flowae-train` and `flowae-export` need the `[train]` extra (torch, onnx, ...); an install
of the device runtime alone gets one line naming the extra and exit status 2 instead of a
ModuleNotFoundError, even for `--help`. `python -m flowae` lists the commands. Standard
library only: the real command modules are imported after the check.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import dataclass

EXIT_USAGE = 2


@dataclass(frozen=True)
class Command:
    name: str  # the console script
    target: str  # "module:function" it runs
    extra: str | None  # pip extra it needs; None: the base (device runtime) install
    needs: tuple[str, ...]  # top-level modules that extra provides
    summary: str  # one line for `python -m flowae`


COMMANDS = (
    Command("flowae-infer", "flowae.runtime.cli:main", None, ("onnxruntime",),
            "classify or reconstruct images with an exported model (device runtime)"),
    Command("flowae-train", "flowae.cli:main", "train", ("torch", "torchvision"),
            "train a registered variant on Flowers102 or a class-folder dataset"),
    Command("flowae-export", "flowae.export.cli:main", "train", ("torch", "onnx"),
            "export a training run to verified ONNX graphs (fp32, int8, fp16, .ort)"),
    Command("flowae-serve", "flowae.runtime.serve.cli:main", "serve",
            ("starlette", "uvicorn", "python_multipart"),
            "HTTP API and web page, in-browser inference included"),
    Command("flowae-batch", "flowae.runtime.batch:main", "distributed", ("ray", "pyarrow"),
            "batch inference over image archives on Ray Data"),
)
_BY_NAME = {command.name: command for command in COMMANDS}


def missing_modules(command: Command) -> list[str]:
    return [name for name in command.needs if importlib.util.find_spec(name) is None]


def run(name: str) -> None:
    """Run console script `name`, or say which extra to install and exit 2."""
    command = _BY_NAME[name]
    missing = missing_modules(command)
    if missing:
        extra = f"flowae[{command.extra}]" if command.extra else "flowae"
        print(f"{name}: error: needs {', '.join(missing)}, which this install lacks; "
              f"install them with: pip install '{extra}'", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    module, function = command.target.split(":")
    getattr(importlib.import_module(module), function)()


def train() -> None:
    run("flowae-train")


def export() -> None:
    run("flowae-export")


def serve() -> None:
    run("flowae-serve")


def batch() -> None:
    run("flowae-batch")
