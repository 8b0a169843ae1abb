"""The results folder of a batch job: its row schema, a settings marker and whole part files.

Rows are one per input: `image` (absolute path or URI), `error` (null when it worked) and the
top-k as `labels`, `class_names` and `probabilities`. Part files are written through a temp
name and a rename (runtime.files) on a local disk, directly on object storage (where an upload
appears only when complete), so a killed job leaves whole files only. On resume every file is
read back, and the folder is refused with a one-line error when it holds anything this code
could not have written or was written with other settings. Imports the runtime core and,
inside the functions that need it, pyarrow.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import secrets
import time

from flowae.runtime.batch.storage import BatchError, is_uri, open_filesystem
from flowae.runtime.errors import first_line
from flowae.runtime.files import write_atomic
from flowae.runtime.predictor import ImageResult

FORMATS = ("parquet", "jsonl")
MARKER_NAME = "_flowae-batch.json"  # the settings; "_": Parquet readers of the folder skip it
PART_PREFIX = "part-"
COLUMNS = ("image", "error", "labels", "class_names", "probabilities")


def results_schema():
    import pyarrow as pa

    return pa.schema([
        ("image", pa.string()),
        ("error", pa.string()),  # null when the image worked
        ("labels", pa.list_(pa.int64())),  # top-k, best first
        ("class_names", pa.list_(pa.string())),
        ("probabilities", pa.list_(pa.float64())),  # softmax, unrounded
    ])


def result_row(image: str, result: ImageResult) -> dict:
    if not result.ok:
        return error_row(image, result.error)
    return {"image": image, "error": None,
            "labels": [p.label for p in result.top_k],
            "class_names": [p.class_name for p in result.top_k],
            "probabilities": [p.probability for p in result.top_k]}


def error_row(image: str, error: str) -> dict:
    return {"image": image, "error": error, "labels": [], "class_names": [], "probabilities": []}


class ResultsFolder:
    """The --out folder: a settings marker and part files, each written whole or not at all.

    Local folders write through runtime.files (temp file, fsync, rename). On object storage
    an upload becomes visible only when it completes, so a part file is written directly.
    The folder is refused when it holds other files, other settings or a part file that does
    not read back, rather than mixing results or trusting a file this code did not write.
    """

    def __init__(self, out: str, fmt: str):
        from pyarrow import fs

        self.out, self.format = out, fmt
        if is_uri(out):
            self.filesystem, self.root = open_filesystem(out)
            self.local = isinstance(self.filesystem, fs.LocalFileSystem)
            if self.local:
                self.root = os.path.abspath(self.root)
        else:
            self.filesystem, self.local = fs.LocalFileSystem(), True
            self.root = os.path.abspath(out)
        self.run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
        self.written = 0

    @property
    def suffix(self) -> str:
        return "." + self.format

    def _path(self, name: str) -> str:
        return posixpath.join(self.root, name) if not self.local else os.path.join(self.root, name)

    def _names(self) -> list[str]:
        from pyarrow import fs

        info = self.filesystem.get_file_info(self.root)
        if info.type == fs.FileType.NotFound:
            return []
        if info.type != fs.FileType.Directory:
            raise BatchError(f"{self.out}: exists and is not a folder; --out takes a folder")
        listing = self.filesystem.get_file_info(fs.FileSelector(self.root))
        return sorted(entry.base_name for entry in listing)

    def open(self, settings: dict) -> dict[str, str | None]:
        """Check the folder for these settings; return image -> error of the rows it holds."""
        names = [name for name in self._names() if not name.startswith(".")]  # . : temp files
        if not names:
            self._write(MARKER_NAME, (json.dumps(settings, indent=2) + "\n").encode())
            return {}
        if MARKER_NAME not in names:
            raise BatchError(f"{self.out}: folder holds files but no {MARKER_NAME}, so it is "
                             "not a flowae-batch results folder; choose a new or empty --out")
        found = self._read_marker()
        if found != settings:
            changed = ", ".join(f"{k} {found.get(k)!r} (now {settings.get(k)!r})"
                                for k in sorted(settings.keys() | found.keys())
                                if found.get(k) != settings.get(k))
            raise BatchError(f"{self.out}: holds results written with other settings: {changed}; "
                             "use those settings or another --out")
        done: dict[str, str | None] = {}
        for name in names:
            if name == MARKER_NAME:
                continue
            if not (name.startswith(PART_PREFIX) and name.endswith(self.suffix)):
                raise BatchError(f"{self.out}: unexpected file {name} in a results folder")
            for image, error in self._read_part(name):
                done[image] = error
        return done

    def _read_marker(self) -> dict:
        try:
            found = json.loads(self._read(MARKER_NAME))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BatchError(f"{self.out}/{MARKER_NAME}: unreadable ({first_line(exc)})") from exc
        if not isinstance(found, dict):
            raise BatchError(f"{self.out}/{MARKER_NAME}: not a JSON object")
        return found

    def _read(self, name: str) -> bytes:
        with self.filesystem.open_input_file(self._path(name)) as handle:
            return handle.read()

    def _read_part(self, name: str) -> list[tuple[str, str | None]]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            data = self._read(name)
            if self.format == "parquet":
                table = pq.read_table(pa.BufferReader(data), columns=["image", "error"])
                return list(zip(table["image"].to_pylist(), table["error"].to_pylist(),
                                strict=True))
            rows = [json.loads(line) for line in data.decode("utf-8").splitlines()]
            return [(row["image"], row["error"]) for row in rows]
        except (pa.ArrowException, OSError, UnicodeDecodeError, ValueError, KeyError,
                TypeError) as exc:
            raise BatchError(f"{self.out}/{name}: not a results file this command wrote "
                             f"({first_line(exc)}); move it away to redo its images") from exc

    def write(self, table) -> str:
        """One part file holding `table`'s rows (a pyarrow Table of the COLUMNS); its path."""
        import pyarrow.parquet as pq

        table = table.select(list(COLUMNS))
        if self.format == "parquet":
            buffer = io.BytesIO()
            pq.write_table(table, buffer)
            data = buffer.getvalue()
        else:
            data = "".join(json.dumps(row) + "\n" for row in table.to_pylist()).encode()
        self.written += 1
        return self._write(f"{PART_PREFIX}{self.run_id}-{self.written:05d}{self.suffix}", data)

    def _write(self, name: str, data: bytes) -> str:
        path = self._path(name)
        if self.local:
            write_atomic(path, lambda handle: handle.write(data), replace=False)
        else:
            with self.filesystem.open_output_stream(path) as handle:
                handle.write(data)
        return path
