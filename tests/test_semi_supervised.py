"""Label subsets, fine-tuning from a projection-head layer, the distillation loss, classifier files, the
training loop's determinism, the report, and the narrower small_cnn."""

import math

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from contrastive import api
from contrastive.config import Config, OptimConfig
from contrastive.configure import resolve_config
from contrastive.data.labels import choose, labels_sha256, parse_spec, read_labels, resolve, write_labels
from contrastive.errors import ConfigError, DataError, NonFiniteLossError
from contrastive.losses import distillation_loss
from contrastive.methods.base import STREAM_LOADER, BuildContext, step_seed
from contrastive.modalities.image.preprocess import Preprocess
from contrastive.nn.backbones import build_backbone
from contrastive.optim.schedules import lr_at
from contrastive.registry import lookup, names
from contrastive.stages.classifier import (
    Classifier,
    encoder_from,
    head_layers,
    load_classifier,
    plain_batchnorm,
    pretrained_source,
    save_classifier,
    stage_config,
    stage_recipe,
)
from contrastive.stages.distill import DistillConfig, labelled_batch, labelled_share
from contrastive.stages.finetune import FinetuneConfig
from contrastive.stages.supervised import DeviceRows, crop_flip_views, epoch_batches, train_loop
from contrastive.trees import recipe_dir


def _labels(counts):
    """Labels with ``counts[c]`` members of class c, in a shuffled order."""
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    return labels[torch.randperm(sum(counts), generator=torch.Generator().manual_seed(1))]


# ------------------------------------------------------------------------------------------ label subsets


def test_subsets_are_class_balanced_and_repeat_under_a_seed():
    labels = _labels([500, 300, 200, 7])
    sub = choose(labels, "10%", seed=3, dataset="toy")
    picked = labels[torch.tensor(sub.indices)]
    assert sub.per_class == [50, 30, 20, 1]  # round(0.1 n), at least one image of a class
    assert [int((picked == c).sum()) for c in range(4)] == [50, 30, 20, 1]
    assert sub.indices == sorted(set(sub.indices))
    assert choose(labels, "10%", seed=3, dataset="toy").indices == sub.indices
    assert choose(labels, "10%", seed=4, dataset="toy").indices != sub.indices
    five = choose(labels, "5-per-class", seed=0, dataset="toy")
    assert [int((labels[torch.tensor(five.indices)] == c).sum()) for c in range(4)] == [5, 5, 5, 5]
    assert math.isclose(choose(labels, "1%", 0, dataset="toy").fraction, (5 + 3 + 2 + 1) / 1007)
    with pytest.raises(DataError, match="class 3 of toy has only 7 images"):
        choose(labels, "8-per-class", seed=0, dataset="toy")


@pytest.mark.parametrize("spec,match", [("ten", "neither a percentage"), ("0%", r"in \(0%, 100%\]"),
                                        ("150%", r"in \(0%, 100%\]"), ("0-per-class", "at least 1 image")])
def test_bad_label_specs_are_refused(spec, match):
    with pytest.raises(DataError, match=match):
        parse_spec(spec)


def test_labels_file_round_trip_and_refusal_for_other_data(tmp_path):
    labels = _labels([40, 40, 40])
    sub = choose(labels, "10%", seed=0, dataset="toy")
    path = write_labels(sub, tmp_path / "labels.json")
    again = resolve(str(path), labels, seed=99, dataset="toy")  # a file is reused as it is: the seed is ignored
    assert again == sub and again.fingerprint() == sub.fingerprint()
    with pytest.raises(DataError, match="made for toy \\(120 images\\), not for other \\(121 images"):
        read_labels(path, _labels([41, 40, 40]), dataset="other")
    shuffled = labels.flip(0)  # same size, same counts, another order: the indices would point elsewhere
    assert labels_sha256(shuffled) != labels_sha256(labels)
    with pytest.raises(DataError, match="made for toy"):
        read_labels(path, shuffled, dataset="toy")
    with pytest.raises(DataError, match="does not exist"):
        resolve(str(tmp_path / "missing.json"), labels, 0, dataset="toy")


# ------------------------------------------------------------------------------------------ from a head layer


