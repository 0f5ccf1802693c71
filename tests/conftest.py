"""Shared fixtures.

``tiny_sd_path``: a random-weight Stable Diffusion pipeline with the real layout (docs/design.md,
section 6), saved with ``save_pretrained`` once per test session (~4.5 MB, well under a second
once diffusers is imported). Load it through ``nfsd_nerf.guidance.load_prior(str(path))`` exactly
as a user's folder. Its tokenizer is byte-level (about one token per character) except for the
words of the NFSD negative prompt. Latents are 4 x 8 x 8 for 64 x 64 images; the scheduler is SD's scaled-linear
1000-step epsilon schedule.

``tiny_prior``: that pipeline loaded on the CPU, once per test module.

``box_run``: a run folder holding a NeRF fitted to a box (the export tests' real field).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from nfsd_nerf.testing import build_tiny_sd


@pytest.fixture(scope="session")
def tiny_sd_path(tmp_path_factory) -> Path:
    """Folder of a tiny random-weight Stable Diffusion pipeline (read-only: copy it to modify it)."""
    return build_tiny_sd(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="module")
def tiny_prior(tiny_sd_path):
    """The tiny pipeline on the CPU, shared by a module's tests (embeddings cached across them)."""
    from nfsd_nerf.guidance import load_prior

    return load_prior(str(tiny_sd_path), device="cpu")


@pytest.fixture(scope="session")
def box_run(tmp_path_factory) -> Path:
    """A run folder whose checkpoint holds a hash-grid NeRF fitted to an off-centre box, made once
    per session. Tests write into its ``export/`` and ``video/`` only (copy it to write elsewhere)."""
    from export_helpers import fit_box_run

    return fit_box_run(tmp_path_factory.mktemp("runs") / "a-box")
