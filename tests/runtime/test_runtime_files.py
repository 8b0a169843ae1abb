"""runtime.files: atomic writes never leave half a file, never replace what they must not,
and give new files the usual mode."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from flowae.runtime import files
from flowae.runtime.files import write_atomic, write_bytes_atomic, write_text_atomic


def test_replace_swaps_the_whole_file(tmp_path):
    target = tmp_path / "a.txt"
    write_text_atomic(target, "old")
    write_text_atomic(target, "new")
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "a.bin"
    write_bytes_atomic(target, b"good")

    def half(handle):
        handle.write(b"half")
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError):
        write_atomic(target, half)
    assert target.read_bytes() == b"good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]


def test_no_replace_refuses_an_existing_file_and_keeps_it(tmp_path):
    target = tmp_path / "mine.png"
    target.write_bytes(b"user data")
    with pytest.raises(FileExistsError):
        write_bytes_atomic(target, b"ours", replace=False)
    assert target.read_bytes() == b"user data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.png"]


def test_new_files_get_the_usual_mode(tmp_path):
    saved = os.umask(0o022)
    try:
        path = write_bytes_atomic(tmp_path / "x.png", b"png", replace=False)
    finally:
        os.umask(saved)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_without_hard_links_the_name_is_claimed_exclusively(tmp_path, monkeypatch):
    # FAT and some network filesystems refuse os.link; simulate that one call.
    def no_link(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(files.os, "link", no_link)
    fresh = write_bytes_atomic(tmp_path / "new.png", b"ours", replace=False)
    assert fresh.read_bytes() == b"ours"
    taken = tmp_path / "taken.png"
    taken.write_bytes(b"user data")
    with pytest.raises(FileExistsError):
        write_bytes_atomic(taken, b"ours", replace=False)
    assert taken.read_bytes() == b"user data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.png", "taken.png"]