def _method(name, **fields):
    cfg = Config(method={"name": name, **fields}, backbone={"name": "small_cnn", "widths": [8, 16]})
    ctx = BuildContext(input_shape=(3, 16, 16), dataset_size=64, num_classes=4, batch_size=16, world_size=1,
                       steps_per_epoch=4, epochs=1, backbone_section=dict(cfg.backbone))
    spec = lookup("methods", name)
    from contrastive.methods import method_config

    torch.manual_seed(0)
    return spec.build(ctx, method_config(cfg)), cfg, ctx


def test_fine_tuning_from_the_first_projector_layer_builds_backbone_plus_that_layer():
    method, _, _ = _method("simclr-v2", hidden_dim=24, projection_dim=8)  # 3-layer head: 16 -> 24 -> 24 -> 8
    layers = head_layers(method.projector)
    assert [[type(m).__name__ for m in layer] for layer in layers] == [
        ["Linear", "BatchNorm1d", "ReLU"], ["Linear", "BatchNorm1d", "ReLU"], ["Linear", "BatchNorm1d"]]
    enc, dim = encoder_from(method, 1)
    assert dim == 24 and len(enc) == 2 and enc[0] is method.backbone
    assert [type(m).__name__ for m in enc[1]] == ["Linear", "BatchNorm1d", "ReLU"]
    assert enc[1][0] is method.projector[0]  # the pretrained layer itself, not a fresh one
    method.eval()
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(enc(x), method.projector[2](method.projector[1](method.projector[0](method.backbone(x)))))
        whole, dim3 = encoder_from(method, 3)
        assert dim3 == 8 and torch.equal(whole(x), method.projector(method.backbone(x)))
    backbone, dim0 = encoder_from(method, 0)
    assert backbone is method.backbone and dim0 == 16
    with pytest.raises(ConfigError, match="has 3 layer\\(s\\); choose 0 \\(the encoder\\) to 3"):
        encoder_from(method, 4)
    inst, _, _ = _method("instdisc", embedding_dim=8, num_negatives=4)
    enc1, dim1 = encoder_from(inst, 1)  # Method.projection_head(): InstDisc's fc
    assert dim1 == 8 and enc1[1][0] is inst.fc
    with pytest.raises(ConfigError, match="has 1 layer"):
        encoder_from(inst, 2)

    class Headless(type(inst)):
        def projection_head(self):
            return None

    inst.__class__ = Headless
    with pytest.raises(ConfigError, match="Headless keeps no projection head"):
        encoder_from(inst, 1)


def _library_methods() -> list[str]:
    """Every method the library registers (not the ones tests register for themselves)."""
    import contrastive.methods  # noqa: F401  (fills the method registry)

    return sorted(n for n in names("methods") if lookup("methods", n).build.__module__.startswith("contrastive."))


# the first layer of each method's head as its digits (simclr-v2: CIFAR-10) recipe builds it
FIRST_LAYER = {"simclr": ["Linear", "BatchNorm1d", "ReLU"], "simclr-v2": ["Linear", "BatchNorm1d", "ReLU"],
               "moco-v1": ["Linear"], "moco-v2": ["Linear", "ReLU"], "moco-v3": ["Linear", "BatchNorm1d", "ReLU"],
               "instdisc": ["Linear"], "invaspread": ["Linear"], "swav": ["Linear", "BatchNorm1d", "ReLU"],
               "byol": ["Linear", "BatchNorm1d", "ReLU"], "simsiam": ["Linear", "BatchNorm1d", "ReLU"],
               "dino": ["Linear", "BatchNorm1d", "GELU"], "cpc": ["Linear"], "siamese": ["Linear", "BatchNorm1d", "ReLU"],
               "triplet": ["Linear", "BatchNorm1d", "ReLU"], "supcon": ["Linear", "ReLU"],
               # None: no single head over the encoder's output (CMC: one per view; CPC on sound: none; SimCSE: a
               # sentence encoder, its MLP inside encoder() where it is kept at test)
               "cmc": None, "cpc-audio": None, "simcse": None, "simcse-sup": None,
               "clip": ["Linear"]}  # W_i, into the joint image-text space


def _from_recipe(name: str):
    """``name`` built from its digits recipe (else CIFAR-10's) for 16 px images, with running statistics
    that are not the initial 0 and 1, in eval mode; and the number of channels."""
    recipe = next(p for p in (recipe_dir() / f"{name}{d}.yaml" for d in ("-digits", "-cifar10", "-spoken-digits", ""))
                  if p.is_file())
    cfg = resolve_config(recipe=recipe)
    channels = 1 if recipe.stem.endswith("digits") else 3
    ctx = BuildContext(input_shape=(channels, 16, 16), dataset_size=64, num_classes=10, batch_size=8,
                       world_size=1, steps_per_epoch=4, epochs=2, backbone_section=cfg.backbone,
                       mean=(0.5,) * channels, std=(0.25,) * channels)
    torch.manual_seed(0)
    method = api.build_method(cfg, ctx)
    for m in method.modules():
        if isinstance(m, _BatchNorm) and m.track_running_stats:
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return method.eval(), channels


