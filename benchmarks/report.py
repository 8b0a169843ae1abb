"""How a benchmark writes what it measured: rows (dicts) with a status, Markdown tables of
chosen columns under titled sections, the machine header as a list, NAME.json and NAME.md
written atomically into --out, and a PNG of series against batch size.

Functions return text or paths; only the scripts print. Imports the standard library, numpy,
the runtime's atomic writer and (inside plot_series) matplotlib. Nothing outside benchmarks/
imports this module.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.machine import load_average
from flowae.runtime.files import write_atomic, write_text_atomic


def first_line(exc: BaseException) -> str:
    """'ValueError: the first line of its message' (the type alone when it has none)."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


def failed(exc: BaseException) -> str:
    """The status of a row whose format failed: 'failed: <one line>'."""
    return f"failed: {first_line(exc)}"


def is_ok(row: dict) -> bool:
    return row.get("status") == "ok"


@dataclass(frozen=True)
class Column:
    """One Markdown column: a row key, its header, and how a value is written."""

    key: str
    header: str
    fmt: str = "{}"  # e.g. "{:.2f}"; None and missing values are written as "-"

    def cell(self, row: dict) -> str:
        value = row.get(self.key)
        if value is None:
            return "-"
        if isinstance(value, float) and not np.isfinite(value):
            return "-"
        return self.fmt.format(value) if not isinstance(value, str) else value


@dataclass
class Section:
    """A titled Markdown table with notes under it."""

    title: str
    rows: list[dict]
    columns: list[Column]
    notes: list[str] = dataclasses.field(default_factory=list)


def markdown_table(rows: Sequence[dict], columns: Sequence[Column]) -> str:
    lines = ["| " + " | ".join(c.header for c in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        cells = (c.cell(row).replace("|", "\\|").replace("\n", " ") for c in columns)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def header_markdown(header: dict) -> str:
    """The machine header as a short Markdown list."""
    versions = ", ".join(f"{k} {v}" for k, v in header.get("versions", {}).items())
    cores = (f"{header.get('logical_cores')} logical / {header.get('physical_cores')} physical"
             f" / {header.get('usable_cores')} usable")
    lines = [
        f"- CPU: {header.get('cpu_model')} (family/model/stepping "
        f"{header.get('cpu_family_model_stepping')}; {' '.join(header.get('cpu_flags', []))})",
        f"- Cores: {cores}; load average (1 min) at start "
        f"{header.get('load_average_1m_at_start')}, at end {header.get('load_average_1m_at_end')}",
        f"- Versions: python {header.get('python')}, {versions}",
        f"- onnxruntime providers: {', '.join(header.get('onnxruntime_providers', []))}",
    ]
    if "torch_threads" in header:
        lines.append(
            f"- Threads: torch intra-op {header['torch_threads']}, inter-op "
            f"{header['torch_interop_threads']} at start (each row sets its own, see Threads); "
            f"environment {header.get('thread_env') or 'none set'}; CUDA device "
            f"{header.get('cuda_device') or 'none'}"
        )
    else:
        lines.append(f"- Thread environment: {header.get('thread_env') or 'none set'}")
    for key, value in header.get("settings", {}).items():
        lines.append(f"- {key}: {value}")
    lines.append(f"- Command: `{header.get('command')}` at {header.get('started_at')}")
    return "\n".join(lines)


def render_markdown(title: str, header: dict, sections: Sequence[Section],
                    intro: str = "") -> str:
    parts = [f"# {title}", ""]
    if intro:
        parts += [intro, ""]
    parts += [header_markdown(header), ""]
    for section in sections:
        parts += [f"## {section.title}", "", markdown_table(section.rows, section.columns), ""]
        parts += [f"- {note}" for note in section.notes]
        if section.notes:
            parts.append("")
    return "\n".join(parts).rstrip() + "\n"


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def write_report(out_dir: Path, name: str, title: str, header: dict, rows: list[dict],
                 sections: Sequence[Section], extra: dict | None = None,
                 intro: str = "") -> dict[str, Path]:
    """Write OUT/name.json and OUT/name.md (each atomically); return their paths."""
    out_dir = Path(out_dir)
    header = {**header, "load_average_1m_at_end": load_average()}
    payload = {"benchmark": name, "title": title, "header": header, "rows": rows,
               **(extra or {})}
    json_path = out_dir / f"{name}.json"
    md_path = out_dir / f"{name}.md"
    write_text_atomic(json_path, json.dumps(payload, indent=2, default=_json_default) + "\n")
    write_text_atomic(md_path, render_markdown(title, header, sections, intro))
    return {"json": json_path, "markdown": md_path}


def plot_series(path: Path, panels: dict[str, dict[str, tuple[list, list]]], *, xlabel: str,
                ylabel: str, title: str, logx: bool = True, logy: bool = True) -> Path | None:
    """One subplot per panel, one line per label: {panel: {label: (xs, ys)}} -> PNG.

    Returns None (and writes nothing) when no panel has a point to draw.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = {k: {label: xy for label, xy in v.items() if xy[0]} for k, v in panels.items()}
    panels = {k: v for k, v in panels.items() if v}
    if not panels:
        return None
    cols = min(3, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 4.2 * rows), squeeze=False)
    for ax, (panel, lines) in zip(axes.flat, panels.items(), strict=False):
        for label, (xs, ys) in lines.items():
            ax.plot(xs, ys, marker="o", label=label)
        ax.set_title(panel, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if logx:
            ax.set_xscale("log", base=2)
        if logy:
            ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    try:
        return write_atomic(path, lambda handle: fig.savefig(handle, format="png", dpi=110))
    finally:
        plt.close(fig)


def echo_paths(paths: dict[str, Path | None]) -> str:
    return "\n".join(f"wrote {kind}: {path}" for kind, path in paths.items() if path)
