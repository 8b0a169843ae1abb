"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Every part of the project that writes a result a user keeps (reconstruction PNGs, manifests,
checkpoints, reports) writes it here: into a temp file in the destination's folder, flushed
and fsynced, then renamed over the destination. New files get the usual mode (0666 less the
umask), not mkstemp's 0600. Standard library only.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

# errno values of os.link on a filesystem that cannot make hard links.
_NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK,
                  errno.ENOSYS}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], None], *,
                 replace: bool = True) -> Path:
    """Call `write(handle)` on a temp file beside `path`, then move it to `path`.

    replace=False refuses (FileExistsError) to take the place of anything already at `path`;
    the check and the move are one step (a hard link), so a file that appears meanwhile is
    never overwritten. On any error the temp file is removed and `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        if replace:
            os.replace(tmp, path)
        else:
            _move_new(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _move_new(tmp: str, path: Path) -> None:
    """Move `tmp` to `path` only if nothing is there (FileExistsError otherwise)."""
    try:
        os.link(tmp, path)  # check and move in one step
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINKS:
            raise
        # FAT, exFAT and some network filesystems have no hard links: claim the name with an
        # exclusive create (which fails if anything is there), then rename over our own claim.
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Remove the temp files that interrupted atomic writes left in `folder` (a process killed
    between creating its temp file and renaming it); return what was removed. Call it only
    where no other writer is at work in `folder`."""
    removed = []
    for path in Path(folder).glob(".*.tmp"):
        if path.is_file() and not path.is_symlink():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def write_bytes_atomic(path: str | os.PathLike, data: bytes, *, replace: bool = True) -> Path:
    return write_atomic(path, lambda handle: handle.write(data), replace=replace)


def write_text_atomic(path: str | os.PathLike, text: str, *, replace: bool = True) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"), replace=replace)