def test_every_library_method_has_an_expected_first_layer():
    assert sorted(FIRST_LAYER) == _library_methods(), "add the new method's first head layer to FIRST_LAYER"


@pytest.mark.parametrize("name", _library_methods())
def test_every_method_fine_tunes_from_its_encoder_or_its_heads_first_layer(name):
    """encoder_from(method, 0) is the evaluated encoder; k = 1 is that encoder and the head's first Linear with
    the modules up to the next Linear, the pretrained modules themselves, computing what they compute by hand."""
    method, channels = _from_recipe(name)
    if FIRST_LAYER[name] is None:
        assert method.projection_head() is None
        with pytest.raises(ConfigError, match="--from-layer 0"):
            encoder_from(method, 1)
        assert encoder_from(method, 0)[1] == method.feature_dim
        return
    head = list(method.projection_head())
    assert isinstance(head[0], nn.Linear)
    end = next((i for i in range(1, len(head)) if isinstance(head[i], nn.Linear)), len(head))
    assert [type(m).__name__ for m in head[:end]] == FIRST_LAYER[name]
    x = torch.randn(5, channels, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        h = method.encoder()(x)  # by hand, before encoder_from makes any batch-norm subclass plain
        z = h
        for m in head[:end]:
            z = m(z)
    enc0, dim0 = encoder_from(method, 0)
    enc1, dim1 = encoder_from(method, 1)
    assert enc0 is method.encoder() and dim0 == method.feature_dim == h.shape[1]
    assert isinstance(enc1, nn.Sequential) and len(enc1) == 2 and enc1[0] is enc0
    assert len(enc1[1]) == end and all(a is b for a, b in zip(enc1[1], head[:end]))
    assert dim1 == head[0].out_features == z.shape[1]
    with torch.no_grad():
        assert torch.equal(enc0(x), h)
        assert torch.equal(enc1(x), z)
    # fine-tuning trains all of it, an EMA teacher's copy (DINO evaluates its teacher) included
    assert all(p.requires_grad for p in enc1.parameters())


def test_classifier_file_rebuilds_the_same_model(tmp_path):
    method, cfg, ctx = _method("simclr-v2", hidden_dim=24, projection_dim=8)
    enc, dim = encoder_from(method, 1)
    model = Classifier(enc, dim, 4)
    nn.init.normal_(model.fc.weight)
    pre = Preprocess(3, 16, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    sub = choose(_labels([8, 8, 8, 8]), "2-per-class", 0, dataset="toy")
    from dataclasses import asdict

    save_classifier(model, tmp_path / "classifier.pt", source=pretrained_source(cfg, ctx, 1), preprocess=pre,
                    classes=list("abcd"), labels=asdict(sub))
    loaded, info = load_classifier(tmp_path)  # the run folder works too
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))
    assert info["preprocess"] == pre and info["classes"] == list("abcd") and info["labels"]["indices"] == sub.indices


def test_split_batchnorm_becomes_plain_with_the_same_numbers():
    method, _, _ = _method("moco-v2", queue_size=32, bn_splits=2)
    enc = method.encoder()
    enc.eval()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        before = enc(x)
        plain = plain_batchnorm(enc)
        assert not any(type(m).__name__ == "SplitBatchNorm" for m in plain.modules())
        assert torch.equal(plain(x), before)


# ------------------------------------------------------------------------------------------ distillation loss


@pytest.mark.parametrize("temperature", [1.0, 0.1, 2.0])
def test_distillation_loss_is_the_kl_divergence_by_hand(temperature):
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(6, 5, generator=g) * 3, torch.randn(6, 5, generator=g) * 3
    total = 0.0
    for i in range(6):
        zs = [math.exp(v / temperature) for v in student[i].tolist()]
        zt = [math.exp(v / temperature) for v in teacher[i].tolist()]
        ps = [z / sum(zs) for z in zs]
        pt = [z / sum(zt) for z in zt]
        total += sum(t * math.log(t / s) for t, s in zip(pt, ps))
    expected = temperature**2 * total / 6
    assert distillation_loss(student, teacher, temperature).item() == pytest.approx(expected, rel=1e-5)
    assert distillation_loss(teacher, teacher, temperature).item() == pytest.approx(0.0, abs=1e-6)


