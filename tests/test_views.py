"""SimCLR views: determinism per seed, per-sample parameters, and every kernel against torchvision."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF

from contrastive.config import ViewConfig
from contrastive.data import augment
from contrastive.data.datasets import PerItemViews
from contrastive.errors import ConfigError
from contrastive.modalities.image.views import PILViews, TensorViews, blur_kernel_size, eval_preprocess, make_views

MEAN3, STD3 = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]
MEAN1, STD1 = [0.13], [0.31]

# Only the crop, nothing random after it.
PLAIN = dict(crop_scale=[1.0, 1.0], crop_ratio=[1.0, 1.0], hflip_p=0.0, jitter_p=0.0, grayscale_p=0.0,
             blur_p=0.0, solarize_p=0.0)
# Everything on, so every branch draws and runs.
FULL = dict(blur_p=0.5, solarize_p=0.3)


def _images(b: int, c: int = 3, side: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (b, c, side, side), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _normalised(images: torch.Tensor, mean: list, std: list) -> torch.Tensor:
    m, s = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    return (images.float() / 255 - m) / s


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------------
# TensorViews: randomness


def test_same_seed_same_views_other_seed_differs():
    views = TensorViews(ViewConfig(**FULL), MEAN3, STD3, channels=3, in_size=16)
    x = _images(8)
    a, b, c = views(x, _gen(1)), views(x, _gen(1)), views(x, _gen(2))
    for va, vb in zip(a, b):
        assert torch.equal(va, vb)
    assert not torch.equal(a[0], c[0])
    assert not torch.equal(a[0], a[1])  # the two views of one call differ


def test_identical_images_in_a_batch_get_different_views():
    views = TensorViews(ViewConfig(**FULL), MEAN3, STD3, channels=3, in_size=16)
    x = _images(1).expand(4, -1, -1, -1).contiguous()
    v = views(x, _gen(0))[0]
    for i in range(1, 4):
        assert (v[0] - v[i]).abs().max() > 0.1


# ---------------------------------------------------------------------------------------------------
# TensorViews: geometry


def test_full_crop_without_augmentation_reproduces_input():
    x = _images(4)
    v = TensorViews(ViewConfig(**PLAIN), MEAN3, STD3, channels=3, in_size=16)(x, _gen(0))
    for view in v:
        torch.testing.assert_close(view, _normalised(x, MEAN3, STD3), atol=1e-5, rtol=0)


def test_forced_flip_mirrors_input():
    x = _images(4)
    cfg = ViewConfig(**{**PLAIN, "hflip_p": 1.0})
    v = TensorViews(cfg, MEAN3, STD3, channels=3, in_size=16)(x, _gen(0))[0]
    torch.testing.assert_close(v, _normalised(x.flip(-1), MEAN3, STD3), atol=1e-5, rtol=0)


def test_crop_at_half_resolution_is_the_box_average():
    # Output pixel centres of a 2x downscale fall between two input pixels: bilinear = 2x2 mean.
    x = torch.rand(3, 2, 16, 16)
    boxes = torch.tensor([[0.0, 0.0, 16.0, 16.0], [2.0, 4.0, 8.0, 8.0], [8.0, 0.0, 8.0, 8.0]])
    sizes = [8, 4, 4]
    for i, (box, size) in enumerate(zip(boxes, sizes)):
        out = augment.resized_crop(x[i:i + 1], box[None], torch.tensor([False]), size)
        t, l, h, w = (int(v) for v in box)
        torch.testing.assert_close(out, F.avg_pool2d(x[i:i + 1, :, t:t + h, l:l + w], 2), atol=1e-6, rtol=0)


def test_full_crop_upsampled_matches_torch_resize_at_the_borders():
    # Upsampling samples half a pixel beyond the edge; torch's resize clamps there, as border padding does.
    x = torch.rand(2, 3, 8, 8)
    out = augment.resized_crop(x, torch.tensor([[0.0, 0.0, 8.0, 8.0]] * 2), torch.tensor([False, False]), 20)
    expected = F.interpolate(x, size=(20, 20), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_crop_boxes_fit_and_cover_the_scale_range():
    g = _gen(0)
    b = 2000
    boxes = augment.sample_crop_boxes(torch.rand(b, 10, generator=g), torch.rand(b, 10, generator=g),
                                      torch.rand(b, generator=g), torch.rand(b, generator=g),
                                      32, 32, (0.08, 1.0), (3 / 4, 4 / 3))
    top, left, h, w = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 32).all() and (left + w <= 32).all()
    assert torch.equal(boxes, boxes.round())
    area = h * w / 1024
    assert area.min() < 0.1 and area.max() > 0.95
    ratio = w / h
    # Rounding to whole pixels can move the ratio a little outside (3/4, 4/3) on small boxes.
    assert ratio.min() > 0.6 and ratio.max() < 1.7


def test_crop_falls_back_to_torchvision_centre_crop():
    # A square image never fits a 2:1 box of the full area, so all 10 tries fail.
    u = torch.full((3, 10), 0.5)
    boxes = augment.sample_crop_boxes(u, u, torch.rand(3), torch.rand(3), 32, 32, (1.0, 1.0), (2.0, 2.0))
    assert boxes.tolist() == [[8.0, 0.0, 16.0, 32.0]] * 3


# ---------------------------------------------------------------------------------------------------
# colour kernels against torchvision, one image at a time


def _float_images(b: int = 6, c: int = 3) -> torch.Tensor:
    return torch.rand(b, c, 12, 12, generator=_gen(3))


@pytest.mark.parametrize("ours, theirs, low, high, atol", [
    (augment.adjust_brightness, TF.adjust_brightness, 0.2, 1.8, 1e-6),
    (augment.adjust_contrast, TF.adjust_contrast, 0.2, 1.8, 1e-5),
    (augment.adjust_saturation, TF.adjust_saturation, 0.2, 1.8, 1e-5),
    (augment.adjust_hue, TF.adjust_hue, -0.5, 0.5, 1e-5),
])
@pytest.mark.parametrize("channels", [3, 1])
def test_colour_op_matches_torchvision(ours, theirs, low, high, atol, channels):
    x = _float_images(c=channels)
    factor = low + (high - low) * torch.rand(x.shape[0], generator=_gen(4))
    expected = torch.stack([theirs(img, float(f)) for img, f in zip(x, factor)])
    torch.testing.assert_close(ours(x, factor), expected, atol=atol, rtol=0)


def test_grayscale_and_solarize_match_torchvision():
    x = _float_images()
    torch.testing.assert_close(augment.to_grayscale(x), TF.rgb_to_grayscale(x, num_output_channels=3),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(augment.solarize(x, 0.5), TF.solarize(x, 0.5), atol=0, rtol=0)


def test_color_jitter_applies_each_samples_order():
    x = _float_images(8)
    factors = torch.rand(8, 4, generator=_gen(5)) + 0.5
    factors[:, 3] -= 1.0  # hue shift in [-0.5, 0.5]
    order = torch.rand(8, 4, generator=_gen(6)).argsort(dim=1)
    apply = torch.tensor([True, True, False, True, True, True, False, True])
    funcs = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    expected = x.clone()
    for i in range(8):
        if apply[i]:
            for op in order[i].tolist():
                expected[i] = funcs[op](expected[i], float(factors[i, op]))
    torch.testing.assert_close(augment.color_jitter(x.clone(), factors, order, apply), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kernel_size", [3, 5])
def test_blur_matches_torchvision(kernel_size):
    x = _float_images(5)
    sigma = 0.1 + 2 * torch.rand(5, generator=_gen(7))
    expected = torch.stack([TF.gaussian_blur(img, [kernel_size] * 2, [float(s)] * 2) for img, s in zip(x, sigma)])
    torch.testing.assert_close(augment.gaussian_blur(x, sigma, kernel_size), expected, atol=1e-5, rtol=0)


def test_blur_kernel_sizes_follow_simclr():
    assert [blur_kernel_size(0.1, s) for s in (224, 96, 32, 8)] == [23, 9, 3, 1]


# ---------------------------------------------------------------------------------------------------
# shapes, ranges, backends


@pytest.mark.parametrize("channels, mean, std", [(3, MEAN3, STD3), (1, MEAN1, STD1)])
def test_shapes_dtype_and_range(channels, mean, std):
    cfg = ViewConfig(n_views=3, size=24, **FULL)
    views = make_views(cfg, mean, std, channels, in_size=16)(_images(5, channels), _gen(0))
    lo = (0 - torch.tensor(mean)) / torch.tensor(std)
    hi = (1 - torch.tensor(mean)) / torch.tensor(std)
    assert len(views) == 3
    for v in views:
        assert v.shape == (5, channels, 24, 24) and v.dtype == torch.float32
        assert (v >= lo.view(1, -1, 1, 1) - 1e-5).all() and (v <= hi.view(1, -1, 1, 1) + 1e-5).all()


@pytest.mark.parametrize("channels, mean, std", [(3, MEAN3, STD3), (1, MEAN1, STD1)])
def test_pil_views_shapes_and_dataset(channels, mean, std):
    pil = make_views(ViewConfig(backend="pil", n_views=3, size=24, **FULL), mean, std, channels, in_size=16)
    assert isinstance(pil, PILViews)
    base = [(img, i % 2, i) for i, img in enumerate(_images(2, channels))]
    views, label, index = PerItemViews(base, pil)[1]
    assert (label, index) == (1, 1) and len(views) == 3
    for v in views:
        assert v.shape == (channels, 24, 24) and v.dtype == torch.float32


def test_pil_views_without_augmentation_reproduce_input():
    x = _images(1)
    v = PILViews(ViewConfig(**PLAIN), MEAN3, STD3, 3, in_size=16)(x[0])[0]
    torch.testing.assert_close(v[None], _normalised(x, MEAN3, STD3), atol=1e-5, rtol=0)


def test_eval_preprocess():
    x = _images(2)
    torch.testing.assert_close(eval_preprocess(x, MEAN3, STD3, 16), _normalised(x, MEAN3, STD3), atol=1e-6, rtol=0)
    assert eval_preprocess(x, MEAN3, STD3, 8).shape == (2, 3, 8, 8)


@pytest.mark.parametrize("change, field", [
    ({"backend": "dali"}, "views.backend"),
    ({"crop_scale": [0.0, 1.0]}, "views.crop_scale"),
    ({"crop_scale": [0.5, 1.2]}, "views.crop_scale"),
    ({"n_views": 0}, "views.n_views"),
    ({"jitter_p": 1.5}, "views.jitter_p"),
    ({"jitter": [0.4, 0.4, 0.4]}, "views.jitter"),
    ({"jitter": [0.4, 0.4, 0.4, 0.6]}, "views.jitter"),
    ({"grayscale_p": -0.1}, "views.grayscale_p"),
    ({"blur_sigma": [2.0, 0.1]}, "views.blur_sigma"),
])
def test_make_views_rejects_bad_config(change, field):
    cfg = dataclasses.replace(ViewConfig(), **change)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")) as info:
        make_views(cfg, MEAN3, STD3, 3, 32)
    if field == "views.backend":
        assert "pil" in str(info.value) and "tensor" in str(info.value)


# ---------------------------------------------------------------------------------------------------
# the random draws against the settings that should give them (many samples, fixed seeds)

N_DRAWS = 20000


def _capture(monkeypatch, cfg: ViewConfig, *, height: int = 24, width: int = 40, b: int = N_DRAWS) -> dict:
    """Run one TensorViews view of ``b`` images with every kernel replaced by a recorder, and return what each
    kernel was given. Cropped pixels carry their sample's index, so later kernels say which samples they got."""
    got: dict = {}

    def crop(x, boxes, flip, size):
        got["boxes"], got["flip"] = boxes.clone(), flip.clone()
        return (torch.arange(x.shape[0], dtype=torch.float32) / x.shape[0]).view(-1, 1, 1, 1).expand(-1, 3, 2, 2).clone()

    def samples(x):
        return (x[:, 0, 0, 0] * b).round().long()

    def jitter(x, factors, order, apply):
        got["factors"], got["order"], got["jitter"] = factors.clone(), order.clone(), samples(x[apply])
        return x

    def record(name):
        def op(x, *args):
            got[name] = samples(x)
            if name == "blur":
                got["sigma"] = args[0].clone()
            return x
        return op

    monkeypatch.setattr(augment, "resized_crop", crop)
    monkeypatch.setattr(augment, "color_jitter", jitter)
    monkeypatch.setattr(augment, "to_grayscale", record("grey"))
    monkeypatch.setattr(augment, "gaussian_blur", record("blur"))
    monkeypatch.setattr(augment, "solarize", record("solarize"))
    images = torch.zeros(b, 3, height, width, dtype=torch.uint8)
    TensorViews(dataclasses.replace(cfg, n_views=1), MEAN3, STD3, channels=3, in_size=height)(images, _gen(11))
    return got


