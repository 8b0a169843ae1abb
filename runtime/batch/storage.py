"""Where a batch job's inputs and results live: local paths, and URIs that pyarrow can open.

Lists the inputs of `flowae-batch` (files, folders and globs as flowae-infer takes them, local
paths made absolute; for URIs such as s3://bucket/photos/, a folder's images or a glob in the
file name), one Input per image or an error for an argument that names none, and opens a URI's
filesystem. Imports the standard library, Pillow (for the image suffixes), the runtime's errors
and, inside the functions that need it, pyarrow.
"""

from __future__ import annotations

import glob
import os
import posixpath
import re
from collections.abc import Iterable
from dataclasses import dataclass
from fnmatch import fnmatch

from flowae.runtime.errors import FlowaeError, first_line

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class BatchError(FlowaeError):
    """The batch job cannot run as asked (bad location or results folder, no Ray, Ray failed)."""


def is_uri(text: str) -> bool:
    return bool(_URI.match(text))


@dataclass(frozen=True)
class Input:
    """One row to be: the `image` key (absolute local path or URI), or an argument's error."""

    image: str
    error: str | None = None


def list_inputs(arguments: Iterable[str | os.PathLike]) -> list[Input]:
    """Files, folders (their images, sorted) and globs as flowae-infer takes them, local paths
    made absolute, and URIs (a folder's images, or a glob in the file name). Each input once,
    in the order first given; an argument that names no image is an Input with an error."""
    inputs: dict[str, Input] = {}
    for argument in arguments:
        text = os.fspath(argument)
        for item in _list_uri(text) if is_uri(text) else _list_local(text):
            inputs.setdefault(item.image, item)
    return list(inputs.values())


def _is_image_name(name: str) -> bool:
    from PIL import Image

    suffix = posixpath.splitext(name)[1].lower()
    return not name.startswith(".") and suffix in Image.registered_extensions()


def _list_local(argument: str) -> list[Input]:
    """A missing file is kept: reading it gives the row its 'no such file' error."""
    if os.path.isdir(argument):
        found = [os.path.join(argument, name) for name in sorted(os.listdir(argument))
                 if _is_image_name(name) and os.path.isfile(os.path.join(argument, name))]
        reason = "directory holds no images"
    elif not os.path.exists(argument) and glob.has_magic(argument):
        found = [m for m in sorted(glob.glob(argument, recursive=True)) if not os.path.isdir(m)]
        reason = "no file matches"
    else:
        found, reason = [argument], None
    return [Input(os.path.abspath(name)) for name in found] or [
        Input(argument, f"{argument}: {reason}")]


def open_filesystem(uri: str):
    """(pyarrow FileSystem, path inside it) for a URI; BatchError for one pyarrow cannot open."""
    from pyarrow import ArrowException, fs

    try:
        return fs.FileSystem.from_uri(uri)
    except (ArrowException, OSError, ValueError) as exc:
        raise BatchError(f"{uri}: cannot open this location ({first_line(exc)})") from exc


def _list_uri(uri: str) -> list[Input]:
    from pyarrow import ArrowException, fs

    filesystem, path = open_filesystem(uri)
    try:
        info = filesystem.get_file_info(path)
        if info.type == fs.FileType.File:
            return [Input(uri)]
        if info.type == fs.FileType.Directory:
            folder, pattern = uri.rstrip("/"), None
        elif glob.has_magic(posixpath.basename(path)) and not glob.has_magic(
                posixpath.dirname(path)):
            folder, pattern = uri.rsplit("/", 1)[0], posixpath.basename(path)
        else:
            return [Input(uri)]  # reading it reports what is wrong
        listing = filesystem.get_file_info(fs.FileSelector(path.rstrip("/") if pattern is None
                                                           else posixpath.dirname(path)))
    except (ArrowException, OSError) as exc:
        return [Input(uri, f"{uri}: cannot list ({first_line(exc)})")]
    names = sorted(entry.base_name for entry in listing if entry.type == fs.FileType.File
                   and (fnmatch(entry.base_name, pattern) if pattern
                        else _is_image_name(entry.base_name)))
    if not names:
        reason = "no file matches" if pattern else "directory holds no images"
        return [Input(uri, f"{uri}: {reason}")]
    return [Input(f"{folder}/{name}") for name in names]


