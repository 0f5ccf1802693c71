"""Atomic writes, run folders and output checks."""

import os
import stat
from datetime import datetime

import numpy as np
import pytest

from nfsd_nerf.errors import UserError
from nfsd_nerf.files import (
    atomic_copy, atomic_target, atomic_write_bytes, check_writable, new_run_dir, slugify, write_files_atomically,
    write_png,
)


def test_atomic_write_replaces_whole_files_with_the_users_umask(tmp_path):
    path = tmp_path / "a.json"
    atomic_write_bytes(path, b"old")
    atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"new" and os.listdir(tmp_path) == ["a.json"]
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "video.mp4"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_target(path) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("encoder died")
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["video.mp4"]


def test_several_files_land_in_order_or_not_at_all(tmp_path):
    files = {"m.png": b"png", "m.mtl": b"mtl", "m.obj": b"obj"}
    written = write_files_atomically(tmp_path / "export", files)
    assert [p.name for p in written] == list(files)
    order = sorted(written, key=lambda p: p.stat().st_mtime_ns)
    assert [p.name for p in order] == list(files)  # the OBJ naming the others lands last
    (tmp_path / "blocker").write_text("a file, not a folder")
    with pytest.raises(UserError, match="cannot write to"):
        write_files_atomically(tmp_path / "blocker" / "sub", files)


def test_atomic_copy_and_png(tmp_path):
    source = atomic_write_bytes(tmp_path / "final.safetensors", b"weights")
    atomic_copy(source, tmp_path / "latest.safetensors")
    assert (tmp_path / "latest.safetensors").read_bytes() == b"weights"
    import imageio.v3 as iio

    pixels = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    assert np.array_equal(iio.imread(write_png(tmp_path / "p.png", pixels)), pixels)


def test_run_folders_are_new_and_named_after_the_prompt(tmp_path):
    now = datetime(2026, 1, 2, 3, 4, 5)
    first = new_run_dir(tmp_path, "A red cube!", now)
    second = new_run_dir(tmp_path, "A red cube!", now)
    assert first.name == "a-red-cube-20260102-030405" and second.name == "a-red-cube-20260102-030405-2"
    assert slugify("???") == "run" and len(slugify("word " * 40)) <= 48


def test_unwritable_output_is_refused_before_work(tmp_path):
    check_writable(tmp_path / "new" / "folder")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="not writable"):
        check_writable(tmp_path / "file" / "runs")
