"""CMC: the sRGB -> Lab conversion against reference values, the in-batch loss against a naive loop, the NCE
objective against each view's bank, the core and full graphs, the concatenated encoder, refusals, exact resume,
loading, and a two-process run equal to one process."""

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from multiprocess import run_as_torchrun
from PIL import Image
from torch import nn

from contrastive import api, distributed
from contrastive.configure import resolve_config
from contrastive.data.color import LAB_MEAN, LAB_STD, normalised_lab, rgb_to_lab
from contrastive.errors import ConfigError
from contrastive.losses import cmc_info_nce, nce_loss, nce_normaliser
from contrastive.methods import method_config
from contrastive.methods.base import Batch, BuildContext, StepInfo
from contrastive.methods.cmc import CMC, CMCConfig
from contrastive.modalities import modality_of
from contrastive.training.checkpoint import load_checkpoint
from contrastive.trees import recipe_dir

# ------------------------------------------------------------------------------------------------ colour

# skimage.color.rgb2lab (scikit-image 0.26.0, float64 input, D65, 2-degree observer) of these sRGB colours
SKIMAGE_LAB = [
    ((0.0, 0.0, 0.0), (0.00000, 0.00000, 0.00000)),
    ((1.0, 1.0, 1.0), (100.00000, -0.00245, 0.00465)),
    ((1.0, 0.0, 0.0), (53.24059, 80.09231, 67.20275)),
    ((0.0, 1.0, 0.0), (87.73510, -86.18303, 83.17970)),
    ((0.0, 0.0, 1.0), (32.29567, 79.18559, -107.85730)),
    ((1.0, 1.0, 0.0), (97.13951, -21.55468, 94.47812)),
    ((0.0, 1.0, 1.0), (91.11330, -48.09060, -14.12633)),
    ((1.0, 0.0, 1.0), (60.32351, 98.23305, -60.82102)),
    ((0.5, 0.5, 0.5), (53.38896, -0.00147, 0.00278)),
    ((0.02, 0.02, 0.02), (1.39828, -0.00009, 0.00017)),  # the linear segments of sRGB and of f(t)
    ((0.2, 0.4, 0.6), (42.00800, -0.15404, -32.84290)),
    ((0.9, 0.1, 0.3), (49.48559, 73.21561, 27.09119)),
]


def _as_images(colours) -> torch.Tensor:
    """12 colours -> [2, 3, 2, 3]: two images of 2 x 3 pixels, channels first."""
    return torch.tensor(colours, dtype=torch.float32).view(2, 2, 3, 3).permute(0, 3, 1, 2)


def test_rgb_to_lab_equals_skimage_on_known_colours():
    lab = rgb_to_lab(_as_images([c for c, _ in SKIMAGE_LAB]))
    assert lab.shape == (2, 3, 2, 3) and lab.dtype == torch.float32
    torch.testing.assert_close(lab, _as_images([v for _, v in SKIMAGE_LAB]), rtol=0, atol=2e-3)


def test_lab_extremes_are_the_official_normalisation_ranges():
    # train_CMC.py normalises a over [-86.183, 98.233] and b over [-107.857, 94.478]: pure green and magenta
    # are a's ends, pure blue and yellow b's
    lab = rgb_to_lab(torch.tensor([[0.0, 1, 0], [1, 0, 1], [0, 0, 1], [1, 1, 0]]).view(4, 3, 1, 1)).flatten(1)
    ends = [lab[0, 1], lab[1, 1], lab[2, 2], lab[3, 2]]
    for value, official in zip(ends, [-86.183, 98.233, -107.857, 94.478]):
        assert value.item() == pytest.approx(official, abs=1e-3)
    assert LAB_MEAN == pytest.approx((50.0, 6.025, -6.6895)) and LAB_STD == pytest.approx((50.0, 92.208, 101.1675))


