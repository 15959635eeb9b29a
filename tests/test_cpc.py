"""CPC on images: the masked context never sees the rows it predicts, the InfoNCE over the patch grid against a
naive loop, patch-wise augmentation, the pooled encoder, two processes against one, and the checkpoint."""

import os

import pytest
import torch
from multiprocess import run_as_torchrun
from torch.nn.parallel import DistributedDataParallel

from contrastive import api, distributed
from contrastive.configure import resolve_config
from contrastive.errors import ConfigError
from contrastive.methods.base import Batch, BuildContext, StepInfo
from contrastive.methods.cpc import CPC, CPCConfig, patchify
from contrastive.modalities import modality_of
from contrastive.nn.backbones import build_backbone
from contrastive.nn.context import RowCausalContext

N, C, S, P, STRIDE = 4, 3, 16, 8, 4  # images, channels, side, patch, stride: a 3x3 grid
STEP = StepInfo(step=5, epoch=0, total_steps=10, seed=3)


def _method(norm="layer", **cfg) -> CPC:
    torch.manual_seed(0)
    backbone, dim = build_backbone({"name": "small_cnn", "widths": [8, 16], "norm": norm}, input_shape=(C,
                                   P, P))
    cfg = {"patch_size": P, "patch_stride": STRIDE, "offsets": [1, 2], "target_dim": 6, "context_blocks": 2,
           "context_width": 8, "patch_crop": 0.75, "patch_hflip_p": 0.5, "channel_drop_p": 0.5, **cfg}
    return CPC(backbone, dim, CPCConfig(**cfg), image_size=S)


def _images(n=N, seed=1):
    return torch.randn(n, C, S, S, generator=torch.Generator().manual_seed(seed))


def _batch(x):
    return Batch(views=[x], index=torch.arange(x.shape[0]), label=torch.full((x.shape[0],), -1))


def _contexts(method: CPC, x: torch.Tensor) -> torch.Tensor:
    patches, rows, cols = patchify(x, P, STRIDE)
    return method.encode_grid(patches, x.shape[0], rows, cols)[1]  # [n, R, Q, D]


# ------------------------------------------------------------------------------------------------ masked context

def test_context_rows_depend_on_the_rows_above_only():
    torch.manual_seed(0)
    net = RowCausalContext(dim=5, width=4, blocks=3)
    z = torch.randn(2, 5, 6, 4)
    for r in range(5):
        changed = z.clone()
        changed[:, :, r + 1:] = torch.randn(2, 5, 5 - r, 4)
        assert torch.equal(net(changed)[:, :, :r + 1], net(z)[:, :, :r + 1]), r
        # the rows at and below the change do see it: the comparison above can fail
        assert not torch.allclose(net(changed)[:, :, r + 1], net(z)[:, :, r + 1]), r


def test_changing_the_pixels_below_a_row_leaves_its_context_unchanged():
    method = _method()
    x = _images()
    for r in range(2):  # patch row r covers pixels [r*stride, r*stride + patch): change everything below them
        changed = x.clone()
        changed[:, :, r * STRIDE + P:] = torch.randn(N, C, S - r * STRIDE - P, S)
        with torch.no_grad():
            before, after = _contexts(method, x), _contexts(method, changed)
        assert torch.equal(after[:, :r + 1], before[:, :r + 1]), r
        assert not torch.allclose(after[:, r + 1:], before[:, r + 1:]), r


def test_batch_norm_would_leak_the_rows_below_into_the_context():
    # why CPC v2 uses layer norm: batch statistics are shared by every patch of the batch, so in training mode
    # a patch's latent, and the context above it, depend on the patches it is asked to predict
    method = _method(norm="batch")
    x = _images()
    changed = x.clone()
    changed[:, :, P:] = torch.randn(N, C, S - P, S)
    with torch.no_grad():
        assert not torch.allclose(_contexts(method, changed)[:, :1], _contexts(method, x)[:, :1])


# ------------------------------------------------------------------------------------------------ the loss

def _naive_loss(method: CPC, x: torch.Tensor) -> torch.Tensor:
    """Loop over images, rows, columns and offsets; each prediction's logits against every patch of the batch."""
    patches, rows, cols = patchify(x, P, STRIDE)
    z, context = method.encode_grid(method.augment(patches, STEP), x.shape[0], rows, cols)
    targets = method.target(z)  # [n*R*Q, d] in (image, row, column) order
    per_offset = []
    for k, predict in zip(method.cfg.offsets, method.predictors):
        terms = []
        for b in range(x.shape[0]):
            for r in range(rows - k):
                for q in range(cols):
                    prediction = predict(context[b, r, q])
                    logits = torch.stack([targets[j] @ prediction for j in range(targets.shape[0])])
                    positive = (b * rows + r + k) * cols + q
                    terms.append(torch.logsumexp(logits, 0) - logits[positive])
        per_offset.append(torch.stack(terms).mean())
    return torch.stack(per_offset).mean()