def _ks(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov distance: the largest gap between the empirical CDFs."""
    values = torch.cat([a, b]).unique()
    cdf = [(torch.searchsorted(x.sort().values, values, right=True).double() / len(x)) for x in (a, b)]
    return (cdf[0] - cdf[1]).abs().max().item()


def _box_stats(boxes: torch.Tensor, height: int, width: int) -> dict[str, torch.Tensor]:
    top, left, h, w = boxes.double().unbind(1)
    movable = (h < height) & (w < width)  # relative positions exist where the box can move both ways
    rel_top = (top / (height - h))[movable]
    rel_left = (left / (width - w))[movable]
    return {"area": h * w / (height * width), "log_ratio": torch.log(w / h), "top": rel_top, "left": rel_left,
            "corr": torch.corrcoef(torch.stack([rel_top, rel_left]))[0, 1]}


def test_crop_boxes_follow_torchvision_random_resized_crop(monkeypatch):
    """Area, log aspect ratio, relative top and left positions, and the top/left correlation of the crop
    boxes TensorViews draws, against RandomResizedCrop.get_params over as many draws."""
    import torchvision.transforms as T

    height, width = 24, 40
    cfg = ViewConfig(**{**PLAIN, "crop_scale": [0.08, 1.0], "crop_ratio": [3 / 4, 4 / 3]})
    ours = _box_stats(_capture(monkeypatch, cfg, height=height, width=width)["boxes"], height, width)
    image = torch.zeros(3, height, width)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        theirs = torch.tensor([T.RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3])
                               for _ in range(N_DRAWS)], dtype=torch.float64)
    theirs = _box_stats(theirs, height, width)
    for key in ("area", "log_ratio", "top", "left"):
        # 20,000 draws a side: distances above 0.02 have a chance below 1 in 1,000 for equal distributions
        assert _ks(ours[key], theirs[key]) < 0.02, key
    assert abs(ours["corr"] - theirs["corr"]) < 0.05 and abs(ours["corr"]) < 0.05


def test_flip_jitter_grey_blur_solarize_happen_at_their_rates_independently(monkeypatch):
    rates = {"flip": 0.3, "jitter": 0.6, "grey": 0.25, "blur": 0.4, "solarize": 0.15}
    cfg = ViewConfig(size=8, hflip_p=rates["flip"], jitter_p=rates["jitter"], grayscale_p=rates["grey"],
                     blur_p=rates["blur"], solarize_p=rates["solarize"], blur_kernel_frac=0.5)
    got = _capture(monkeypatch, cfg)
    chosen = {name: torch.zeros(N_DRAWS, dtype=torch.bool) for name in rates}
    chosen["flip"] = got["flip"]
    for name in ("jitter", "grey", "blur", "solarize"):
        chosen[name][got[name]] = True
    tolerance = 4 * (0.25 / N_DRAWS) ** 0.5  # four binomial standard deviations at p = 1/2
    for name, p in rates.items():
        assert abs(chosen[name].double().mean().item() - p) < tolerance, name
    names = list(rates)
    for i, a in enumerate(names):  # each decision has its own draw: joint rates are products
        for b in names[i + 1:]:
            joint = (chosen[a] & chosen[b]).double().mean().item()
            assert abs(joint - rates[a] * rates[b]) < tolerance, (a, b)
    # every one of the 24 orders of the four jitter ops, equally often
    counts = torch.unique(got["order"], dim=0, return_counts=True)[1]
    assert len(counts) == 24 and (counts.double() / N_DRAWS - 1 / 24).abs().max() < tolerance


@pytest.mark.parametrize("change, ranges", [
    ({"jitter_strength": 0.5}, [(0.6, 1.4), (0.6, 1.4), (0.6, 1.4), (-0.1, 0.1)]),
    # s = 1.5: 1 - 0.8 s < 0, clamped to 0 as ColorJitter does; hue 0.2 s = 0.3
    ({"jitter_strength": 1.5}, [(0.0, 2.2), (0.0, 2.2), (0.0, 2.2), (-0.3, 0.3)]),
    ({"jitter": [0.4, 0.3, 0.2, 0.1]}, [(0.6, 1.4), (0.7, 1.3), (0.8, 1.2), (-0.1, 0.1)]),
])
def test_jitter_factors_are_uniform_over_their_settings_ranges(monkeypatch, change, ranges):
    factors = _capture(monkeypatch, ViewConfig(size=8, jitter_p=1.0, **change))["factors"].double()
    for column, (low, high) in zip(factors.T, ranges):
        width = high - low
        assert column.min() >= low - 1e-6 and column.max() <= high + 1e-6
        assert column.min() < low + 0.002 * width and column.max() > high - 0.002 * width  # reaches both ends
        assert abs(column.mean().item() - (low + high) / 2) < 0.01 * width  # uniform: the middle on average
        assert abs(column.std().item() - width / 12 ** 0.5) < 0.01 * width


@pytest.mark.parametrize("size", [32, 112])
def test_blur_sigma_is_the_224_px_range_scaled_by_size(monkeypatch, size):
    sigma = _capture(monkeypatch, ViewConfig(size=size, blur_p=1.0, blur_sigma=[0.1, 2.0]))["sigma"].double()
    low, high = 0.1 * size / 224, 2.0 * size / 224
    assert len(sigma) == N_DRAWS and sigma.min() >= low - 1e-7 and sigma.max() <= high + 1e-7
    assert sigma.min() < low + 0.002 * (high - low) and sigma.max() > high - 0.002 * (high - low)
    assert abs(sigma.mean().item() - (low + high) / 2) < 0.01 * (high - low)
