"""Evaluation against the true object: the metrics by hand, a field that *is* the object, the cameras.

Every check is against an independent value: hand-computed PSNR and IoU, a field that is the
true red sphere, the built-in prior's reference cameras.
"""

from __future__ import annotations

import math

import pytest
import torch

from nfsd_nerf.errors import UserError
from nfsd_nerf.evaluate import evaluation_cameras, image_metrics
from nfsd_nerf.guidance.builtin import BuiltinPrior
from nfsd_nerf.guidance.references import camera_distance, view_features
from nfsd_nerf.guidance.shapes import COLOURS


def test_evaluation_cameras_are_not_reference_cameras():
    full = view_features(BuiltinPrior.reference_cameras(500))
    dist = camera_distance(view_features(evaluation_cameras()), full)
    assert dist.min() > 1e-3


def test_image_metrics_by_hand():
    true_rgb = torch.ones(1, 4, 4, 3)
    true_cov = torch.zeros(1, 4, 4)
    true_cov[0, 1:3, 1:3] = 1.0
    rgb, opacity = true_rgb.clone(), true_cov.clone()
    rgb[0, 0, 0] = 0.0  # one wrong pixel outside both silhouettes: full-frame MSE 1/16
    opacity[0, 1, 1] = 0.0
    opacity[0, 0, 3] = 1.0
    rgb[0, 1, 1] = 0.5  # a wrong pixel inside the union: err 0.25, union 5 pixels
    m = image_metrics(rgb, opacity, true_rgb, true_cov)
    assert m["psnr"].item() == pytest.approx(-10 * math.log10((1.0 + 0.25) / 16), abs=1e-4)
    assert m["psnr_masked"].item() == pytest.approx(-10 * math.log10(0.25 / 5), abs=1e-4)
    assert m["silhouette_iou"].item() == pytest.approx(3 / 5)


class _TrueSphere(torch.nn.Module):
    """A 'NeRF' that is the red sphere: opaque inside, the true albedo and normals (the evaluation
    lights it as the truth is lit)."""

    bound = 1.0
    normal_method = "analytic"

    def density(self, x):
        return 2000.0 * torch.sigmoid((0.5 - x.norm(dim=-1)) * 5000.0)

    def forward(self, x):
        return self.density(x), torch.tensor(COLOURS["red"]).expand(x.shape[0], 3)

    def normals(self, x):
        return torch.nn.functional.normalize(x, dim=-1)


class _White(torch.nn.Module):
    def forward(self, dirs):
        return torch.ones_like(dirs)


def test_a_field_that_is_the_true_object_scores_high_and_a_wrong_one_low():
    from nfsd_nerf.evaluate import evaluate_against_truth

    right = evaluate_against_truth(_TrueSphere(), _White(), "a red sphere", size=32, n_samples=128)
    # exact geometry and colour; only the renderer's missing antialiasing costs anything
    assert right["silhouette_iou"] > 0.97 and right["psnr"] > 24 and right["psnr_masked"] > 26
    wrong = evaluate_against_truth(_TrueSphere(), _White(), "a blue cube", size=32, n_samples=128)
    assert wrong["psnr"] < right["psnr"] - 10 and wrong["silhouette_iou"] < right["silhouette_iou"]
    with pytest.raises(UserError):
        evaluate_against_truth(_TrueSphere(), _White(), "", size=32)