def _grads(method: CPC) -> dict[str, torch.Tensor]:
    return {k: p.grad.clone() for k, p in method.named_parameters()}


def test_loss_and_gradients_equal_a_naive_loop():
    method = _method()
    x = _images()
    out = method(_batch(x), step=STEP)
    out.loss.backward()
    fast = _grads(method)
    method.zero_grad()
    naive = _naive_loss(method, x)
    naive.backward()
    assert out.loss.item() == pytest.approx(naive.item(), rel=1e-5)
    for k, g in _grads(method).items():
        torch.testing.assert_close(fast[k], g, rtol=1e-4, atol=1e-6, msg=k)
    # a loss of untrained latents is near log(36), the candidates' count; a wrong positive would move it far
    assert abs(naive.item() - torch.log(torch.tensor(36.0)).item()) < 2.0
    assert out.embedding.shape == (N, method.feature_dim) and 0 <= out.metrics["cpc_acc"].item() <= 1


def test_loss_uses_the_patches_of_every_image_as_negatives():
    # the same images one by one: fewer candidates per prediction, a lower InfoNCE
    method = _method(patch_crop=1.0, patch_hflip_p=0.0, channel_drop_p=0.0)
    x = _images()
    with torch.no_grad():
        whole = method(_batch(x), step=STEP).loss
        alone = torch.stack([method(_batch(x[i:i + 1]), step=STEP).loss for i in range(N)]).mean()
    assert whole.item() > alone.item() + 0.5


# ------------------------------------------------------------------------------------------------ augmentation

def test_patches_are_augmented_one_by_one():
    patches = torch.randn(60, C, P, P, generator=torch.Generator().manual_seed(2))
    dropped = _method(patch_crop=1.0, patch_hflip_p=0.0, channel_drop_p=1.0).augment(patches.clone(), STEP)
    zero = (dropped == 0).flatten(2).all(2)  # [m, C]: channels set to 0
    assert torch.equal(zero.sum(1), torch.full((60,), 2))  # every patch keeps exactly one channel, as it was
    torch.testing.assert_close(dropped[~zero], patches[~zero], rtol=0, atol=0)
    assert len(set(zero.float().argmin(1).tolist())) == 3  # which channel is kept differs between patches

    flipped = _method(patch_crop=1.0, patch_hflip_p=1.0, channel_drop_p=0.0).augment(patches.clone(), STEP)
    torch.testing.assert_close(flipped, patches.flip(3), rtol=1e-5, atol=1e-5)

    half = _method(patch_crop=1.0, patch_hflip_p=0.5, channel_drop_p=0.0).augment(patches.clone(), STEP)
    mirrored = (half - patches.flip(3)).flatten(1).abs().amax(1) < 1e-5
    assert 0 < int(mirrored.sum()) < 60  # per patch, not per batch


# ------------------------------------------------------------------------------------------------ encoder, config

def test_encoder_averages_the_latents_of_every_patch():
    method = _method()
    x = _images()
    with torch.no_grad():
        pooled = method.patch_encoder.pooled(x)
        by_hand = torch.stack([method.patch_encoder.backbone(x[:, :, r * STRIDE:r * STRIDE + P,
                                                               q * STRIDE:q * STRIDE + P])
                               for r in range(3) for q in range(3)]).mean(0)
        torch.testing.assert_close(pooled, by_hand, rtol=1e-5, atol=1e-6)
        assert pooled.shape == (N, method.feature_dim)
        # the head is linear, so on the pooled latent it is the pooled candidate projection
        z = method.patch_encoder.backbone(patchify(x, P, STRIDE)[0])
        torch.testing.assert_close(method.projection_head()(pooled), method.target(z).view(N, 9, -1).mean(1),
                                   rtol=1e-5, atol=1e-6)


