"""One training step with a stub guidance: named losses, skipped steps, schedules applied."""

import math

import pytest
import torch

from nfsd_nerf.checkpoint import read_checkpoint
from nfsd_nerf.config import Config, merge
from nfsd_nerf.train.step import Trainer, sample_views

SMALL = {
    "field": {"n_levels": 2, "log2_hashmap_size": 8, "hidden_dim": 8},
    "render": {"size": 8, "n_samples": 16, "occupancy_resolution": 8, "occupancy_update_every": 2,
               "ambient_only_steps": 0},
}


class StubDistill:
    """loss = mean of the image (or NaN on demand); records what each step asked."""

    def __init__(self, nan_steps=()):
        self.calls, self.nan_steps = [], set(nan_steps)

    def loss(self, image, prompts, cameras, progress, generator, step=None):
        self.calls.append({"shape": tuple(image.shape), "prompts": prompts, "progress": progress})
        loss = image.mean() * (float("nan") if len(self.calls) - 1 in self.nan_steps else 1.0)
        return loss, {"t": [500] * image.shape[0], "grad_norm": torch.tensor(0.25)}


def trainer(tmp_path, distill=None, **sections):
    cfg = merge(merge(Config(prompt="a red cube"), SMALL), sections)
    return Trainer(cfg, tmp_path, torch.device("cpu"), prior=None, distill=distill or StubDistill())


def test_a_step_reports_named_losses_that_sum_to_the_total(tmp_path):
    t = trainer(tmp_path, loss={"sparsity": 2.0, "orientation_start": 5.0})
    result = t.train_step()
    assert set(result.terms) == {"guidance", "orientation", "sparsity"}
    assert result.loss == pytest.approx(sum(result.terms.values()), rel=1e-5)
    assert result.grad_norm == 0.25 and result.t == [500] and not result.skipped
    assert result.param_grad_norm > 0 and t.step == 1
    call = t.distill.calls[0]
    assert call["shape"] == (1, 3, 8, 8) and call["progress"] == 0.0
    assert call["prompts"][0].startswith("a red cube, ") and call["prompts"][0].endswith(" view")


def test_terms_follow_the_config(tmp_path):
    t = trainer(tmp_path, loss={"sparsity": 0.0, "orientation_start": 0.0, "orientation_end": 0.0},
                guidance={"view_dependent_prompts": False})
    result = t.train_step()
    assert set(result.terms) == {"guidance"} and t.distill.calls[0]["prompts"] == ["a red cube"]


def test_a_non_finite_step_changes_no_parameter(tmp_path):
    t = trainer(tmp_path, StubDistill(nan_steps={1}))
    t.train_step()
    before = [p.detach().clone() for p in t.scene.field.parameters()]
    result = t.train_step()
    assert result.skipped and math.isnan(result.loss)
    assert t.skipped_total == 1 and t.consecutive_skips == 1
    assert all(torch.equal(a, b) for a, b in zip(before, t.scene.field.parameters()))
    assert not t.train_step().skipped and t.consecutive_skips == 0


def test_occupancy_refreshes_on_schedule_and_levels_grow(tmp_path):
    t = trainer(tmp_path, train={"start_levels": 1, "level_growth_start": 0, "level_growth_every": 1})
    occs = t.scene.occupancy.occs.clone()
    t.train_step()  # step 0: not due (every 2)
    assert torch.equal(t.scene.occupancy.occs, occs) and t.scene.field.encoding.active_levels == 1
    t.train_step()  # step 1: due
    assert not torch.equal(t.scene.occupancy.occs, occs) and t.scene.field.encoding.active_levels == 2


def test_views_are_drawn_from_the_generator_in_a_fixed_order():
    cfg = merge(merge(Config(prompt="x"), SMALL), {"background": {"random_solid_prob": 1.0}, "render": {"batch_size": 2}})
    a = sample_views(5, cfg, torch.Generator().manual_seed(1), torch.device("cpu"))
    b = sample_views(5, cfg, torch.Generator().manual_seed(1), torch.device("cpu"))
    assert torch.equal(a.rays_o, b.rays_o) and a.shading == b.shading and torch.equal(a.background_rgb, b.background_rgb)
    assert a.rays_o.shape == (2 * 8 * 8, 3) and a.lights.shape == a.rays_o.shape
    assert a.background_rgb.shape == (2 * 8 * 8, 3) and len(a.cameras) == 2


class OverflowingScaler:
    """A prior's gradient scaler whose backward 'overflows' on chosen steps."""

    def __init__(self, overflow_steps):
        from nfsd_nerf.guidance.loss_scale import GradientScaler

        self.inner, self.overflow_steps, self.step = GradientScaler(init_scale=2.0**16), set(overflow_steps), 0
        self.scale = self.inner.scale

    @property
    def found_inf(self):
        return torch.tensor(self.step in self.overflow_steps)

    def update(self, overflowed):
        self.inner.update(overflowed)
        self.scale, self.step = self.inner.scale, self.step + 1

    def state(self):
        return self.inner.state()

    def load_state(self, meta):
        self.inner.load_state(meta)


class ScaledPrior:
    def __init__(self, overflow_steps):
        self.grad_scaler = OverflowingScaler(overflow_steps)


def test_encoder_overflows_are_skipped_counted_apart_and_never_stop_training(tmp_path):
    cfg = merge(merge(Config(prompt="a red cube"), SMALL), {})
    t = Trainer(cfg, tmp_path, torch.device("cpu"), prior=ScaledPrior(range(1, 26)), distill=StubDistill())
    t.train_step()  # clean
    before = [p.detach().clone() for p in t.scene.field.parameters()]
    results = [t.train_step() for _ in range(25)]  # 25 overflows in a row: more than the stop limit (20)
    assert all(r.skipped and r.encoder_overflow for r in results)
    assert t.overflow_total == 25 and t.skipped_total == 0 and t.consecutive_skips == 0
    assert all(torch.equal(a, b) for a, b in zip(before, t.scene.field.parameters()))
    assert t.grad_scaler.scale == 1.0  # halved 25 times from 2^16, floored at 1
    assert not t.train_step().skipped
    (tmp_path / "checkpoints").mkdir()
    meta = read_checkpoint(t.save("s.safetensors")).meta
    assert meta["encoder_overflow_steps"] == "25" and float(meta["loss_scale"]) == 1.0
