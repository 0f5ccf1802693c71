"""The one-call export (export/pipeline.py and ``nfsd-nerf export``): inputs checked before any
work, nothing partial on disk after a failure, and the real hash-grid NeRF exported from its run
folder."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from export_helpers import (
    BOX_CENTER,
    BOX_HALF,
    Ellipsoid,
    albedo_from_points,
    loaded_mesh,
    texture_colors_at_faces,
)
from typer.testing import CliRunner

from nfsd_nerf.errors import UserError
from nfsd_nerf.export.formats import WORLD_TO_Y_UP
from nfsd_nerf.export.pipeline import export_field, export_run


def test_no_surface_is_a_user_error_and_writes_nothing(tmp_path):
    field = Ellipsoid()
    with pytest.raises(UserError, match="no surface at density threshold 1000"):
        export_field(field, tmp_path / "export", format="ply", resolution=32, threshold=1000.0)
    empty = Ellipsoid(sigma=1e-4)
    with pytest.raises(UserError, match="no surface"):
        export_field(empty, tmp_path / "export", format="glb", resolution=32)
    assert not (tmp_path / "export").exists() or not any((tmp_path / "export").iterdir())


def test_repeated_export_replaces_only_when_complete(tmp_path, monkeypatch):
    field = Ellipsoid()
    out = tmp_path / "export"
    export_field(field, out, format="ply", resolution=24, threshold=25.0)
    before = (out / "mesh.ply").read_bytes()

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(UserError, match="No space left on device"):
        export_field(field, out, format="ply", resolution=32, threshold=25.0)
    assert (out / "mesh.ply").read_bytes() == before
    assert [p.name for p in out.iterdir()] == ["mesh.ply"]
    monkeypatch.undo()
    export_field(field, out, format="ply", resolution=32, threshold=25.0)
    assert (out / "mesh.ply").read_bytes() != before


def test_unwritable_folder_is_a_user_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")  # (permissions do not stop root; a file in the path does)
    with pytest.raises(UserError, match="cannot write to"):
        export_field(Ellipsoid(), blocker / "export", format="ply", resolution=24, threshold=25.0)


def test_bad_inputs_fail_before_the_run_is_read(tmp_path):
    missing = tmp_path / "no-such-run"
    for kwargs, message in [
        (dict(resolution=8), "--resolution 8: expected 16 to 1024"),
        (dict(resolution=2048), "--resolution 2048: expected 16 to 1024"),
        (dict(format="stl"), "unknown mesh format 'stl'"),
        (dict(texture_size=4), "texture size"),
        (dict(threshold=float("nan")), "threshold must be"),
    ]:
        with pytest.raises(UserError, match=message):
            export_run(missing, **kwargs)
        with pytest.raises(UserError, match=message):
            export_field(Ellipsoid(), tmp_path / "export", **kwargs)
    # PLY has no texture, so its texture size is not checked
    export_field(Ellipsoid(), tmp_path / "export", format="ply", texture_size=4, resolution=16, threshold=25.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--resolution", "8"], "--resolution 8: expected 16 to 1024"),
        (["--resolution", "1025"], "--resolution 1025: expected 16 to 1024"),
        (["--format", "stl"], "unknown mesh format 'stl' (choose from glb, obj, ply)"),
        (["--threshold", "high"], '--threshold \'high\': expected "auto" or a number'),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_code_2(tmp_path, args, message):
    from nfsd_nerf.cli import app

    result = CliRunner().invoke(app, ["export", str(tmp_path / "run"), *args])
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [f"error: {message}"]
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- the real field, through a checkpoint


@pytest.mark.parametrize("fmt", ["glb", "ply"])
def test_real_field_export_run_writes_upright_coloured_files(box_run, fmt):
    notes = []
    paths = export_run(box_run, format=fmt, resolution=64, texture_size=256, log=notes.append)
    assert paths == [box_run / "export" / f"mesh.{fmt}"]
    assert len(notes) == 2 and "(auto)" in notes[0] and "faces" in notes[0] and "outer surface" in notes[1]
    mesh = loaded_mesh(paths[0])
    rotation = WORLD_TO_Y_UP  # every format in glTF's frame by default
    extents = mesh.bounds[1] - mesh.bounds[0]
    np.testing.assert_allclose(mesh.bounds.mean(axis=0), 0.0, atol=1e-6)
    np.testing.assert_allclose(extents, rotation @ (2 * BOX_HALF), atol=0.06)
    assert np.argmax(extents) == 1
    world = mesh.vertices @ rotation + BOX_CENTER  # centred on the box (within the bbox tolerance)
    if fmt == "ply":
        got = mesh.visual.vertex_colors[:, :3] / 255.0
        want = albedo_from_points(torch.tensor(world, dtype=torch.float32)).numpy()
    else:
        got = texture_colors_at_faces(mesh)
        want = albedo_from_points(torch.tensor(world[mesh.faces].mean(1), dtype=torch.float32)).numpy()
    err = np.abs(got - want)
    assert err.mean() < 0.04 and np.quantile(err, 0.95) < 0.1


def test_export_locks_its_folder_and_clears_a_killed_exports_temporaries(box_run):
    import fcntl

    out = box_run / "export"
    out.mkdir(exist_ok=True)
    stale = out / ".mesh.glb.abcd1234.tmp"  # what a killed export leaves (files.TEMPORARY's pattern)
    stale.write_bytes(b"half a mesh")
    with open(box_run / ".export.lock", "a+") as held:  # another export writing there now
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(UserError, match="another nfsd-nerf process is writing a mesh"):
            export_run(box_run, format="ply", resolution=32)
        assert stale.exists()  # a live writer's temporary is left alone
    export_run(box_run, format="ply", resolution=32)
    assert not stale.exists() and (out / "mesh.ply").exists()
    assert not any(p.name.endswith(".lock") for p in out.iterdir())  # the folder holds only what was written
