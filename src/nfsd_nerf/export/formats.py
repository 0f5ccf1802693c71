"""Mesh file formats: the table :data:`FORMATS`, its writers, and :func:`write_mesh`.

Every format is one :class:`MeshFormat` entry: a one-line description (the CLI's ``--format``
help is built from it), whether it carries a baked texture or vertex colours, the files it
writes, and a writer that turns a coloured mesh into those files' bytes. :func:`write_mesh` and
``export_field`` look formats up here and nowhere else; the unknown-format error lists the keys.

Axes. The world is +Z up and the object's front faces +X (``cameras.py``). Every format is written
in one frame, chosen by ``up`` (``nfsd-nerf export --up``), so files imported together line up:

* ``"y"`` (default): glTF's convention, +Y up with the front facing +Z (glTF 2.0 spec, "Coordinate
  System and Units"), which Blender's OBJ and PLY importers can also be told to assume; the
  rotation :data:`WORLD_TO_Y_UP`, ``(x, y, z) -> (y, z, x)``.
* ``"z"``: Blender's own convention, +Z up with the front facing -Y (what Blender's glTF importer
  turns a glTF "front +Z" into); the rotation :data:`WORLD_TO_Z_UP`, ``(x, y, z) -> (y, -x, z)``.

Both are proper rotations (det +1), applied to vertices and normals by :func:`_transformed`.

Adding an export format: write one function ``_write_<name>(mesh, stem, center, rotation) ->
{file name: bytes}`` that centres and rotates the mesh with :func:`_transformed` and encodes it in
memory, then add one entry to :data:`FORMATS`: its description, whether it needs a texture, the
file names it writes and the writer. The CLI, ``export_field`` and the contract test in
``tests/test_export_formats.py`` (every format, both ``up`` choices) pick it up from the table;
nothing else changes.

This module imports only numpy at import time (the CLI builds its help from the table); trimesh
is imported inside the writers.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from ..errors import UserError
from ..files import write_files_atomically

if TYPE_CHECKING:
    import trimesh

WORLD_TO_Y_UP = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
"""Rotation (det +1) taking world (x, y, z), +Z up / front +X, to glTF's (y, z, x), +Y up / front +Z."""
WORLD_TO_Z_UP = np.array([[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
"""Rotation (det +1) taking world (x, y, z), +Z up / front +X, to Blender's (y, -x, z), +Z up / front -Y."""
UP_AXES: dict[str, np.ndarray] = {"y": WORLD_TO_Y_UP, "z": WORLD_TO_Z_UP}
"""``--up`` choices -> the rotation from world axes to the files' (see the module docstring)."""


def check_up(up: str) -> np.ndarray:
    """The rotation of an ``--up`` choice; :class:`UserError` naming the choices otherwise."""
    if up not in UP_AXES:
        raise UserError(f"--up {up!r}: expected one of {', '.join(UP_AXES)} (y: glTF, Y up; z: Blender, Z up)")
    return UP_AXES[up]


@dataclass(frozen=True)
class MeshFormat:
    """One mesh file format: an entry of :data:`FORMATS`."""

    description: str
    """One line, shown in ``nfsd-nerf export --help``."""
    needs_texture: bool
    """True: the mesh gets a baked texture (``bake_texture``) before writing; False: vertex colours."""
    files: Callable[[str], list[str]]
    """stem -> names of the files written, in the order they land."""
    write: Callable[["trimesh.Trimesh", str, bool, np.ndarray], dict[str, bytes]]
    """(mesh in world units, +Z up; stem; centre it on its bounding box?; rotation [3, 3] from world
    axes to the file's) -> {name: bytes} for the names of ``files(stem)``, in the order they must
    land (a file that names others comes last). Writes nothing itself: :func:`write_mesh` does,
    atomically."""


# --------------------------------------------------------------------------- writers


def _transformed(mesh: "trimesh.Trimesh", rotation: np.ndarray, center: bool) -> "trimesh.Trimesh":
    """A copy with vertices (optionally centred on the bounding-box centre) and normals rotated."""
    import trimesh

    vertices = np.asarray(mesh.vertices, dtype=np.float64)
    if center:
        vertices = vertices - 0.5 * (vertices.min(axis=0) + vertices.max(axis=0))
    out = trimesh.Trimesh(
        vertices @ rotation.T,
        mesh.faces,
        vertex_normals=np.asarray(mesh.vertex_normals) @ rotation.T,
        visual=mesh.visual.copy(),
        process=False,
    )
    out.metadata.update(mesh.metadata)
    return out


def _texture_image(mesh: "trimesh.Trimesh", name: str):
    """The baked texture (a PIL image) of ``mesh``; ValueError if it has none."""
    material = getattr(mesh.visual, "material", None)
    image = getattr(material, "baseColorTexture", None) or getattr(material, "image", None)
    if getattr(mesh.visual, "kind", None) != "texture" or image is None:
        raise ValueError(f"{name.upper()} export needs a textured mesh: call bake_texture first")
    return image


def _write_glb(mesh: "trimesh.Trimesh", stem: str, center: bool, rotation: np.ndarray) -> dict[str, bytes]:
    """Binary glTF 2.0, texture embedded as PNG, normals included."""
    import trimesh
    from trimesh.exchange.gltf import export_glb

    scene = trimesh.Scene()
    scene.add_geometry(_transformed(mesh, rotation, center), geom_name=stem, node_name=stem)
    return {f"{stem}.glb": export_glb(scene, include_normals=True)}


def _write_obj(mesh: "trimesh.Trimesh", stem: str, center: bool, rotation: np.ndarray) -> dict[str, bytes]:
    """OBJ text + MTL (white diffuse, no specular, so viewers show the texture as baked) + PNG.
    The PNG and MTL land before the OBJ that names them."""
    from trimesh.exchange.obj import export_obj

    mesh = _transformed(mesh, rotation, center)
    image = _texture_image(mesh, "obj")
    text, _ = export_obj(
        mesh, include_normals=True, include_color=False, include_texture=True, return_texture=True,
        mtl_name=f"{stem}.mtl",
    )
    text = text.replace("usemtl albedo", f"usemtl {stem}")
    mtl = (
        f"newmtl {stem}\nKa 0 0 0\nKd 1 1 1\nKs 0 0 0\nNs 1\nillum 1\nd 1\nmap_Kd {stem}.png\n"
    )
    png = io.BytesIO()
    image.convert("RGB").save(png, format="PNG")
    return {f"{stem}.png": png.getvalue(), f"{stem}.mtl": mtl.encode(), f"{stem}.obj": text.encode()}


def _write_ply(mesh: "trimesh.Trimesh", stem: str, center: bool, rotation: np.ndarray) -> dict[str, bytes]:
    """Binary PLY with vertex colours and normals."""
    from trimesh.exchange.ply import export_ply

    return {f"{stem}.ply": export_ply(_transformed(mesh, rotation, center), encoding="binary", vertex_normal=True)}


# --------------------------------------------------------------------------- the table


FORMATS: dict[str, MeshFormat] = {
    "glb": MeshFormat(
        "binary glTF with embedded texture", needs_texture=True,
        files=lambda stem: [f"{stem}.glb"], write=_write_glb,
    ),
    "obj": MeshFormat(
        "OBJ + MTL + PNG texture", needs_texture=True,
        files=lambda stem: [f"{stem}.png", f"{stem}.mtl", f"{stem}.obj"],
        write=_write_obj,
    ),
    "ply": MeshFormat(
        "binary PLY with vertex colours", needs_texture=False,
        files=lambda stem: [f"{stem}.ply"], write=_write_ply,
    ),
}
"""Export formats by name (the ``--format`` value and the main file's suffix)."""


def formats_help() -> str:
    """``"glb: binary glTF with embedded texture; obj: ...; ply: ..."`` for the command line."""
    return "; ".join(f"{name}: {spec.description}" for name, spec in FORMATS.items())


def textured_formats() -> list[str]:
    """Names of the formats that carry a baked texture (``--texture-size`` applies to them)."""
    return [name for name, spec in FORMATS.items() if spec.needs_texture]


def mesh_format(name: str) -> MeshFormat:
    """The table entry of ``name``; :class:`UserError` naming the known formats otherwise."""
    if name not in FORMATS:
        raise UserError(f"unknown mesh format {name!r} (choose from {', '.join(FORMATS)})")
    return FORMATS[name]


def write_mesh(
    mesh: "trimesh.Trimesh", path: Path | str, format: str | None = None, *, center: bool = True, up: str = "y"
) -> list[Path]:
    """Write ``mesh`` (world units, +Z up, coloured as its format needs) to ``path``; returns the files written.

    ``format`` (a key of :data:`FORMATS`) defaults to the suffix; the files are the entry's
    ``files(stem)`` beside ``path``, in the frame ``up`` picks (``"y"``: glTF's, ``"z"``: Blender's;
module docstring), the same for every format. The mesh is centred
    on its bounding box first unless ``center=False``. Normals are always written.

    Atomic: every file is written in full under a temporary name before any is renamed into
    place (``files.write_files_atomically``, in the writer's order), so a failure leaves no
    partial file and an earlier export stays until the new one is whole. Unwritable
    destinations raise :class:`UserError`.
    """
    path = Path(path)
    name = (format or path.suffix.lstrip(".")).lower()
    spec = mesh_format(name)
    rotation = check_up(up)
    path = path.with_suffix(f".{name}")

    # 1. Bytes, in memory (a failure here writes nothing)
    if spec.needs_texture:
        _texture_image(mesh, name)
    files = spec.write(mesh, path.stem, center, rotation)
    if list(files) != spec.files(path.stem):
        raise ValueError(f"the {name} writer returned {list(files)}, its table entry says {spec.files(path.stem)}")

    # 2. Temporary files beside the targets, then renamed into place
    return write_files_atomically(path.parent, files)
