"""The machine header every benchmark report starts with: CPU model and flags, core counts,
load average, library versions, thread settings and the command line, plus whether a CUDA
device is there for the rows that need one.

Imports the standard library and (inside the functions that need them) the runtime's session
module (onnxruntime) and torch, so a script that must keep torch out of its process
(cold_start) can still read the header.
Nothing outside benchmarks/ imports this module.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
import time
from pathlib import Path

# CPU features that decide which kernels onnxruntime and PyTorch can use.
CPU_FLAGS_OF_INTEREST = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16",
                         "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16")
PACKAGES = ("torch", "torchvision", "onnxruntime", "onnxruntime-gpu", "onnx", "onnxscript",
            "numpy", "pillow", "flowae")
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
              "ORT_NUM_THREADS", "CUDA_VISIBLE_DEVICES")
NO_CUDA = "skipped: no CUDA device"  # the status of a CUDA row on a machine without one


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def _physical_cores() -> int | None:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    cores = set()
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(":", 1) for line in block.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        cores.add((fields.get("physical id"), fields.get("core id")))
    return len(cores) or None


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask), which can be fewer than exist."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def load_average() -> float | None:
    """1-minute load average: how busy the machine was (others' work included)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _command_line() -> str:
    """How this script was started: `python -m benchmarks.NAME ARGS` or `python FILE ARGS`."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    program = f"-m {spec.name}" if spec is not None and spec.name else sys.argv[0]
    return " ".join(["python", program, *sys.argv[1:]])


def machine_header(*, torch_info: bool = True) -> dict:
    """CPU, cores, library versions, thread settings and load: what every report heads with.

    torch_info=False keeps torch out of this process (cold_start measures imports).
    """
    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    header = {
        "cpu_model": info.get("model name") or platform.processor() or platform.machine(),
        "cpu_family_model_stepping": "/".join(
            info.get(k, "?") for k in ("cpu family", "model", "stepping")),
        "cpu_flags": [f for f in CPU_FLAGS_OF_INTEREST if f in flags],
        "logical_cores": os.cpu_count(),
        "physical_cores": _physical_cores(),
        "usable_cores": usable_cores(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {p: v for p in PACKAGES if (v := _version(p)) is not None},
        "thread_env": {k: os.environ[k] for k in THREAD_ENV if k in os.environ},
        "load_average_1m_at_start": load_average(),
        "started_at": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "command": _command_line(),
    }
    from flowae.runtime.session import available_providers

    header["onnxruntime_providers"] = list(available_providers())
    if torch_info:
        import torch

        header["torch_threads"] = torch.get_num_threads()
        header["torch_interop_threads"] = torch.get_num_interop_threads()
        header["cuda_device"] = (torch.cuda.get_device_name(0) if torch.cuda.is_available()
                                 else None)
    return header


def torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def device_label(device: str) -> str:
    """How a row names its device: "cpu", or "cuda (GPU name)" when torch sees one."""
    if device != "cuda" or not torch_cuda_available():
        return device
    import torch

    return f"cuda ({torch.cuda.get_device_name(0)})"


def ort_cuda_available() -> bool:
    from flowae.runtime.session import PROVIDERS, available_providers

    return PROVIDERS["cuda"] in available_providers()

