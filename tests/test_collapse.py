"""The collapse watch (embedding std and effective rank) and a method's parameter groups, as the trainer runs
them: the warning with the method's advice, the fixed learning rate of a group, the weight-decay schedule."""

from __future__ import annotations

import csv
import logging
import math
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from contrastive import api
from contrastive.configure import resolve_config
from contrastive.methods.base import Batch, Method, MethodSpec, StepOutput
from contrastive.modalities import modality_of
from contrastive.optim.schedules import cosine
from contrastive.registry import register
from contrastive.training.collapse import collapse_stats, collapsed


def test_a_constant_embedding_has_zero_std_and_rank_one():
    z = torch.tensor([[3.0, 4.0, 0.0]]).repeat(64, 1)
    stats = collapse_stats(z)
    assert stats["embed_std"].item() == pytest.approx(0.0, abs=1e-6)
    assert stats["embed_rank"].item() == pytest.approx(1.0, abs=1e-4)
    assert "collapsing to a constant" in collapsed(stats["embed_std"].item(), stats["embed_rank"].item(), 3)


def test_k_orthogonal_directions_used_equally_have_rank_k():
    """Rows cycling through k = 4 of 8 unit axes, each equally often: k equal singular values, rank exactly k;
    the per-dimension std of the used dimensions is that of a 1-in-4 indicator (sqrt(3)/4, unbiased)."""
    z = torch.eye(8)[torch.arange(400) % 4]
    stats = collapse_stats(z)
    assert stats["embed_rank"].item() == pytest.approx(4.0, rel=1e-5)
    indicator_std = math.sqrt(0.25 * 0.75 * 400 / 399)
    assert stats["embed_std"].item() == pytest.approx(4 * indicator_std / 8, rel=1e-5)
    assert collapsed(stats["embed_std"].item(), stats["embed_rank"].item(), 8) is None


def test_isotropic_embeddings_have_std_one_over_sqrt_d_and_nearly_full_rank():
    z = torch.randn(20000, 16, generator=torch.Generator().manual_seed(0))
    stats = collapse_stats(z)
    assert stats["embed_std"].item() * 4 == pytest.approx(1.0, abs=0.01)  # 1/sqrt(16)
    assert stats["embed_rank"].item() > 15.9


def test_one_direction_with_noise_is_a_dimensional_collapse():
    g = torch.Generator().manual_seed(0)
    sign = torch.randint(0, 2, (500, 1), generator=g) * 2.0 - 1  # +-e1: spread along one axis
    z = sign * torch.tensor([1.0] + [0.0] * 15) + 0.001 * torch.randn(500, 16, generator=g)
    std, rank = (v.item() for v in collapse_stats(z).values())
    assert std * 4 > 0.2 and rank < 1.5  # not a point, but one direction
    assert "onto one direction" in collapsed(std, rank, 16)


# --------------------------------------------------------------------------------------------------------


@dataclass
class _CollapsingConfig:
    pass


class Collapsing(Method):
    """A backbone, a 'predictor' at a fixed learning rate, and an embedding that is the same for every image."""

    collapse_advice = "this is the advice"

    def __init__(self, ctx, cfg):
        super().__init__()
        self.backbone, self.feature_dim = ctx.build_backbone()
        self.predictor = nn.Linear(self.feature_dim, 4)

    def param_groups(self):
        return [{"name": "body", "params": self.backbone.parameters()},
                {"name": "predictor", "params": self.predictor.parameters(), "fixed_lr": True}]

    def forward(self, batch: Batch, *, step) -> StepOutput:
        p = self.predictor(self.backbone(batch.views[0]))
        constant = torch.ones(p.shape[0], 4, device=p.device)
        return StepOutput(loss=p.pow(2).mean(), embedding=constant)


register("methods", "collapsing-test")(MethodSpec(_CollapsingConfig, Collapsing))


def test_the_trainer_logs_the_watch_warns_once_and_schedules_each_group(tmp_path, caplog):
    cfg = resolve_config(tree={"data": {"name": "digits"}, "method": {"name": "collapsing-test"}}, overrides=[
        "data.image_size=16", "train.batch_size=256", "train.epochs=3", "train.progress=false", "eval.enabled=false",
        "train.memory_check=false", "train.log_every=1", "optim.name=sgd", "optim.lr=0.1", "optim.lr_scaling=none",
        "optim.warmup_epochs=0", "optim.weight_decay=0.04", "optim.weight_decay_end=0.4", "views.n_views=1",
        f"train.output={tmp_path}"])
    from contrastive.modalities import load_splits
    from contrastive.training.trainer import Trainer

    data = load_splits(cfg.data).pretrain
    trainer = Trainer(cfg, api.build_method(cfg, modality_of(data).context(cfg, data)), data, tmp_path)
    with caplog.at_level(logging.WARNING, logger="contrastive.train"):
        trainer.fit()
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    total = trainer.total_steps
    assert len(rows) == total == 15  # 1437 // 256 = 5 steps an epoch
    for row in rows:
        s = int(row["step"]) - 1  # the row of step s is written after it
        assert float(row["embed_std"]) == 0.0 and float(row["embed_rank"]) == pytest.approx(1.0, abs=1e-4)
        assert float(row["weight_decay"]) == pytest.approx(cosine(s, total, 0.04, 0.4))
        assert float(row["lr"]) == pytest.approx(cosine(s, total, 0.1, 0.0))
    warnings = [r.getMessage() for r in caplog.records if "collapse watch" in r.getMessage()]
    assert len(warnings) == 1 and "epoch 1" in warnings[0] and "this is the advice" in warnings[0]
    # after the last step the body's groups follow the schedule's end, the predictor's stay at the peak
    lrs = {(g["name"], g["decay"]): g["lr"] for g in trainer.optimizer.param_groups}
    assert lrs[("predictor", True)] == lrs[("predictor", False)] == pytest.approx(0.1)
    assert lrs[("body", True)] == pytest.approx(cosine(total - 1, total, 0.1, 0.0))
