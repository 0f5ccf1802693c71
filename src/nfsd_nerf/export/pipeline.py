"""``nfsd-nerf export`` in one call: a field (or a run folder) -> coloured mesh files.

The stages live in their own modules; :func:`export_field` runs them top to bottom:

1. check every input (:func:`check_export_inputs`), so a bad one fails before any work;
2. :func:`~.extract.extract_mesh`: the surface, in world units;
3. colours from the albedo field (:mod:`.texture`): a baked texture when the format's table
   entry ``needs_texture``, else vertex colours;
4. :func:`~.formats.write_mesh`: centred, in the format's axes, written atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from .extract import DEFAULT_CHUNK, DEFAULT_MAX_FACES, Threshold, check_extract_inputs, extract_mesh
from .formats import MeshFormat, check_up, mesh_format, write_mesh
from .texture import albedo_fn_from_field, bake_texture, check_texture_size, vertex_colors_from_albedo


def check_export_inputs(
    format: str, resolution: int, threshold: Threshold, texture_size: int, max_faces: int | None
) -> MeshFormat:
    """Validate an export's settings once, at the top (before a run is loaded or a field sampled);
    returns the format's table entry. Raises :class:`~nfsd_nerf.errors.UserError` quoting the bad value."""
    spec = mesh_format(format)
    if spec.needs_texture:
        check_texture_size(texture_size)
    check_extract_inputs(resolution, threshold, max_faces)
    return spec


def export_field(
    field,
    out_dir: Path | str,
    *,
    format: str = "glb",
    resolution: int = 256,
    threshold: Threshold = "auto",
    texture_size: int = 1024,
    max_faces: int | None = DEFAULT_MAX_FACES,
    occupancy=None,
    name: str = "mesh",
    chunk: int = DEFAULT_CHUNK,
    keep_inner: bool = False,
    up: str = "y",
    log: Callable[[str], None] | None = None,
) -> list[Path]:
    """Extract, colour and write the field's mesh as ``out_dir/<name>.<format>`` (and the other
    files of the format's ``files(name)``, e.g. OBJ's .mtl and .png).

    Returns the paths written. Every bad input raises :class:`~nfsd_nerf.errors.UserError` before
    anything is written. ``keep_inner``: the raw level set (inner shells, cavities and pinholes
    kept) instead of the outer surface. ``up``: the files' axes, ``"y"`` (glTF) or ``"z"`` (Blender),
    see :mod:`.formats`. ``log`` receives one-line progress notes (threshold, face count) for the CLI.
    """
    # 1. Check inputs
    spec = check_export_inputs(format, resolution, threshold, texture_size, max_faces)
    check_up(up)

    # 2. Surface
    mesh = extract_mesh(
        field, resolution=resolution, threshold=threshold, chunk=chunk, max_faces=max_faces, occupancy=occupancy,
        keep_inner=keep_inner,
    )
    if log is not None:
        how = "auto" if threshold == "auto" else "given"
        log(
            f"surface at density {mesh.metadata['threshold']:.4g} ({how}): {len(mesh.faces)} faces, "
            f"{len(mesh.vertices)} vertices (lattice {mesh.metadata['resolution']}^3)"
        )
        if not keep_inner:
            log(f"outer surface only: {mesh.metadata['closed_points']} lattice points closed (pinholes, thin "
                f"tunnels), {mesh.metadata['cavity_points']} filled (cavities); --keep-inner for the raw surface")

    # 3. Colours
    albedo_fn = albedo_fn_from_field(field, chunk)
    if spec.needs_texture:
        mesh = bake_texture(mesh, albedo_fn, texture_size)
    else:
        mesh = vertex_colors_from_albedo(mesh, albedo_fn)

    # 4. Files
    return write_mesh(mesh, Path(out_dir) / f"{name}.{format}", format, up=up)


def export_run(
    run_dir: Path | str,
    *,
    format: str = "glb",
    resolution: int = 256,
    threshold: Threshold = "auto",
    texture_size: int = 1024,
    checkpoint: Path | str | None = None,
    max_faces: int | None = DEFAULT_MAX_FACES,
    device: torch.device | str = "cpu",
    keep_inner: bool = False,
    up: str = "y",
    log: Callable[[str], None] | None = None,
) -> list[Path]:
    """``nfsd-nerf export``: load a run's checkpoint (latest by default) and write ``RUN_DIR/export/mesh.<format>``.

    The inputs are checked before the checkpoint is read."""
    from ..checkpoint import load_run

    check_export_inputs(format, resolution, threshold, texture_size, max_faces)
    check_up(up)
    run = load_run(Path(run_dir), None if checkpoint is None else Path(checkpoint), device=device)
    return export_field(
        run.field,
        Path(run_dir) / "export",
        format=format,
        resolution=resolution,
        threshold=threshold,
        texture_size=texture_size,
        max_faces=max_faces,
        occupancy=run.occupancy,
        keep_inner=keep_inner,
        up=up,
        log=log,
    )
