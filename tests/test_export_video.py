"""Turntable videos (export/video.py): read back from the files, normals from rendered depth
against an exact sphere, bad inputs, and the real hash-grid NeRF rendered from its run folder."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from export_helpers import Ellipsoid, White, albedo_from_points

from nfsd_nerf.errors import UserError
from nfsd_nerf.export.video import (
    check_video_inputs,
    estimate_seconds,
    normals_from_depth,
    render_run_video,
    render_turntable,
)


def test_video_reads_back_with_frames_size_fps_and_content(tmp_path):
    import imageio.v2 as iio

    field = Ellipsoid(center=(0, 0, 0), axes=(0.5, 0.5, 0.5), width=0.02)
    calls = []
    paths = render_turntable(
        field, White(), out_dir=tmp_path / "video", frames=5, size=48, fps=12, modes=("rgb", "normal", "depth"),
        gif=True, n_samples=96, progress=lambda done, total: calls.append((done, total)),
    )
    assert calls == [(i, 5) for i in range(1, 6)]
    names = {p.name for p in paths}
    assert names == {f"turntable_{m}.{ext}" for m in ("rgb", "normal", "depth") for ext in ("mp4", "gif")}
    assert {p.name for p in (tmp_path / "video").iterdir()} == names  # no temp files left
    for mode in ("rgb", "normal", "depth"):
        reader = iio.get_reader(tmp_path / "video" / f"turntable_{mode}.mp4")
        meta = reader.get_meta_data()
        assert meta["fps"] == 12 and meta["size"] == (48, 48) and meta["codec"] == "h264"
        assert reader.count_frames() == 5
        first = reader.get_data(0).astype(float) / 255.0
        reader.close()
        centre, corner = first[22:26, 22:26].mean((0, 1)), first[:4, :4].mean((0, 1))
        # first camera: azimuth 0, elevation 15 deg: the centre pixel sees the front of the ball
        front = torch.tensor([[math.cos(math.radians(15)), 0.0, math.sin(math.radians(15))]]) * 0.5
        if mode == "rgb":
            np.testing.assert_allclose(centre, albedo_from_points(front)[0].numpy(), atol=0.05)
            np.testing.assert_allclose(corner, 1.0, atol=0.03)  # white background
        elif mode == "normal":
            np.testing.assert_allclose(centre, 0.5 * F.normalize(front)[0].numpy() + 0.5, atol=0.06)
            np.testing.assert_allclose(corner, 1.0, atol=0.03)
        else:
            assert centre.mean() > 0.8 and corner.mean() < 0.03  # near is bright, background black
    gif = iio.mimread(tmp_path / "video" / "turntable_rgb.gif")
    assert len(gif) == 5 and gif[0].shape[:2] == (48, 48)


def test_normals_from_rendered_depth_match_the_surface():
    from nfsd_nerf.cameras import generate_rays, orbit_cameras

    cams = orbit_cameras(1, elevation_deg=30.0)
    rays_o, rays_d = (r[0].double() for r in generate_rays(cams, 64, 64))
    # exact first hit of the unit-radius-0.6 sphere, and its normal
    b = (rays_o * rays_d).sum(-1)
    disc = b**2 - ((rays_o**2).sum(-1) - 0.36)
    hit = disc > 0
    depth = torch.where(hit, -b - disc.clamp_min(0).sqrt(), torch.zeros_like(b))
    opacity = hit.double()
    want = F.normalize(rays_o + depth[..., None] * rays_d, dim=-1)
    got = normals_from_depth(depth, opacity, rays_o, rays_d)
    cos = (got * want).sum(-1)
    interior = hit & hit.roll(1, 0) & hit.roll(-1, 0) & hit.roll(1, 1) & hit.roll(-1, 1)
    interior &= (want * -rays_d).sum(-1) > math.cos(math.radians(70))  # not grazing
    assert cos[interior].min() > math.cos(math.radians(4))  # central differences
    assert torch.quantile(cos[hit], 0.02) > math.cos(math.radians(20))  # the rim: one-sided
    assert torch.equal(got[~hit], -rays_d[~hit])  # background: faces the camera (composited away)


def test_video_bad_inputs_are_user_errors(tmp_path):
    for kwargs, message in [
        (dict(size=31), "even number"),
        (dict(frames=0), "frames"),
        (dict(modes=("rgb", "sketch")), "'sketch'"),
        (dict(fps=0), "fps"),
    ]:
        with pytest.raises(UserError, match=message):
            render_turntable(Ellipsoid(), White(), out_dir=tmp_path / "video", **{"frames": 2, "size": 16, **kwargs})
    assert not (tmp_path / "video").exists()
    assert check_video_inputs(1, 16, 30, 15, ["depth"]) == ("depth",)


def test_estimate_scales_with_pixels_and_frames():
    field = Ellipsoid(center=(0, 0, 0), axes=(0.5, 0.5, 0.5))
    seconds = estimate_seconds(field, White(), frames=10, size=64, modes=("rgb",), n_samples=64, probe_size=32)
    assert math.isfinite(seconds) and seconds > 0


def test_unwritable_folder_is_a_user_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")  # (permissions do not stop root; a file in the path does)
    with pytest.raises(UserError, match="cannot write to"):
        render_turntable(Ellipsoid(), White(), out_dir=blocker / "video", frames=2, size=16, n_samples=32)


def test_a_failed_render_leaves_no_file_and_keeps_the_earlier_video(tmp_path):
    field = Ellipsoid(center=(0, 0, 0), axes=(0.5, 0.5, 0.5))
    out = tmp_path / "video"
    render_turntable(field, White(), out_dir=out, frames=2, size=16, modes=("rgb", "depth"), n_samples=32)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def stop(done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        render_turntable(
            field, White(), out_dir=out, frames=3, size=16, modes=("rgb", "depth"), n_samples=32, progress=stop
        )
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no temporary file left


def test_files_are_renamed_in_the_order_returned(tmp_path, monkeypatch):
    import nfsd_nerf.files

    renamed = []
    replace = os.replace
    monkeypatch.setattr(nfsd_nerf.files.os, "replace", lambda a, b: (renamed.append(Path(b).name), replace(a, b)))
    paths = render_turntable(Ellipsoid(), White(), out_dir=tmp_path, frames=1, size=16, modes=("rgb", "normal"),
                             gif=True, n_samples=32)
    assert renamed == [p.name for p in paths] == [
        "turntable_rgb.mp4", "turntable_rgb.gif", "turntable_normal.mp4", "turntable_normal.gif"
    ]


# --------------------------------------------------------------------------- the real field, through a checkpoint


def test_real_field_video_and_bad_checkpoint(box_run, tmp_path):
    import imageio.v2 as iio

    from nfsd_nerf.export.pipeline import export_run

    announced = []
    paths = render_run_video(box_run, frames=3, size=32, fps=10, modes=("rgb", "depth"), announce=announced.append)
    assert [p.name for p in paths] == ["turntable_rgb.mp4", "turntable_depth.mp4"]
    assert len(announced) == 1 and announced[0] > 0
    reader = iio.get_reader(paths[0])
    assert reader.count_frames() == 3 and reader.get_meta_data()["size"] == (32, 32) and reader.get_meta_data()["fps"] == 10
    first = reader.get_data(0).astype(float) / 255.0
    reader.close()
    # the first camera looks at the box's +X face; the centre ray meets it near (0.35, 0, 0.2)
    front = albedo_from_points(torch.tensor([[0.35, 0.0, 0.2]]))[0].numpy()
    np.testing.assert_allclose(first[15:17, 15:17].mean((0, 1)), front, atol=0.08)

    broken = tmp_path / "broken"
    (broken / "checkpoints").mkdir(parents=True)
    data = (box_run / "checkpoints" / "latest.safetensors").read_bytes()
    (broken / "checkpoints" / "latest.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated"):
        export_run(broken, format="glb", resolution=32)
    with pytest.raises(UserError, match="truncated"):
        render_run_video(broken, frames=2, size=16)
    assert sorted(p.name for p in broken.iterdir()) == ["checkpoints"]


def test_mp4_is_tagged_bt709_and_gets_the_umask_mode(tmp_path):
    # players guess an untagged video's colours differently; the file mode follows the user's umask
    import subprocess

    import imageio_ffmpeg

    from nfsd_nerf.export.video_file import video_file

    path = tmp_path / "red.mp4"
    old = os.umask(0o022)
    try:
        with video_file(path, fps=10.0, quality=8.0) as video:
            for _ in range(3):
                video.append(np.tile(np.array([255, 0, 0], np.uint8), (32, 32, 1)))
            video.finish()
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644
    exe = imageio_ffmpeg.get_ffmpeg_exe()
    info = subprocess.run([exe, "-hide_banner", "-i", str(path)], capture_output=True, text=True).stderr
    stream = next(line for line in info.splitlines() if "Video:" in line)
    assert "yuv420p(tv, bt709," in stream and "unknown" not in stream, stream  # matrix/primaries/transfer all bt709
    raw = subprocess.run([exe, "-v", "error", "-i", str(path), "-frames:v", "1", "-f", "rawvideo", "-pix_fmt", "yuv420p", "-"],
                         capture_output=True, check=True).stdout
    assert abs(raw[0] - 63) <= 2  # pure red: Y = 16 + 219 * 0.2126 (BT.709), not BT.601's 81


@pytest.mark.parametrize("axes", [(0.12, 0.1, 0.2), (0.3, 0.25, 0.5), (0.45, 0.45, 0.45)])
def test_default_distance_frames_the_object(axes):
    # small, tall and round objects all fill 50-85% of the frame height at the tallest view
    from nfsd_nerf.export.framing import turntable_cameras
    from nfsd_nerf.export.video import render_frame

    field = Ellipsoid(center=(0.05, -0.05, 0.0), axes=axes, width=0.02)
    cams = turntable_cameras(field, 8, 15.0)
    fractions = []
    for i in range(len(cams)):
        opacity = render_frame(field, White(), cams[i], 64, ("depth",), n_samples=128)["opacity"]
        rows = (opacity >= 0.5).any(dim=1).nonzero()
        fractions.append(float(rows.max() - rows.min() + 1) / 64)
    assert 0.5 <= max(fractions) <= 0.85, fractions
    assert min(fractions) > 0.4  # and no view loses it


def test_distance_and_fovy_override_the_framing():
    from nfsd_nerf.export.framing import framing_distance, turntable_cameras

    field = Ellipsoid()
    cams = turntable_cameras(field, 4, 15.0, distance=3.0, fovy=40.0)
    assert cams.c2w[:, :3, 3].norm(dim=-1).tolist() == pytest.approx([3.0] * 4, abs=1e-5)
    # a unit cube seen from the side at elevation 0: the front face's height 1 at distance d - 0.5
    # spans 1 / (2 (d - 0.5) tan(fovy / 2)) of the frame
    cube = np.array([[x, y, z] for x in (-0.5, 0.5) for y in (-0.5, 0.5) for z in (-0.5, 0.5)])
    d = framing_distance(cube, 60.0, 0.0, fill=0.75, azimuths=4)
    assert 1 / (2 * (d - 0.5) * math.tan(math.radians(30))) == pytest.approx(0.75, rel=1e-4)
    with pytest.raises(UserError, match="--distance"):
        render_turntable(field, White(), out_dir=Path("/nonexistent"), frames=2, size=16, distance=-1.0)
