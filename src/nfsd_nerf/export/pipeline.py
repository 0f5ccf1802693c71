"""``nfsd-nerf export`` in one call: a field (or a run folder) -> coloured mesh files.

The stages live in their own modules; :func:`export_field` runs them top to bottom:

1. check every input (:func:`check_export_inputs`), so a bad one fails before any work;
2. :func:`~.extract.extract_mesh`: the surface, in world units;
3. colours from the albedo field (:mod:`.texture`): a baked texture when the format's table
   entry ``needs_texture``, else vertex colours;
4. :func:`~.formats.write_mesh`: centred, in the format's axes, written atomically;
5. with ``measure_prompt`` (``export_run`` passes a built-in run's prompt): the mesh figures
   against the true object (:mod:`.measure`) to ``metrics.json`` next to the mesh.
"""

from __future__ import annotations

import json
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
    measure_prompt: str | None = None,
) -> list[Path]:
    """Extract, colour and write the field's mesh as ``out_dir/<name>.<format>`` (and the other
    files of the format's ``files(name)``, e.g. OBJ's .mtl and .png).

    Returns the paths written. Every bad input raises :class:`~nfsd_nerf.errors.UserError` before
    anything is written. ``keep_inner``: the raw level set (inner shells, cavities and pinholes
    kept) instead of the outer surface. ``up``: the files' axes, ``"y"`` (glTF) or ``"z"`` (Blender),
    see :mod:`.formats`. ``log`` receives one-line progress notes (threshold, face count) for the CLI.
    ``measure_prompt``: a built-in prompt ("a red cube"); the mesh is measured against its true
    object and ``metrics.json`` written too (nothing for a prompt that names no built-in object).
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
        coloured = bake_texture(mesh, albedo_fn, texture_size)
    else:
        coloured = vertex_colors_from_albedo(mesh, albedo_fn)

    # 4. Files
    paths = write_mesh(coloured, Path(out_dir) / f"{name}.{format}", format, up=up)

    # 5. Mesh figures against the true object
    if measure_prompt is not None:
        paths += write_mesh_metrics(mesh, coloured, measure_prompt, Path(out_dir) / "metrics.json", log)
    return paths


def write_mesh_metrics(mesh, coloured, prompt: str, path: Path, log: Callable[[str], None] | None = None) -> list[Path]:
    """Measure ``mesh`` (world units, as extracted) and the colours of ``coloured`` (its faces,
    coloured) against ``prompt``'s built-in object and write the figures as JSON -> [path], or []
    when the prompt names no built-in object."""
    from ..files import atomic_write_bytes
    from .measure import measure_for_prompt

    figures = measure_for_prompt(mesh, prompt, coloured=coloured)
    if figures is None:
        return []
    figures.update(threshold=mesh.metadata.get("threshold"), resolution=mesh.metadata.get("resolution"),
                   faces=len(mesh.faces))
    atomic_write_bytes(path, (json.dumps(figures, indent=2) + "\n").encode())
    if log is not None:
        colour = figures.get("colour_mean")
        log(f"against the true {figures['shape']}: {figures['pieces']} piece(s), Euler number {figures['euler']}, "
            f"volume {figures['volume_error']:+.1%}, surface distance {figures['surface_distance_median']:.4f}, "
            f"normal error {figures['normal_error_median_deg']:.1f} deg"
            + ("" if colour is None else f", mean colour ({colour[0]:.2f}, {colour[1]:.2f}, {colour[2]:.2f})"))
    return [path]


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
    """``nfsd-nerf export``: load a run's checkpoint (latest by default) and write ``RUN_DIR/export/mesh.<format>``
    (and, for a built-in run, ``metrics.json``: the mesh against the true object).

    The inputs are checked before the checkpoint is read."""
    from ..checkpoint import load_run
    from ..files import writing_folder

    check_export_inputs(format, resolution, threshold, texture_size, max_faces)
    check_up(up)
    run = load_run(Path(run_dir), None if checkpoint is None else Path(checkpoint), device=device)
    builtin = run.config.guidance.model == "builtin"
    with writing_folder(Path(run_dir) / "export", "a mesh") as out_dir:
        return export_field(
            run.field,
            out_dir,
            format=format,
            resolution=resolution,
            threshold=threshold,
            texture_size=texture_size,
            max_faces=max_faces,
            occupancy=run.occupancy,
            keep_inner=keep_inner,
            up=up,
            log=log,
            measure_prompt=run.config.prompt if builtin else None,
        )
