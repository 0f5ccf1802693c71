"""Atomic writes, run folders and output checks."""

import os
import signal
import stat
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

from nfsd_nerf.errors import UserError
from nfsd_nerf.files import (
    TEMPORARY, atomic_copy, atomic_target, atomic_write_bytes, check_writable, exclusive_lock, new_run_dir,
    remove_temporaries, slugify, write_files_atomically, write_png,
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
    assert list(tmp_path.iterdir()) == []  # creates nothing: a later refusal leaves nothing behind
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="not writable"):
        check_writable(tmp_path / "file" / "runs")


def test_temporaries_are_recognised_and_only_they_are_removed(tmp_path):
    names = []
    for name in ("latest.safetensors", "metrics.jsonl", "turntable_rgb.mp4", "noext"):
        with atomic_target(tmp_path / name) as tmp:
            names.append(tmp.name)
            assert TEMPORARY.match(tmp.name) and tmp.name.endswith(f".tmp{Path(name).suffix}")  # encoders pick by suffix
    keep = ["latest.safetensors", ".lock", ".gitignore", ".config.settings.yaml", "step000001.png"]
    for name in [*names, *keep]:
        (tmp_path / name).write_bytes(b"x")
    link_tmp = []
    real_link = os.link
    os.link = lambda a, b: (link_tmp.append(os.path.basename(b)), real_link(a, b))[1]
    try:
        atomic_copy(tmp_path / "latest.safetensors", tmp_path / "copy.safetensors")
    finally:
        os.link = real_link
    assert TEMPORARY.match(link_tmp[0])
    before = set(os.listdir(tmp_path))
    assert sorted(p.name for p in remove_temporaries(tmp_path)) == sorted(names)
    assert set(os.listdir(tmp_path)) == before - set(names) and set(keep) <= before
    assert remove_temporaries(tmp_path / "missing") == []


def test_a_lock_refuses_a_second_holder_and_dies_with_its_process(tmp_path):
    lock = tmp_path / ".lock"
    with exclusive_lock(lock, "busy"):
        with pytest.raises(UserError, match=rf"^busy \(pid {os.getpid()} on "):
            with exclusive_lock(lock, "busy"):
                pass
    with exclusive_lock(lock, "busy"):  # released with the block
        pass
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from nfsd_nerf.files import exclusive_lock\n"
         f"with exclusive_lock({str(lock)!r}, 'busy'):\n    print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(UserError, match=rf"pid {holder.pid} on "):
        with exclusive_lock(lock, "busy"):
            pass
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    with exclusive_lock(lock, "busy"):  # kill -9 leaves no stale lock
        pass