def test_normalised_lab_undoes_the_data_normalisation_first():
    rgb = torch.rand(4, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    x = (rgb - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    expected = (rgb_to_lab(rgb) - torch.tensor(LAB_MEAN).view(1, 3, 1, 1)) / torch.tensor(LAB_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(normalised_lab(x, mean, std), expected, rtol=0, atol=1e-5)
    white = normalised_lab(torch.full((1, 3, 1, 1), 2.0), (0.5,) * 3, (0.25,) * 3).flatten()  # rgb 1.0
    assert white[0].item() == pytest.approx(1.0, abs=1e-6)  # L = 100 -> (100 - 50) / 50


# ------------------------------------------------------------------------------------------------ the loss

def _naive_info_nce(a: torch.Tensor, b: torch.Tensor, tau: float) -> torch.Tensor:
    """Mean over anchors i of -log(exp(a_i·b_i/τ) / Σ_j exp(a_i·b_j/τ)), by loops."""
    n = a.shape[0]
    total = 0
    for i in range(n):
        scores = [torch.exp(a[i] @ b[j] / tau) for j in range(n)]
        total = total - torch.log(scores[i] / sum(scores))
    return total / n


def _unit(n, d, seed):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=1)


def test_two_view_loss_and_gradient_equal_infonce_both_ways():
    z1, z2, tau = _unit(6, 5, 0), _unit(6, 5, 1), 0.1
    a1, a2 = z1.float().requires_grad_(), z2.float().requires_grad_()
    loss = cmc_info_nce(a1, a2, tau)
    loss.backward()
    b1, b2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    naive = _naive_info_nce(b1, b2, tau) + _naive_info_nce(b2, b1, tau)
    naive.backward()
    assert loss.item() == pytest.approx(naive.item(), rel=1e-6)
    torch.testing.assert_close(a1.grad, b1.grad.float(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(a2.grad, b2.grad.float(), rtol=1e-4, atol=1e-6)
    # a loss that paired image i with another image's view would differ
    assert loss.item() != pytest.approx(cmc_info_nce(a1, a2.roll(1, 0), tau).item(), rel=1e-3)


def test_loss_by_hand_for_two_images():
    # τ = 1; image 0's views are both e1, image 1's are e2 and e3. L -> ab: anchor 0 scores (1, 0), anchor 1
    # scores (0, 0); ab -> L the same: each direction is [log(1 + e^-1) + log 2] / 2
    e1, e2, e3 = torch.eye(3)
    loss = cmc_info_nce(torch.stack([e1, e2]), torch.stack([e1, e3]), 1.0)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)) + math.log(2), rel=1e-6)


# ------------------------------------------------------------------------------------------------ the method

MEAN, STD, D = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3), 4


def _encoder(channels: int, side: int = 4) -> tuple[nn.Module, int]:
    return nn.Sequential(nn.Flatten(), nn.Linear(channels * side * side, 8), nn.ReLU()), 8


def _method(views=("L", "ab"), graph="core", contrast="nce", size=20, k=6, seed=0) -> CMC:
    torch.manual_seed(seed)
    cfg = CMCConfig(views=list(views), graph=graph, contrast=contrast, temperature=0.1, embedding_dim=D,
                    num_negatives=k, bank_momentum=0.5)
    encoders = [_encoder(len(v)) for v in views]
    return CMC(encoders, cfg, size, MEAN, STD)