def test_the_encoder_standardises_with_running_statistics_of_the_pooled_latents():
    # without patch augmentation the training latents are the evaluation's (with it, of the augmented patches)
    method = _method(norm_momentum=0.25, patch_crop=1.0, patch_hflip_p=0.0, channel_drop_p=0.0)
    x, y = _images(seed=1), _images(seed=2)
    for images in (x, y):
        out = method(_batch(images), step=STEP)
        method.after_step({k: v.detach() for k, v in out.updates.items()}, STEP)
    with torch.no_grad():
        px, py = method.patch_encoder.pooled(x), method.patch_encoder.pooled(y)
        # from mean 0 and variance 1: two updates, each 0.75 old + 0.25 the batch's (biased) statistics
        mean = 0.75 * (0.25 * px.mean(0)) + 0.25 * py.mean(0)
        var = 0.75 * (0.75 + 0.25 * px.var(0, unbiased=False)) + 0.25 * py.var(0, unbiased=False)
        torch.testing.assert_close(method.patch_encoder.running_mean, mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(method.patch_encoder.running_var, var, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(method.encoder()(x), (px - mean) / torch.sqrt(var + 1e-5), rtol=1e-5, atol=1e-5)
    assert {"patch_encoder.running_mean", "patch_encoder.running_var"} <= set(method.state_dict())  # checkpointed
    fixed = _method(norm_momentum=0.0)
    out = fixed(_batch(x), step=STEP)
    fixed.after_step(out.updates, STEP)
    with torch.no_grad():  # momentum 0: the plain average, up to batch norm's epsilon
        torch.testing.assert_close(fixed.encoder()(x), fixed.patch_encoder.pooled(x) / (1 + 1e-5) ** 0.5)


def test_bad_settings_are_named():
    with pytest.raises(ConfigError, match=r"method.offsets=\[1, 3\].*at most 2"):
        _method(offsets=[1, 3])
    method = _method()
    with pytest.raises(ConfigError, match="views.n_views=1"):
        method(Batch(views=[_images(), _images()], index=torch.arange(N), label=torch.arange(N)), step=STEP)
    with pytest.raises(ConfigError, match="backbone.norm='instance'"):
        _method(norm="instance")
    ctx = BuildContext(input_shape=(C, S, S), dataset_size=8, num_classes=None, batch_size=4, world_size=1,
                       steps_per_epoch=2, epochs=1)
    for bad, field in (({"offsets": [0, 1]}, "method.offsets"), ({"patch_crop": 0.0}, "method.patch_crop"),
                       ({"channel_drop_p": 2.0}, "method.channel_drop_p")):
        cfg = resolve_config(tree={"method": {"name": "cpc", "patch_size": P, "patch_stride": STRIDE, **bad}})
        with pytest.raises(ConfigError, match=field):
            api.build_method(cfg, ctx)


@pytest.mark.slow
def test_a_checkpoint_loads_as_the_trained_encoder(tmp_path):
    from contrastive.modalities import load_splits
    from contrastive.training.trainer import Trainer

    cfg = resolve_config(tree={"data": {"name": "digits"}, "method": {"name": "cpc"}},
                         overrides=["data.image_size=16", "train.batch_size=32", "train.epochs=1",
                                    "train.max_steps=2", "train.progress=false", "train.tensorboard=false",
                                    f"train.output={tmp_path}"])
    data = load_splits(cfg.data).pretrain
    method = api.build_method(cfg, modality_of(data).context(cfg, data))
    Trainer(cfg, method, data, tmp_path).fit()
    encoder, info = api.load_encoder(tmp_path / "checkpoint.pt")
    assert info["feature_dim"] == method.feature_dim
    x = torch.randn(5, 1, 16, 16)
    method.eval()
    with torch.no_grad():
        torch.testing.assert_close(encoder(x), method.encoder()(x), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ two processes

def _worker(out_dir: str) -> None:
    distributed.init_from_env(torch.device("cpu"))
    rank, world = distributed.rank(), distributed.world_size()
    n = N // world
    method = _method()
    ddp = DistributedDataParallel(method, **method.ddp_options)
    step = StepInfo(step=STEP.step, epoch=0, total_steps=STEP.total_steps, seed=STEP.seed, rank=rank)
    loss = ddp(_batch(_images()[rank * n:(rank + 1) * n]), step=step).loss
    loss.backward()  # DDP averages the gradients over the ranks
    out = method(_batch(_images()[rank * n:(rank + 1) * n]), step=step)
    method.after_step({k: v.detach() for k, v in out.updates.items()}, step)
    torch.save({"loss": loss.detach(), "grads": _grads(method), "mean": method.patch_encoder.running_mean.clone(),
                "var": method.patch_encoder.running_var.clone()},
               os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    run_as_torchrun(_worker, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    method = _method()
    loss = method(_batch(_images()), step=STEP).loss
    loss.backward()
    # each rank holds half the predictions of every offset, scored against every rank's patches
    assert torch.stack([r["loss"] for r in ranks]).mean().item() == pytest.approx(loss.item(), rel=1e-5)
    for k, g in _grads(method).items():
        for r in ranks:
            torch.testing.assert_close(r["grads"][k], g, rtol=1e-4, atol=1e-6, msg=k)
    # the statistics are updated from every rank's images: each rank holds the one-process statistics
    out = method(_batch(_images()), step=STEP)
    method.after_step({k: v.detach() for k, v in out.updates.items()}, STEP)
    for r in ranks:
        torch.testing.assert_close(r["mean"], method.patch_encoder.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r["var"], method.patch_encoder.running_var, rtol=1e-5, atol=1e-6)