def test_distillation_gradient_reaches_the_student_only():
    s = torch.randn(4, 3, requires_grad=True)
    t = torch.randn(4, 3, requires_grad=True)
    distillation_loss(s, t, 1.0).backward()
    # d/ds of KL(p_t || softmax(s)) averaged over the batch: (softmax(s) - p_t) / n
    assert torch.allclose(s.grad, (s.softmax(1) - t.softmax(1)).detach() / 4, atol=1e-6)
    assert t.grad is None
    assert labelled_share(4500, 45000, 256) == 26 and labelled_share(1, 45000, 256) == 1


# ------------------------------------------------------------------------------------------ training loop


def test_epoch_batches_cover_every_image_once_in_nearly_equal_batches():
    batches = epoch_batches(450, 256, seed=0, epoch=2)
    assert [len(b) for b in batches] == [225, 225]
    assert sorted(torch.cat(batches).tolist()) == list(range(450))
    assert all(torch.equal(a, b) for a, b in zip(batches, epoch_batches(450, 256, seed=0, epoch=2)))


def _tiny_run(seed):
    torch.manual_seed(0)
    enc, dim = build_backbone({"name": "small_cnn", "widths": [4, 8]}, input_shape=(3, 16, 16))
    model = Classifier(enc, dim, 3)
    images = torch.randint(0, 256, (24, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    targets = torch.arange(24) % 3
    pre = Preprocess(3, 16, (0.5,) * 3, (0.25,) * 3)
    views = crop_flip_views(pre, 16, [0.5, 1.0], 0.5)
    optim = OptimConfig(name="sgd", lr=0.5, lr_scaling="none", weight_decay=0.0, warmup_epochs=0)
    res = train_loop(model, images, lambda x, idx, step: nn.functional.cross_entropy(model(x), targets[idx]),
                     epochs=1, batch_size=8, optim=optim, views=views, seed=seed, device=torch.device("cpu"))
    return model, res


def test_training_loop_repeats_under_a_seed():
    (a, res), (b, _), (c, _) = _tiny_run(1), _tiny_run(1), _tiny_run(2)
    assert res.steps == 3
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.fc.weight, c.fc.weight)


@pytest.mark.parametrize("metrics", [False, True])
def test_a_non_finite_loss_stops_the_loop_naming_its_step(tmp_path, metrics):
    """Noted on the device at step 4 (epoch 1 of 3-step epochs), read at the next metrics row or at the end."""
    torch.manual_seed(0)
    enc, dim = build_backbone({"name": "small_cnn", "widths": [4, 8]}, input_shape=(3, 16, 16))
    model = Classifier(enc, dim, 3)
    images = torch.randint(0, 256, (24, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    targets = torch.arange(24) % 3
    steps = []

    def loss_fn(x, idx, step):
        steps.append(step)
        loss = nn.functional.cross_entropy(model(x), targets[idx])
        return loss + float("nan") if step == 4 else loss

    optim = OptimConfig(name="sgd", lr=0.5, lr_scaling="none", weight_decay=0.0, warmup_epochs=0)
    lr = lr_at(4, total_steps=9, steps_per_epoch=3, optim=optim, peak=0.5)  # the bad step's, not the last one's
    assert lr != lr_at(8 if not metrics else 5, total_steps=9, steps_per_epoch=3, optim=optim, peak=0.5)
    with pytest.raises(NonFiniteLossError, match=rf"the loss became nan at epoch 1, step 4 \(lr {lr:.4g}\); lower"):
        train_loop(model, images, loss_fn, epochs=3, batch_size=8, optim=optim, seed=0, device=torch.device("cpu"),
                   views=crop_flip_views(Preprocess(3, 16, (0.5,) * 3, (0.25,) * 3), 16, [0.5, 1.0], 0.5),
                   metrics=tmp_path / "metrics.csv" if metrics else None)
    # with a row after every step it stops at once, writing no row for the bad step; without rows, at the end
    assert steps == list(range(5 if metrics else 9))
    if metrics:
        rows = (tmp_path / "metrics.csv").read_text().splitlines()
        assert [int(r.split(",")[1]) for r in rows[1:]] == [1, 2, 3, 4]


def test_distillations_labelled_batch_is_the_seeded_draw_without_copies():
    """On the CPU the draw is the one made before the rows were kept on the device: a randperm seeded by (seed,
    step), its first ``size`` rows, their view from a second seeded stream."""
    images = torch.randint(0, 256, (30, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    labels = torch.arange(30) % 4
    views = crop_flip_views(Preprocess(3, 12, (0.5,) * 3, (0.25,) * 3), 16, [0.3, 1.0], 0.5)
    rows = DeviceRows(images, labels, device=torch.device("cpu"))
    assert rows.home == torch.device("cpu") and len(rows) == 30
    for step in (0, 7):
        x, y = labelled_batch(rows, 6, views, 3, step)
        pick = torch.randperm(30, generator=torch.Generator().manual_seed(step_seed(3, step, 0, STREAM_LOADER)))[:6]
        (expected,) = views(images[pick], torch.Generator().manual_seed(step_seed(3, step, 1, STREAM_LOADER)))
        assert torch.equal(x, expected) and torch.equal(y, labels[pick]) and x.shape == (6, 3, 12, 12)
    assert not torch.equal(labelled_batch(rows, 6, views, 3, 0)[1], labelled_batch(rows, 6, views, 3, 7)[1])


def test_crop_flip_views_have_no_colour_changes():
    pre = Preprocess(3, 8, (0.0,) * 3, (1.0,) * 3)
    views = crop_flip_views(pre, 8, [1.0, 1.0], 1.0)  # full-image crop, always flipped
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    (v,) = views(images, torch.Generator().manual_seed(0))
    assert torch.allclose(v, images.float().div(255).flip(-1), atol=1e-5)


# ------------------------------------------------------------------------------------------ recipes


@pytest.mark.parametrize("dataset", ["digits", "cifar10", "some/folder"])
def test_every_stage_recipe_validates(dataset):
    tree, path = stage_recipe(dataset, None)
    assert path.name == ("default.yaml" if dataset == "some/folder" else f"{dataset}.yaml")
    ft = stage_config(FinetuneConfig, tree, "finetune", [])
    scratch = stage_config(FinetuneConfig, tree, "scratch", ["optim.lr=0.3"], base="finetune")
    assert ft.epochs_for(0.01) == 60 and ft.epochs_for(0.1) == 30  # SimCLR v2's lengths
    assert scratch.optim.lr == 0.3 and scratch.epochs_by_fraction == ft.epochs_by_fraction
    assert stage_config(DistillConfig, tree, "distill", ["temperature=0.1"]).temperature == 0.1
    with pytest.raises(ConfigError, match="unknown config key finetune.epoch"):
        stage_config(FinetuneConfig, tree, "finetune", ["epoch=3"])


# ------------------------------------------------------------------------------------------ backbones


def test_small_cnn_widths_default_unchanged_and_narrower_student():
    net, dim = build_backbone({"name": "small_cnn"}, input_shape=(3, 32, 32))
    assert dim == 256 and [m.out_channels for m in net.modules() if isinstance(m, nn.Conv2d)] == [32, 64, 128, 256]
    small, sdim = build_backbone({"name": "small_cnn", "widths": [16, 32, 64, 128]}, input_shape=(3, 32, 32))
    assert sdim == 128 and small(torch.randn(2, 3, 32, 32)).shape == (2, 128)
    with pytest.raises(ConfigError, match="backbone.widths"):
        build_backbone({"name": "small_cnn", "widths": [16, 0]}, input_shape=(3, 32, 32))


def test_fine_tuning_on_a_single_labelled_image_is_refused_before_batch_norm_fails(tmp_path):
    from PIL import Image

    from contrastive.config import DataConfig
    from contrastive.errors import ConfigError
    from contrastive.stages.finetune import finetune

    (tmp_path / "one" / "cat").mkdir(parents=True)  # one class of 3 images: 1 held out, 1 kept by 1-per-class
    for i in range(3):
        Image.new("RGB", (16, 16), (40 * i, 0, 0)).save(tmp_path / "one" / "cat" / f"{i}.png")
    with pytest.raises(ConfigError, match=r"--labels 1-per-class keeps 1 labelled image\(s\) .* at least 2"):
        finetune(DataConfig(name=str(tmp_path / "one")), "1-per-class", tmp_path / "out",
                 scratch={"name": "small_cnn"})
