"""Where the turntable's cameras stand: at the distance at which the object fills most of the frame.

A fixed distance leaves a small object a speck and crops a large one; the object's extent comes from
the density at the export's own threshold (what the surface is), not from the occupancy grid.
"""

from __future__ import annotations

import math

import numpy as np

from ..cameras import TURNTABLE_ORBIT, Cameras
from ..errors import UserError
from ..runtime import module_device


FRAME_FILL = 0.75
"""Fraction of the frame height the object's occupied cells span at the tallest turntable view (the
object itself is up to a cell smaller), inside the 50-85% we aim for."""


def cell_corners(cells: np.ndarray, lo: float, size: float) -> np.ndarray:
    """Corners of the hull of cubic cells (int [N, 3] indices, cell i spans lo + [i, i + 1] size) ->
    [M, 3] world points: the convex hull's vertices, so framing costs the same for any object."""
    from scipy.spatial import ConvexHull

    offsets = np.array([[x, y, z] for x in (0, 1) for y in (0, 1) for z in (0, 1)])
    points = (lo + (cells[:, None, :] + offsets[None]) * size).reshape(-1, 3)
    points = np.unique(points, axis=0)
    try:
        return points[ConvexHull(points).vertices]
    except Exception:  # degenerate (flat) sets: every point
        return points


def framing_distance(points: np.ndarray, fovy_deg: float, elevation_deg: float,
                     fill: float = FRAME_FILL, azimuths: int = 72) -> float:
    """Camera distance at which ``points`` [N, 3] (an object's hull) span ``fill`` of the frame height
    at the tallest view of a turntable (cameras on a circle at ``elevation_deg``, looking at the
    origin, Z up).

    Why: a fixed distance leaves a small object a speck and crops a large one. Bisection on the
    distance (the projected height shrinks as the camera recedes); never closer than 1.05 times
    the farthest point, so the camera stays outside the object.
    """
    e = math.radians(elevation_deg)
    a = np.linspace(0.0, 2 * math.pi, azimuths, endpoint=False)
    dirs = np.stack([math.cos(e) * np.cos(a), math.cos(e) * np.sin(a), np.full_like(a, math.sin(e))], -1)  # [A, 3]
    forward = -dirs
    right = np.cross(forward, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right, axis=-1, keepdims=True)
    up = np.cross(right, forward)
    half = math.tan(math.radians(fovy_deg) / 2)

    def height(d: float) -> float:
        v = points[None] - d * dirs[:, None]  # [A, N, 3] from each camera
        y = np.einsum("acd,ad->ac", v, up) / np.einsum("acd,ad->ac", v, forward)
        return float((y.max(axis=1) - y.min(axis=1)).max() / (2 * half))

    near = 1.05 * float(np.linalg.norm(points, axis=-1).max())
    if height(near) <= fill:
        return near
    far = near
    while height(far) > fill:
        far *= 2
    for _ in range(50):
        mid = 0.5 * (near + far)
        near, far = (mid, far) if height(mid) > fill else (near, mid)
    return far


def object_points(field, occupancy=None, resolution: int = 64) -> np.ndarray | None:
    """Hull points of the object: cells around the lattice points at or above the export's auto
    threshold on a ``resolution``^3 density lattice (what the surface is), evaluated only in the
    occupancy grid's occupied cells when there is one; None if the field is empty.

    Not the occupied cells themselves: the grid keeps every cell whose alpha tops a low threshold,
    which on a trained run spans far more than the visible object (measured on the quick-start cube:
    framing by cells left it at 31% of the frame height).
    """
    from .extract import lattice_mask_from_occupancy, sample_density_grid, threshold_from_density_grid

    bound = float(field.bound)
    mask = None if occupancy is None else lattice_mask_from_occupancy(occupancy.binaries, bound, resolution)
    grid = sample_density_grid(field.density, bound, resolution, mask=mask, device=module_device(field))
    spacing = 2 * bound / (resolution - 1)
    try:
        level = threshold_from_density_grid(grid, spacing)
    except UserError:
        return None
    return cell_corners(np.argwhere(grid >= level), -bound - 0.5 * spacing, spacing)


def turntable_cameras(field, frames: int, elevation: float, *, occupancy=None, distance: float | None = None,
                      fovy: float | None = None) -> Cameras:
    """The turntable's cameras: TURNTABLE_ORBIT's fovy, at a distance that frames the object
    (:func:`framing_distance` of :func:`object_points`; the orbit's 2.0 for an empty field) unless
    ``distance`` / ``fovy`` are given."""
    from ..cameras import orbit_cameras

    fovy = TURNTABLE_ORBIT.fovy_deg if fovy is None else float(fovy)
    if distance is None:
        points = object_points(field, occupancy)
        distance = TURNTABLE_ORBIT.distance if points is None else framing_distance(points, fovy, float(elevation))
    return orbit_cameras(frames, distance=float(distance), fovy_deg=fovy, elevation_deg=float(elevation),
                         start_azimuth_deg=TURNTABLE_ORBIT.start_azimuth_deg)
