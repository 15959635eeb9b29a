"""View groups: multi-crop sizes and counts, per-group recipes, global views first, a method's paper groups as
defaults, clear errors, evaluation at the global size, and the memory check over every view."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from contrastive import api
from contrastive.config import ViewConfig
from contrastive.configure import resolve_config
from contrastive.errors import ConfigError
from contrastive.methods.base import Batch, Method, MethodSpec, StepOutput
from contrastive.modalities import modality_of
from contrastive.modalities.image import IMAGE
from contrastive.modalities.image.views import PILViews, TensorViews, view_groups, view_shapes
from contrastive.registry import register
from contrastive.training.checkpoint import load_checkpoint

MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
MULTI = [{"count": 2, "crop_scale": [0.4, 1.0]},
         {"count": 6, "size": 8, "crop_scale": [0.05, 0.4], "global": False}]


def _images(b=5, side=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, side, side), dtype=torch.uint8, generator=g)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def test_multi_crop_views_have_the_sizes_and_count_asked_for_and_repeat_under_a_seed():
    views = TensorViews(ViewConfig(groups=MULTI, size=24), MEAN, STD, channels=3, in_size=16)
    x = _images()
    a, b, c = views(x, _gen(3)), views(x, _gen(3)), views(x, _gen(4))
    assert [tuple(v.shape) for v in a] == [(5, 3, 24, 24)] * 2 + [(5, 3, 8, 8)] * 6
    assert views.n_global == 2 and views.size == 24
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not any(torch.equal(u, v) for u, v in zip(a, c))


def test_global_groups_come_first_whatever_their_order():
    groups = view_groups(ViewConfig(groups=list(reversed(MULTI))), in_size=16)
    assert [(g.count, g.is_global, g.view.size) for g in groups] == [(2, True, None), (6, False, 8)]
    assert view_shapes(groups, 16) == ([16, 16] + [8] * 6, 2)


def test_each_group_is_made_with_its_own_recipe_from_one_stream():
    """Two groups of one view each equal two one-view recipes drawing in turn from the same generator: each
    group's settings (here blur and solarize, BYOL's asymmetric pair) apply to its own views only."""
    base = dict(jitter=[0.4, 0.4, 0.2, 0.1], grayscale_p=0.2)
    first, second = {"blur_p": 1.0, "solarize_p": 0.0}, {"blur_p": 0.1, "solarize_p": 0.2}
    grouped = TensorViews(ViewConfig(**base, groups=[{"count": 1, **first}, {"count": 1, **second}]), MEAN, STD, 3,
                          in_size=64)  # 64 px: a blur kernel of 7 (10% of the side)
    x, g = _images(32, side=64), _gen(7)
    v1, v2 = grouped(x, g)
    g = _gen(7)
    r1 = TensorViews(ViewConfig(**base, **first, n_views=1), MEAN, STD, 3, in_size=64)(x, g)[0]
    r2 = TensorViews(ViewConfig(**base, **second, n_views=1), MEAN, STD, 3, in_size=64)(x, g)[0]
    assert torch.equal(v1, r1) and torch.equal(v2, r2)
    # and the recipes differ: the first group blurs every image, the second does not
    plain = TensorViews(ViewConfig(**base, blur_p=0.0, solarize_p=0.0, n_views=1), MEAN, STD, 3, in_size=64)
    assert not torch.equal(v1, plain(x, _gen(7))[0])


def test_one_group_without_groups_is_the_old_recipe_bit_for_bit():
    cfg = ViewConfig(blur_p=0.5, solarize_p=0.3)
    grouped = TensorViews(dataclasses.replace(cfg, groups=[{"count": 2}]), MEAN, STD, 3, in_size=16)
    plain = TensorViews(cfg, MEAN, STD, 3, in_size=16)
    x = _images()
    assert all(torch.equal(a, b) for a, b in zip(grouped(x, _gen(1)), plain(x, _gen(1))))


def test_pil_views_follow_the_groups():
    views = PILViews(ViewConfig(groups=MULTI, size=20), MEAN, STD, channels=3, in_size=16)
    out = views(_images(1)[0])
    assert [tuple(v.shape) for v in out] == [(3, 20, 20)] * 2 + [(3, 8, 8)] * 6 and views.n_global == 2


@pytest.mark.parametrize("groups, message", [
    ([{"count": 2, "blur": 1.0}], "views.groups[0].blur: not a field of a view group"),
    ([{"count": 0}], "views.groups[0].count"),
    ([{"count": 2, "global": False}], "no group is global"),
    ([{"count": 1}, {"count": 1, "size": 8, "global": True}], "different sizes"),
    ([{"count": 1, "global": "yes"}], "views.groups[0].global: expected true or false"),
    ([{"count": 1, "blur_p": 2.0}], "views.groups[0]: views.blur_p"),
    ([], "non-empty list"),
])
def test_bad_groups_are_refused_naming_the_field(groups, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        view_groups(ViewConfig(groups=groups), in_size=16)


def test_n_views_with_groups_is_refused():
    with pytest.raises(ConfigError, match="views.n_views=3 applies only to views without groups"):
        view_groups(ViewConfig(n_views=3, groups=[{"count": 2}]), in_size=16)


# --------------------------------------------------------------------------------------------------------
# a method's paper groups, and the trainer


class GroupProbe(Method):
    """Records the shapes and n_global of the batches it sees; a trivial loss."""

    def __init__(self, ctx, cfg):
        super().__init__()
        self.backbone, self.feature_dim = ctx.build_backbone()
        self.seen: list = []

    def forward(self, batch: Batch, *, step) -> StepOutput:
        self.seen.append(([v.shape[-1] for v in batch.views], batch.n_global, len(batch.global_views)))
        loss = sum(self.backbone(v).pow(2).mean() for v in batch.views)
        return StepOutput(loss=loss)


@dataclasses.dataclass
class _NoConfig:
    pass


def _paper_groups(side):  # 2 global views at the side, 3 local ones at half of it, as DINO's in proportion
    return [{"count": 2}, {"count": 3, "size": side // 2, "crop_scale": [0.1, 0.4], "global": False}]


register("methods", "group-probe")(MethodSpec(_NoConfig, GroupProbe, view_groups=_paper_groups))

FAST = ["data.image_size=16", "train.batch_size=256", "train.epochs=1", "train.progress=false",
        "eval.enabled=false", "train.memory_check=false", "train.max_steps=2"]


def _trainer(tmp_path, *extra):
    from contrastive.modalities import load_splits
    from contrastive.training.trainer import Trainer

    cfg = resolve_config(tree={"data": {"name": "digits"}, "method": {"name": "group-probe"}},
                         overrides=FAST + [f"train.output={tmp_path}", *extra])
    data = load_splits(cfg.data).pretrain
    return Trainer(cfg, api.build_method(cfg, modality_of(data).context(cfg, data)), data, tmp_path), cfg, data


def test_the_method_groups_apply_when_the_config_names_none_and_the_batch_says_which_are_global(tmp_path):
    trainer, cfg, data = _trainer(tmp_path)
    trainer.fit()
    assert trainer.method.seen == [([16, 16, 8, 8, 8], 2, 2)] * 2
    # the config's own groups win over the method's
    trainer, cfg, data = _trainer(tmp_path / "own", 'views.groups=[{count: 3, size: 12}, {count: 1, size: 6, '
                                                    'global: false}]')
    trainer.fit()
    assert trainer.method.seen[0] == ([12, 12, 12, 6], 3, 3)
    # evaluation preprocesses to the global size, as the checkpoint records
    assert load_checkpoint(tmp_path / "own" / "checkpoint.pt")["preprocess"]["size"] == 12
    assert IMAGE.view_size(cfg, data.image_size) == 12 and trainer.context.image_size == 12


def test_the_memory_check_measures_every_view_of_every_group(tmp_path, monkeypatch):
    from contrastive.training import trainer as trainer_module

    trainer, _, _ = _trainer(tmp_path)
    seen = {}

    def record(method, trial, **kw):
        seen["trial"] = trial
        raise RuntimeError("stop")

    monkeypatch.setattr(trainer_module, "measure_step", record)
    with pytest.raises(RuntimeError, match="stop"):
        trainer.check_memory()
    views = seen["trial"].make(2, torch.Generator().manual_seed(0))
    assert [v.shape[-1] for v in views] == [16, 16, 8, 8, 8] and seen["trial"].n_global == 2


def test_a_views_field_the_method_groups_set_per_group_is_refused_when_changed():
    """BYOL's groups set blur per view (1.0 / 0.1): views.blur_p=0 would be silently ignored, so it is refused;
    left at its default, or equal to every group's value, it is fine."""
    groups = lambda side: [{"count": 1, "blur_p": 1.0}, {"count": 1, "blur_p": 0.1}]  # noqa: E731
    with pytest.raises(ConfigError, match=r"views.blur_p=0.3 would be ignored.*give views.groups"):
        view_groups(ViewConfig(blur_p=0.3), 16, groups)
    assert [g.view.blur_p for g in view_groups(ViewConfig(), 16, groups)] == [1.0, 0.1]
    same = lambda side: [{"count": 2, "blur_p": 0.3}]  # noqa: E731
    assert view_groups(ViewConfig(blur_p=0.3), 16, same)[0].view.blur_p == 0.3
    # views.size is the global side the method's groups are built from, never a conflict with their local sizes
    assert view_shapes(view_groups(ViewConfig(size=24), 16, _paper_groups), 16) == ([24, 24, 12, 12, 12], 2)
    # the config's own groups are the user's: their fields override the views section as documented
    assert view_groups(ViewConfig(blur_p=0.3, groups=[{"count": 2, "blur_p": 0.9}]), 16)[0].view.blur_p == 0.9
