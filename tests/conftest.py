"""Shared fixtures.

``tiny_sd_path``: a random-weight Stable Diffusion pipeline with the real layout (DESIGN.md
section 7), saved with ``save_pretrained`` once per test session (~4.5 MB, well under a second
once diffusers is imported). Load it through ``nfsd_nerf.guidance.load_prior(str(path))`` exactly
as a user's folder. Its tokenizer is byte-level (about one token per character) except for the
words of the NFSD negative prompt. Latents are 4 x 8 x 8 for 64 x 64 images; the scheduler is SD's scaled-linear
1000-step epsilon schedule.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from nfsd_nerf.testing import build_tiny_sd


@pytest.fixture(scope="session")
def tiny_sd_path(tmp_path_factory) -> Path:
    """Folder of a tiny random-weight Stable Diffusion pipeline (read-only: copy it to modify it)."""
    return build_tiny_sd(tmp_path_factory.mktemp("tiny-sd"))
