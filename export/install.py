"""Swapping a finished model directory in place of the old one, whole, and recovering after a crash.

An export builds its complete model directory (graphs, manifest) in a scratch sibling
`.NAME.export-<pid>-<random>` of the output `NAME`, then `install` puts it in place with
directory renames, so that `NAME` always holds the complete old model or the complete new
one, never a mix of the two:

* Linux (renameat2 with RENAME_EXCHANGE): one atomic exchange of scratch and `NAME`; the old
  model is then under the scratch name and is removed. A crash after the exchange leaves the
  new model in place and the old one in a stale scratch folder.
* elsewhere (or where the filesystem refuses the exchange): `NAME` is renamed to
  `.NAME.old-<pid>`, the scratch to `NAME`, then the old copy is removed. A crash between the
  two renames leaves no `NAME` (the only window with nothing there) and the complete old
  model in `.NAME.old-<pid>`.

Crash windows, and what the next export's `recover` does about each:
  before the swap (scratch partly or fully written): `NAME` is the old model, untouched;
    the scratch folder is removed.
  exchange done, old not yet removed: `NAME` is the new model; the scratch name holds the old
    one and is removed.
  two-rename path, between the renames: no `NAME`; `.NAME.old-<pid>` is renamed back to
    `NAME` (the old model is served again; the unfinished export is dropped with its scratch).
  two-rename path, after both: `NAME` is the new model; `.NAME.old-<pid>` is removed.
  first export (no `NAME` before): one rename, atomic; before it only the scratch exists.
All files are fsynced, and the folder after each rename, so the order holds after power loss.

`recover` runs before every export: it removes the scratch and old folders of exports whose
process is gone, and when `NAME` is missing but a complete `.NAME.old-*` exists, renames it
back. A folder whose owning process still runs is left alone (another export in progress).
`check_replaceable` refuses an output directory that is not a flowae model directory, so an
export never deletes a user's files. Imports the standard library, the runtime's contract
and errors, and flowae.export.ort_format (for a file name).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from flowae.export.ort_format import ORT_OPERATORS_CONFIG
from flowae.runtime.contract import (
    GRAPH_FORMATS,
    GRAPH_IO,
    MANIFEST_NAME,
    PRECISIONS,
    graph_file,
)
from flowae.runtime.errors import ExportError

log = logging.getLogger(__name__)

MODEL_FILES = frozenset({MANIFEST_NAME, ORT_OPERATORS_CONFIG} | {
    graph_file(role, precision, fmt)
    for role in GRAPH_IO for precision in PRECISIONS for fmt in GRAPH_FORMATS})
_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100

Step = Callable[[str], None]  # called with a step's name as the export passes it


def scratch_prefix(out_dir: Path) -> str:
    return f".{out_dir.name}.export-{os.getpid()}-"


def _old_name(out_dir: Path, pid: int) -> Path:
    return out_dir.parent / f".{out_dir.name}.old-{pid}"


def _siblings(out_dir: Path) -> list[tuple[Path, int]]:
    """(path, owning pid) of every scratch or old folder of `out_dir` beside it."""
    pattern = re.compile(rf"^\.{re.escape(out_dir.name)}\.(export|old)-(\d+)(-.*)?$")
    found = []
    if not out_dir.parent.is_dir():
        return found
    for path in out_dir.parent.iterdir():
        match = pattern.match(path.name)
        if match and path.is_dir() and not path.is_symlink():
            found.append((path, int(match.group(2))))
    return sorted(found)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def is_complete(path: Path) -> bool:
    """A folder holding a manifest and nothing but model files (what `install` moves)."""
    names = {p.name for p in path.iterdir()}
    return MANIFEST_NAME in names and names <= MODEL_FILES


def check_replaceable(out_dir: Path) -> None:
    """Raise ExportError unless `out_dir` is absent, empty, or a flowae model directory."""
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise ExportError(f"{out_dir} exists and is not a directory")
    if not out_dir.exists():
        return
    names = sorted(p.name for p in out_dir.iterdir())
    foreign = [name for name in names if name not in MODEL_FILES]
    if foreign:
        raise ExportError(f"{out_dir} holds files an export did not write ({', '.join(foreign[:3])}"
                          f"{', ...' if len(foreign) > 3 else ''}); refusing to replace it: "
                          f"choose another --out or empty it yourself")
    if names and MANIFEST_NAME not in names:
        raise ExportError(f"{out_dir} has no {MANIFEST_NAME}, so it is not a complete flowae "
                          f"model directory; refusing to replace it: choose another --out or "
                          f"remove it yourself")


def recover(out_dir: Path) -> list[Path]:
    """Undo what killed exports of `out_dir` left behind; return the folders removed.

    A complete `.NAME.old-<pid>` of a dead process is renamed back to `NAME` when `NAME` is
    missing (the crash fell between the two renames of the fallback swap); every other
    scratch or old folder of a dead process is removed.
    """
    removed = []
    for path, pid in _siblings(out_dir):
        if _alive(pid):
            log.info("leaving %s: its export (pid %d) is still running", path, pid)
            continue
        if path.name.startswith(f".{out_dir.name}.old-") and not out_dir.exists() \
                and is_complete(path):
            os.rename(path, out_dir)
            _fsync_dir(out_dir.parent)
            log.warning("restored %s from %s left by a killed export", out_dir, path.name)
            continue
        shutil.rmtree(path)
        removed.append(path)
        log.info("removed %s left by a killed export (pid %d)", path.name, pid)
    return removed


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directories (Linux renameat2); False where it is unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a C library without renameat2 (glibc < 2.28, musl)
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                          ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # this filesystem cannot
        return False
    raise OSError(code, os.strerror(code), str(b))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_tree(path: Path) -> None:
    """fsync every file in `path` and the folder itself, so a rename publishes whole files."""
    for child in path.iterdir():
        if child.is_file():
            fd = os.open(child, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(path)


def install(scratch: Path, out_dir: Path, on_step: Step = lambda step: None,
            exchange: bool = True) -> None:
    """Put the complete model directory `scratch` at `out_dir`, replacing what is there.

    `exchange=False` takes the two-rename path even where the atomic exchange exists.
    Steps reported: "swapped" (new model in place, old one not yet removed), and on the
    two-rename path "old-aside" (old model moved aside, new one not yet in place).
    """
    check_replaceable(out_dir)
    sync_tree(scratch)
    if not out_dir.exists():
        os.rename(scratch, out_dir)
        _fsync_dir(out_dir.parent)
        on_step("swapped")
        return
    if exchange and _exchange(scratch, out_dir):
        old = scratch  # the old model now lies under the scratch name
    else:
        old = _old_name(out_dir, os.getpid())
        os.rename(out_dir, old)
        on_step("old-aside")
        try:
            os.rename(scratch, out_dir)
        except OSError:
            os.rename(old, out_dir)  # put the old model back rather than leave nothing
            raise
    _fsync_dir(out_dir.parent)
    on_step("swapped")
    shutil.rmtree(old)