def _batch(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Batch(views=[torch.randn(n, 3, 4, 4, generator=g)], index=torch.tensor([17, 2, 9, 0, 11, 5])[:n],
                 label=torch.full((n,), -1))


def _info(step=0, rank=0, seed=0):
    return StepInfo(step=step, epoch=0, total_steps=10, seed=seed, rank=rank)


def _by_hand(method: CMC, x: torch.Tensor) -> list[torch.Tensor]:
    """Each view's encoder features, from the views split by hand."""
    rgb = x * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
    lab = (rgb_to_lab(rgb) - torch.tensor(LAB_MEAN).view(1, 3, 1, 1)) / torch.tensor(LAB_STD).view(1, 3, 1, 1)
    channels = {"L": [0], "a": [1], "b": [2], "ab": [1, 2]}
    return [bb(lab[:, channels[v]]) for bb, v in zip(method.encoders.backbones, method.cfg.views)]


def test_encoder_is_the_concatenation_of_the_view_encoders():
    method = _method(views=("L", "a", "b"))
    x = _batch().views[0]
    parts = _by_hand(method, x)
    assert [p.shape[1] for p in parts] == [8, 8, 8] and method.feature_dim == 24
    assert [bb[1].in_features for bb in method.encoders.backbones] == [16, 16, 16]  # 1 channel each
    torch.testing.assert_close(method.encoder()(x), torch.cat(parts, dim=1), rtol=0, atol=1e-5)
    assert method.projection_head() is None  # one head per view: no single head on the concatenation


def test_two_view_batch_loss_is_infonce_both_ways_of_the_views_features():
    method = _method(contrast="batch")
    batch = _batch()
    out = method(batch, step=_info())
    parts = _by_hand(method, batch.views[0])
    z_l, z_ab = (F.normalize(head(h), dim=1).double() for head, h in zip(method.heads, parts))
    naive = _naive_info_nce(z_l, z_ab, 0.1) + _naive_info_nce(z_ab, z_l, 0.1)
    assert out.loss.item() == pytest.approx(naive.item(), rel=1e-5)
    assert out.metrics["loss_L_ab"].item() == pytest.approx(naive.item(), rel=1e-5)
    assert out.updates == {} and "z" not in dict(method.named_buffers()) and not hasattr(method, "banks")


@pytest.mark.parametrize("graph, pairs", [("core", [(0, 1), (0, 2)]), ("full", [(0, 1), (0, 2), (1, 2)])])
def test_core_and_full_graphs_contrast_their_pairs(graph, pairs):
    method = _method(views=("L", "a", "b"), graph=graph, contrast="batch")
    batch = _batch()
    out = method(batch, step=_info())
    z = method.embed(batch.views[0])
    names = ["L", "a", "b"]
    assert sorted(out.metrics) == sorted(f"loss_{names[i]}_{names[j]}" for i, j in pairs)
    expected = sum(cmc_info_nce(z[i], z[j], 0.1) for i, j in pairs)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_nce_scores_each_view_against_the_other_views_bank_with_shared_noise():
    method = _method(size=20, k=6)
    batch, info = _batch(), _info(step=4, seed=3)
    state = {k: v.clone() for k, v in method.state_dict().items()}
    out = method(batch, step=info)
    z_l, z_ab = method.embed(batch.views[0])
    noise = torch.randint(20, (6, 6), generator=info.generator("cpu", per_rank=False))  # one draw for both banks
    bank_l, bank_ab = method.banks[0].rows, method.banks[1].rows
    # L's features against ab's bank, and ab's against L's, each direction with its own Z (first step)
    z1 = nce_normaliser(z_l, bank_ab[batch.index], bank_ab[noise], 0.1, 20)
    z2 = nce_normaliser(z_ab, bank_l[batch.index], bank_l[noise], 0.1, 20)
    assert torch.equal(out.updates["z"], torch.stack([z1, z2])) and z1 != z2
    expected = (nce_loss(z_l, bank_ab[batch.index], bank_ab[noise], 0.1, z1, 20)
                + nce_loss(z_ab, bank_l[batch.index], bank_l[noise], 0.1, z2, 20))
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert torch.equal(out.updates["features"], torch.stack([z_l, z_ab], dim=1))
    for k, v in method.state_dict().items():  # forward changed nothing
        assert torch.equal(v, state[k]), k

    # once Z is set it is used as it is
    method.z.copy_(torch.tensor([5.0, 7.0]))
    out = method(batch, step=info)
    expected = (nce_loss(z_l, bank_ab[batch.index], bank_ab[noise], 0.1, torch.tensor(5.0), 20)
                + nce_loss(z_ab, bank_l[batch.index], bank_l[noise], 0.1, torch.tensor(7.0), 20))
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    out.loss.backward()
    assert all(p.grad is not None for p in method.parameters()) and bank_l.grad is None


def test_after_step_writes_every_views_bank_by_the_proximal_rule():
    method = _method(size=5)
    before = [bank.rows.clone() for bank in method.banks]
    f = F.normalize(torch.randn(2, 2, D, generator=torch.Generator().manual_seed(0)), dim=2)  # [n, V, d]
    index = torch.tensor([4, 1])
    method.after_step({"index": index, "features": f, "z": torch.tensor([3.0, 4.0])}, _info())
    for v, bank in enumerate(method.banks):
        expected = F.normalize(0.5 * before[v][index] + 0.5 * f[:, v], dim=1)
        torch.testing.assert_close(bank.rows[index], expected)
        untouched = torch.tensor([0, 2, 3])
        assert torch.equal(bank.rows[untouched], before[v][untouched])
    assert method.z.tolist() == [3.0, 4.0]


def test_loss_is_float32_under_bf16_autocast():
    method, batch = _method(), _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = method(batch, step=_info())
    assert out.loss.dtype == torch.float32 and out.updates["features"].dtype == torch.float32


@pytest.mark.parametrize("overrides", [["method.contrast=nce"], ["method.views=[L,a,b]", "method.graph=full"]])
def test_the_recipes_other_forms_stay_on_the_input_device(overrides):
    """test_devices.py checks the recipe's form (in-batch, two views); these are the banks and three views."""
    from test_devices import _on_cpu, guarded

    cfg = resolve_config(recipe=recipe_dir() / "cmc-cifar10.yaml", overrides=overrides)
    ctx = BuildContext(input_shape=(3, 16, 16), dataset_size=64, num_classes=10, batch_size=8, world_size=1,
                       steps_per_epoch=4, epochs=2, backbone_section=cfg.backbone, mean=MEAN, std=STD)
    torch.manual_seed(0)
    method = api.build_method(cfg, ctx)
    g = torch.Generator().manual_seed(1)
    batch = Batch(views=[torch.randn(8, 3, 16, 16, generator=g)], index=torch.randperm(64, generator=g)[:8],
                  label=torch.arange(8))
    info = StepInfo(step=1, epoch=0, total_steps=8, steps_per_epoch=4, epochs=2)
    out = guarded(method, batch, step=info)
    guarded(out.loss.backward)
    with torch.no_grad():
        guarded(method.after_step, {k: v.detach() for k, v in out.updates.items()}, info)
    assert torch.isfinite(out.loss)
    _on_cpu(out.loss, list(out.metrics.values()), list(out.updates.values()), list(method.state_dict().values()))


def _ctx(channels=3, mean=(0.5,) * 3, std=(0.25,) * 3):
    return BuildContext(input_shape=(channels, 8, 8), dataset_size=32, num_classes=None, batch_size=8,
                        world_size=1, steps_per_epoch=4, epochs=1, backbone_section={"name": "small_cnn"},
                        mean=mean, std=std)


def test_grey_data_missing_statistics_and_bad_fields_are_refused(tmp_path):
    cfg = resolve_config(recipe=recipe_dir() / "cmc-cifar10.yaml")
    with pytest.raises(ConfigError, match="1 channel.*RGB data, e.g. data.name=cifar10"):
        api.build_method(cfg, _ctx(channels=1, mean=(0.5,), std=(0.25,)))
    with pytest.raises(ConfigError, match="mean and std"):
        api.build_method(cfg, _ctx(mean=None, std=None))
    # the user's road: pretraining on digits stops before any training (here already when the settings are
    # derived from the data, which builds the method to measure a step)
    with pytest.raises(ConfigError, match="CMC contrasts the L and ab channels of colour images"):
        api.pretrain(resolve_config(tree={"data": {"name": "digits"}, "method": {"name": "cmc"}},
                                    overrides=["train.progress=false", "eval.enabled=false",
                                               f"train.output={tmp_path}"]))
    for views, message in [(["L"], "at least two"), (["L", "La"], "in two views"), (["L", "rgb"], "'rgb'"),
                           (["L", "aa"], "'aa'")]:
        with pytest.raises(ConfigError, match=message):
            _method(views=views)
    with pytest.raises(ConfigError, match="method.graph"):
        _method(graph="star")
    with pytest.raises(ConfigError, match="method.contrast"):
        _method(contrast="softmax")
    two = Batch(views=[torch.randn(2, 3, 4, 4)] * 2, index=torch.arange(2), label=torch.arange(2))
    with pytest.raises(ConfigError, match="views.n_views=1"):
        _method()(two, step=_info())


def test_the_context_carries_the_data_statistics_and_an_old_one_still_loads():
    from dataclasses import asdict

    from contrastive.modalities.image.datasets import TensorImages

    images = torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    data = TensorImages(images, torch.zeros(10, dtype=torch.long), name="toy", classes=None)
    cfg = resolve_config(recipe=recipe_dir() / "cmc-cifar10.yaml", overrides=["train.batch_size=4"])
    ctx = modality_of(data).context(cfg, data)
    assert ctx.mean == pytest.approx(tuple((images.float() / 255).mean(dim=(0, 2, 3)).tolist()))
    assert ctx.std == data.std and len(ctx.std) == 3
    old = {k: v for k, v in asdict(ctx).items() if k not in ("mean", "std")}  # a context saved before them
    assert BuildContext(**old).mean is None and BuildContext(**old).std is None


# ------------------------------------------------------------------------------------------------ training

def _rgb_folder(root, n_per_class=48, side=8) -> str:
    """Two classes of random colour images (reddish and bluish), the same every time."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(["red", "blue"]):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
            pixels[..., 2 * c] = pixels[..., 2 * c] // 2 + 128
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return str(root)


FAST = ["train.batch_size=32", "train.progress=false", "train.tensorboard=false", "eval.enabled=false",
        "train.log_every=1", "method.num_negatives=16", "backbone.widths=[8,16]"]


def _cfg(data, out, *extra):
    return resolve_config(recipe=recipe_dir() / "cmc-cifar10.yaml", tree={"data": {"name": data}},
                          overrides=FAST + [f"train.output={out}", *extra])


@pytest.mark.slow
def test_interrupted_and_resumed_run_equals_uninterrupted_and_loads_as_the_encoder(tmp_path):
    data = _rgb_folder(tmp_path / "images")  # 96 images -> 3 steps an epoch at batch 32; 2 epochs = 6 steps
    nce = ["train.epochs=2", "method.contrast=nce"]  # the banks and Z are what a resume must restore
    full = api.pretrain(_cfg(data, tmp_path / "full", *nce))
    part = api.pretrain(_cfg(data, tmp_path / "part", *nce, "train.max_steps=4"))
    assert (full["steps"], part["steps"]) == (6, 4)
    ckpt = tmp_path / "part" / "checkpoint.pt"
    saved = load_checkpoint(ckpt)
    assert saved["context"]["mean"] is not None and (saved["method"]["z"] > 0).all()
    resumed = api.pretrain(_cfg(data, tmp_path / "part", *nce, f"train.resume={ckpt}"))
    assert resumed["steps"] == 6
    a, b = load_checkpoint(tmp_path / "full" / "checkpoint.pt"), load_checkpoint(ckpt)
    assert a["method"].keys() == b["method"].keys() and {"banks.0.rows", "banks.1.rows", "z"} <= set(a["method"])
    for k in a["method"]:  # weights, both banks and the Z of both directions, bitwise
        assert torch.equal(a["method"][k], b["method"][k]), k
    for k, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["optimizer"]["state"][k][name]))

    # checkpoint.pt and encoder.pt rebuild the encoder (the data statistics from the saved context)
    cfg = _cfg(data, tmp_path / "x", *nce)
    method = api.build_method(cfg, BuildContext(**a["context"]))
    method.load_state_dict(a["method"], assign=True)  # the saved strides too (channels-last weights)
    method.eval()
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        expected = method.encoder()(x)
        for path in (tmp_path / "full" / "checkpoint.pt", tmp_path / "full" / "encoder.pt"):
            encoder, info = api.load_encoder(path)
            assert info["feature_dim"] == method.feature_dim == 32
            torch.testing.assert_close(encoder(x), expected, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ two processes

# Views made deterministic (the whole image, no flip): the views of a step are seeded per rank, so random views
# would differ between one and two processes. The encoders have no batch norm, whose statistics are per process
# on CPUs. Everything else (noise draws, Z, bank writes, gathered candidates) is what the test checks.
DETERMINISTIC = ["views.crop_scale=[1.0,1.0]", "views.crop_ratio=[1.0,1.0]", "views.hflip_p=0", "train.epochs=1",
                 "train.channels_last=false", "data.image_size=8"]


def _run_trainer(data: str, output: str, contrast: str) -> dict:
    """Train, and return this process's method state (every rank's, not only the checkpoint's rank 0)."""
    from contrastive.modalities import load_splits
    from contrastive.training.trainer import Trainer

    cfg = _cfg(data, output, *DETERMINISTIC, f"method.contrast={contrast}")
    train = load_splits(cfg.data).pretrain
    torch.manual_seed(0)
    encoders = [_encoder(1, 8), _encoder(2, 8)]
    method = CMC(encoders, method_config(cfg), len(train), train.mean, train.std)
    Trainer(cfg, method, train, output).fit()
    return method.state_dict()


def _worker(data: str, output: str) -> None:
    for contrast in CONTRASTS:
        out = os.path.join(output, contrast)
        torch.save(_run_trainer(data, out, contrast), os.path.join(out, f"rank{distributed.rank()}.pt"))


CONTRASTS = ("nce", "batch")


def _losses(run) -> list[float]:
    rows = (run / "metrics.csv").read_text().splitlines()
    col = rows[0].split(",").index("loss")
    return [float(r.split(",")[col]) for r in rows[1:]]


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    data = _rgb_folder(tmp_path / "images")
    run_as_torchrun(_worker, data, str(tmp_path / "ddp"))  # both contrasts in one launch: starting costs most
    for contrast in CONTRASTS:
        ddp = tmp_path / "ddp" / contrast
        single = _run_trainer(data, str(tmp_path / "single" / contrast), contrast)
        # load_splits holds 20% of each class out for evaluation: 76 images, 2 steps of 32
        assert load_checkpoint(ddp / "checkpoint.pt")["step"] == 2
        ranks = [torch.load(ddp / f"rank{r}.pt") for r in (0, 1)]
        if contrast == "nce":
            # every rank wrote the same rows with the same values: banks and Z bitwise equal across ranks
            for k in ("banks.0.rows", "banks.1.rows", "z"):
                assert torch.equal(ranks[0][k], ranks[1][k]), k
            # Z of each direction: the mean of the ranks' means is the single-process estimate
            torch.testing.assert_close(ranks[0]["z"], single["z"], rtol=1e-6, atol=0)
        for k, v in single.items():  # banks (rows written and rows never drawn) and weights
            torch.testing.assert_close(ranks[0][k], v, rtol=1e-4, atol=1e-5, msg=f"{contrast}: {k}")
        assert len(_losses(tmp_path / "single" / contrast)) == 2
        assert _losses(ddp) == pytest.approx(_losses(tmp_path / "single" / contrast), rel=1e-5), contrast
