"""Cameras: the random training distribution, turntable orbits and pinhole rays.

Convention (pinned by tests/test_cameras.py):

* World: right-handed, **+Z is up**; the object sits at the origin.
* Spherical camera placement: ``azimuth`` (degrees) is measured in the XY plane from +X towards
  +Y, ``elevation`` (degrees) from the XY plane towards +Z. The camera at azimuth 0, elevation 0
  sits on the +X axis and looks at the origin, i.e. it sees the object's **front**, which faces +X.
* Camera frames follow OpenGL: in camera space x points right, y up, and the camera looks down -z.
  ``c2w[:, :3, :3]`` columns are the camera's right, up and backward axes in world space.
* Pixel (row i, column j) is sampled at its centre: (j + 0.5, i + 0.5); row 0 is the top of the image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .config import CameraConfig

WORLD_UP = (0.0, 0.0, 1.0)
PerturbDistribution = Literal["uniform", "normal"]


@dataclass
class Cameras:
    """A batch of pinhole cameras; every field has leading dimension B."""

    c2w: Tensor
    """[B, 4, 4] camera-to-world transforms (OpenGL axes)."""
    fovy: Tensor
    """[B] vertical field of view, radians."""
    azimuth: Tensor
    """[B] degrees in [-180, 180): the *nominal* azimuth, before perturbation."""
    elevation: Tensor
    """[B] degrees: the nominal elevation, before perturbation."""
    distance: Tensor
    """[B] nominal distance from the origin."""
    light_positions: Tensor
    """[B, 3] world position of the point light used for Lambertian shading."""

    def __len__(self) -> int:
        return self.c2w.shape[0]

    def __getitem__(self, index) -> "Cameras":
        """Select cameras by int, slice, bool mask or index tensor; always returns a batch."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return Cameras(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    def to(self, device: torch.device | str) -> "Cameras":
        return Cameras(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    @property
    def positions(self) -> Tensor:
        """[B, 3] camera centres in world space."""
        return self.c2w[:, :3, 3]

    @property
    def device(self) -> torch.device:
        return self.c2w.device


def position_from_spherical(azimuth_deg: Tensor, elevation_deg: Tensor, distance: Tensor) -> Tensor:
    """[B] angles (degrees) and distances -> [B, 3] world positions (Z up, azimuth 0 on +X)."""
    az, el = torch.deg2rad(azimuth_deg), torch.deg2rad(elevation_deg)
    return torch.stack(
        [distance * torch.cos(el) * torch.cos(az), distance * torch.cos(el) * torch.sin(az), distance * torch.sin(el)],
        dim=-1,
    )


def look_at(eye: Tensor, target: Tensor, up: Tensor) -> Tensor:
    """[B, 3] eye, target and approximate up -> [B, 4, 4] OpenGL camera-to-world matrices."""
    backward = torch.nn.functional.normalize(eye - target, dim=-1)
    right = torch.nn.functional.normalize(torch.cross(up, backward, dim=-1), dim=-1)
    true_up = torch.cross(backward, right, dim=-1)
    c2w = torch.zeros(eye.shape[0], 4, 4, dtype=eye.dtype, device=eye.device)
    c2w[:, :3, 0], c2w[:, :3, 1], c2w[:, :3, 2], c2w[:, :3, 3] = right, true_up, backward, eye
    c2w[:, 3, 3] = 1.0
    return c2w


def _uniform(n: int, low: float, high: float, generator: torch.Generator | None) -> Tensor:
    return torch.rand(n, generator=generator) * (high - low) + low


def position_jitter(
    n: int, scale: float, distribution: PerturbDistribution, generator: torch.Generator | None
) -> Tensor:
    """[n, 3] camera-position jitter: uniform in [-scale, scale] per axis (threestudio's) or N(0, scale^2).

    ``generator``: the run's CPU generator (global RNG if None).
    """
    if distribution == "uniform":
        return (torch.rand(n, 3, generator=generator) * 2.0 - 1.0) * scale
    if distribution == "normal":
        return torch.randn(n, 3, generator=generator) * scale
    raise ValueError(f"position jitter distribution must be 'uniform' or 'normal', got {distribution!r}")


def sample_training_cameras(
    batch_size: int,
    *,
    generator: torch.Generator | None = None,
    distance_range: tuple[float, float] = (1.5, 2.0),
    fovy_range_deg: tuple[float, float] = (40.0, 70.0),
    elevation_range_deg: tuple[float, float] = (-10.0, 45.0),
    azimuth_range_deg: tuple[float, float] = (-180.0, 180.0),
    position_perturb: float = 0.1,
    position_perturb_distribution: PerturbDistribution = "normal",
    center_perturb: float = 0.2,
    up_perturb: float = 0.02,
    light_distance_range: tuple[float, float] = (0.8, 1.5),
    light_position_perturb: float = 1.0,
    device: torch.device | str = "cpu",
) -> Cameras:
    """Draw B cameras from the DreamFusion distribution (docs/design.md, section 1.3).

    Elevation is, per camera with probability 1/2 each, uniform in angle or uniform on the sphere
    (uniform in sin(elevation)); azimuth is stratified across the batch. The eye is jittered by
    :func:`position_jitter`, the target and up vector by normals. All randomness comes from
    ``generator`` on the CPU so a run is reproducible bit for bit and resumable.

    Runs pass their ``cameras`` config (:func:`sample_cameras_from_config`); the keyword defaults
    are the distribution the built-in prior's reference cameras were drawn from, so they stay fixed.
    """
    b = batch_size
    el_lo, el_hi = elevation_range_deg
    el_angle = _uniform(b, el_lo, el_hi, generator)
    sin_lo, sin_hi = math.sin(math.radians(el_lo)), math.sin(math.radians(el_hi))
    el_sphere = torch.rad2deg(torch.asin(_uniform(b, sin_lo, sin_hi, generator)))
    elevation = torch.where(torch.rand(b, generator=generator) < 0.5, el_angle, el_sphere)

    az_lo, az_hi = azimuth_range_deg
    azimuth = (torch.rand(b, generator=generator) + torch.arange(b)) / b * (az_hi - az_lo) + az_lo
    distance = _uniform(b, *distance_range, generator)
    fovy = torch.deg2rad(_uniform(b, *fovy_range_deg, generator))

    eye = position_from_spherical(azimuth, elevation, distance)
    eye = eye + position_jitter(b, position_perturb, position_perturb_distribution, generator)
    target = torch.randn(b, 3, generator=generator) * center_perturb
    up = torch.tensor(WORLD_UP).expand(b, 3) + torch.randn(b, 3, generator=generator) * up_perturb

    light_dir = torch.nn.functional.normalize(eye + torch.randn(b, 3, generator=generator) * light_position_perturb, dim=-1)
    light_positions = light_dir * _uniform(b, *light_distance_range, generator)[:, None]

    cams = Cameras(look_at(eye, target, up), fovy, azimuth, elevation, distance, light_positions)
    return cams.to(device)


def sample_cameras_from_config(
    batch_size: int, cfg: "CameraConfig", *, generator: torch.Generator, device: torch.device | str = "cpu"
) -> Cameras:
    """B training cameras from a run's ``cameras`` config section (:func:`sample_training_cameras`)."""
    return sample_training_cameras(
        batch_size,
        generator=generator,
        distance_range=cfg.distance_range,
        fovy_range_deg=cfg.fovy_range,
        elevation_range_deg=cfg.elevation_range,
        position_perturb=cfg.position_perturb,
        position_perturb_distribution=cfg.position_perturb_distribution,
        center_perturb=cfg.center_perturb,
        up_perturb=cfg.up_perturb,
        light_distance_range=cfg.light_distance_range,
        device=device,
    )


@dataclass(frozen=True)
class Orbit:
    """A circle of cameras at one distance and elevation, looking at the origin."""

    distance: float
    fovy_deg: float
    elevation_deg: float
    start_azimuth_deg: float = 0.0

    def cameras(self, n_frames: int, *, elevation_deg: float | None = None, device: torch.device | str = "cpu") -> "Cameras":
        """``n_frames`` views of this orbit (``elevation_deg`` overrides the orbit's)."""
        elevation = self.elevation_deg if elevation_deg is None else float(elevation_deg)
        return orbit_cameras(n_frames, distance=self.distance, fovy_deg=self.fovy_deg, elevation_deg=elevation,
                             start_azimuth_deg=self.start_azimuth_deg, device=device)


TURNTABLE_ORBIT = Orbit(distance=2.0, fovy_deg=70.0, elevation_deg=15.0)
"""Turntable videos: the published evaluation orbit of text-to-3D papers (threestudio ``dreamfusion-sd``)."""

EVALUATION_ORBIT = Orbit(distance=1.75, fovy_deg=55.0, elevation_deg=17.5, start_azimuth_deg=22.5)
"""Metrics against the built-in prior's true object: mid-range distance and fov, inside the training
distribution, and off the axes so that no view coincides with a reference camera of the prior."""


def orbit_cameras(
    n_frames: int,
    *,
    distance: float = TURNTABLE_ORBIT.distance,
    fovy_deg: float = TURNTABLE_ORBIT.fovy_deg,
    elevation_deg: float = TURNTABLE_ORBIT.elevation_deg,
    start_azimuth_deg: float = 0.0,
    device: torch.device | str = "cpu",
) -> Cameras:
    """A full turntable of ``n_frames`` views, counter-clockwise seen from above, light at the camera."""
    azimuth = start_azimuth_deg + torch.arange(n_frames, dtype=torch.float32) * (360.0 / n_frames)
    azimuth = torch.remainder(azimuth + 180.0, 360.0) - 180.0
    elevation = torch.full((n_frames,), float(elevation_deg))
    dist = torch.full((n_frames,), float(distance))
    eye = position_from_spherical(azimuth, elevation, dist)
    c2w = look_at(eye, torch.zeros_like(eye), torch.tensor(WORLD_UP).expand(n_frames, 3))
    fovy = torch.full((n_frames,), math.radians(fovy_deg))
    return Cameras(c2w, fovy, azimuth, elevation, dist, eye.clone()).to(device)


def generate_rays(cameras: Cameras, height: int, width: int) -> tuple[Tensor, Tensor]:
    """Pinhole rays through pixel centres.

    Returns ``rays_o`` and unit ``rays_d``, both [B, H, W, 3], in world space.
    """
    device, dtype = cameras.c2w.device, cameras.c2w.dtype
    focal = 0.5 * height / torch.tan(0.5 * cameras.fovy)  # [B], in pixels
    j = torch.arange(width, device=device, dtype=dtype) + 0.5
    i = torch.arange(height, device=device, dtype=dtype) + 0.5
    x = (j[None, None, :] - 0.5 * width) / focal[:, None, None]  # [B, 1, W]
    y = -(i[None, :, None] - 0.5 * height) / focal[:, None, None]  # [B, H, 1]
    x, y = torch.broadcast_tensors(x, y)  # [B, H, W]
    dirs_cam = torch.stack([x, y, -torch.ones_like(x)], dim=-1)  # [B, H, W, 3]
    rays_d = torch.einsum("bij,bhwj->bhwi", cameras.c2w[:, :3, :3], dirs_cam)
    rays_d = torch.nn.functional.normalize(rays_d, dim=-1)
    rays_o = cameras.c2w[:, None, None, :3, 3].expand_as(rays_d)
    return rays_o, rays_d
