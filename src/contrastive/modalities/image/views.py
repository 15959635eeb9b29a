"""The SimCLR view recipe (Chen et al. 2020, Appendix A), in two interchangeable backends.

"Random crop with resize and flip, colour distortion (jitter with probability 0.8, grayscale with
probability 0.2), Gaussian blur": per view, in this order, then per-channel normalisation.

- ``TensorViews`` ("tensor"): batched ops on uint8 batches on the training device, every random
  parameter drawn per sample from a caller's ``torch.Generator``, so a seed fixes the views bit for bit.
- ``PILViews`` ("pil"): the same recipe as per-image torchvision transforms, for DataLoader workers;
  its randomness is torch's global generator (seeded per worker by the DataLoader).

Views come in groups (``views.groups``): each group has its own count, size and recipe, so BYOL's
asymmetric pair and SwAV's and DINO's multi-crop (2 global + 6 or 8 small local crops) are configs, not
code. A group is made in one batched pass over the batch per view, never per image. The image modality
(``modalities/image``) validates a ``ViewConfig`` and builds the backend it names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.transforms import v2

from contrastive.config import ViewConfig
from contrastive.data import augment
from contrastive.errors import ConfigError

BACKENDS = ("tensor", "pil")

# Columns of the uniform draws [B, _DRAWS] that TensorViews takes per view, in one generator call so
# that every view consumes the same amount of randomness whatever the outcomes.
_TRIES = 10  # RandomResizedCrop's tries before the centre-crop fallback
_AREA = slice(0, _TRIES)
_LOG_RATIO = slice(_TRIES, 2 * _TRIES)
_TOP, _LEFT, _FLIP, _JITTER = 2 * _TRIES, 2 * _TRIES + 1, 2 * _TRIES + 2, 2 * _TRIES + 3
_FACTORS = slice(2 * _TRIES + 4, 2 * _TRIES + 8)
_ORDER = slice(2 * _TRIES + 8, 2 * _TRIES + 12)
_GREY, _BLUR, _SIGMA, _SOLARIZE = 2 * _TRIES + 12, 2 * _TRIES + 13, 2 * _TRIES + 14, 2 * _TRIES + 15
_DRAWS = 2 * _TRIES + 16


def _check_range(cfg: ViewConfig, name: str, low: float, high: float, *, open_low: bool = False) -> tuple[float, float]:
    value = getattr(cfg, name)
    ok = isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value)
    if ok:
        lo, hi = float(value[0]), float(value[1])
        ok = (lo > low if open_low else lo >= low) and lo <= hi <= high
    if not ok:
        bounds = f"{'(' if open_low else '['}{low}, {high}]"
        raise ConfigError(f"views.{name}: expected [low, high] with low <= high, both in {bounds}; got {value!r}")
    return lo, hi


def check_view_config(cfg: ViewConfig) -> None:
    """Raise a ConfigError naming the first ``views.*`` field that is out of range."""
    if cfg.backend not in BACKENDS:
        raise ConfigError(f"views.backend: unknown backend {cfg.backend!r}; valid values: {', '.join(BACKENDS)}")
    if not isinstance(cfg.n_views, int) or cfg.n_views < 1:
        raise ConfigError(f"views.n_views: expected an integer >= 1, got {cfg.n_views!r}")
    if cfg.size is not None and cfg.size < 1:
        raise ConfigError(f"views.size: expected a side >= 1 or null, got {cfg.size!r}")
    _check_range(cfg, "crop_scale", 0.0, 1.0, open_low=True)
    _check_range(cfg, "crop_ratio", 0.0, float("inf"), open_low=True)
    _check_range(cfg, "blur_sigma", 0.0, float("inf"), open_low=True)
    for name in ("hflip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p"):
        p = getattr(cfg, name)
        if not 0.0 <= p <= 1.0:
            raise ConfigError(f"views.{name}: a probability must lie in [0, 1], got {p!r}")
    # Hue jitter is 0.2 s and torchvision's hue shift must stay within half a turn.
    if not 0.0 <= cfg.jitter_strength <= 2.5:
        raise ConfigError(f"views.jitter_strength: expected s in [0, 2.5] (hue 0.2 s <= 0.5), "
                          f"got {cfg.jitter_strength!r}")
    if cfg.jitter is not None:
        j = cfg.jitter
        ok = (isinstance(j, (list, tuple)) and len(j) == 4 and all(isinstance(v, (int, float)) for v in j)
              and min(j[:3]) >= 0 and 0 <= j[3] <= 0.5)
        if not ok:
            raise ConfigError(f"views.jitter: expected [brightness, contrast, saturation, hue], the first three "
                              f">= 0 and hue in [0, 0.5]; got {j!r}")
    if not 0.0 <= cfg.blur_kernel_frac <= 1.0:
        raise ConfigError(f"views.blur_kernel_frac: expected a fraction in [0, 1], got {cfg.blur_kernel_frac!r}")


# The fields a view group may set for itself; the others (backend, n_views, groups) are the views section's.
GROUP_FIELDS = ("size", "crop_scale", "crop_ratio", "hflip_p", "jitter_p", "jitter_strength", "jitter", "grayscale_p",
                "blur_p", "blur_sigma", "blur_kernel_frac", "solarize_p")


@dataclass(frozen=True)
class ViewGroup:
    """``count`` views made with the settings ``view`` (a ViewConfig of this group alone); global or local."""

    count: int
    is_global: bool
    view: ViewConfig


def view_groups(cfg: ViewConfig, in_size: int,
                method_groups: Callable[[int], list[dict]] | None = None) -> list[ViewGroup]:
    """The groups of views, global ones first (in the order given otherwise).

    ``cfg.groups`` when set; else ``method_groups(side)`` (a method's paper groups, for global views of
    ``side = cfg.size or in_size``; local sizes in proportion) when given; else one global
    group of ``cfg.n_views`` views. A group's fields default to the views section's; a group sets ``global``,
    or is global when its side is the largest of all groups (multi-crop's large crops; local ones are
    smaller). Global groups must share one side, the global size
    (:func:`global_size`). ConfigErrors name ``views.groups[i].<field>``.
    """
    check_view_config(cfg)
    base = dataclasses.replace(cfg, groups=None)
    if cfg.groups is None and method_groups is None:
        return [ViewGroup(cfg.n_views, True, base)]
    if cfg.n_views != ViewConfig.n_views:
        raise ConfigError(f"views.n_views={cfg.n_views} applies only to views without groups; give each of "
                          f"views.groups a count instead")
    given = cfg.groups if cfg.groups is not None else method_groups(cfg.size or in_size)
    where = "views.groups" if cfg.groups is not None else "the method's view groups"
    if cfg.groups is None:
        _refuse_overridden(cfg, given)
    if not isinstance(given, list) or not given:
        raise ConfigError(f"{where}: expected a non-empty list of groups such as [{{count: 2}}], got {given!r}")
    groups = []
    for i, group in enumerate(given):
        at = f"{where}[{i}]"
        if not isinstance(group, dict):
            raise ConfigError(f"{at}: expected a mapping with count, global and view fields, got {group!r}")
        unknown = sorted(set(group) - {"count", "global", *GROUP_FIELDS})
        if unknown:
            raise ConfigError(f"{at}.{unknown[0]}: not a field of a view group; valid: count, global, "
                              f"{', '.join(GROUP_FIELDS)}")
        count = group.get("count", 1)
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise ConfigError(f"{at}.count: expected an integer >= 1, got {count!r}")
        is_global = group.get("global")
        if is_global is not None and not isinstance(is_global, bool):
            raise ConfigError(f"{at}.global: expected true or false, got {is_global!r}")
        try:
            from contrastive.config import build_dataclass, to_dict

            view = build_dataclass(ViewConfig, {**to_dict(base), **{k: group[k] for k in GROUP_FIELDS if k in group},
                                                "n_views": count}, "views")
            check_view_config(view)
        except ConfigError as e:
            raise ConfigError(f"{at}: {e}") from None
        groups.append(ViewGroup(count, is_global, view))
    largest = max(g.view.size or in_size for g in groups)  # unmarked groups of the largest side are global
    groups = [g if g.is_global is not None else dataclasses.replace(g, is_global=(g.view.size or in_size) == largest)
              for g in groups]
    groups.sort(key=lambda g: not g.is_global)  # stable: global groups first, each side in its given order
    global_size(groups, in_size, where)
    return groups


def _refuse_overridden(cfg: ViewConfig, method_groups: list[dict]) -> None:
    """A views field set away from its default that a method's paper groups set per group would be ignored:
    refuse it, naming both, rather than train with what the user did not ask for."""
    defaults = ViewConfig()
    for name in GROUP_FIELDS[1:]:  # not size: views.size is the global side the groups are built from
        mine = getattr(cfg, name)
        theirs = [g[name] for g in method_groups if isinstance(g, dict) and name in g]
        if theirs and mine != getattr(defaults, name) and any(v != mine for v in theirs):
            raise ConfigError(f"views.{name}={mine!r} would be ignored: the method's view groups set {name} per "
                              f"group ({', '.join(repr(v) for v in theirs)}); to change it, give views.groups "
                              f"(the method's groups are in its docs and recipes)")


def global_size(groups: list[ViewGroup], in_size: int, where: str = "views.groups") -> int:
    """The side of the global views (evaluation preprocesses to it): one for every global group."""
    sides = {g.view.size or in_size for g in groups if g.is_global}
    if not sides:
        raise ConfigError(f"{where}: no group is global; mark one `global: true` (the views evaluation and "
                          f"DINO's teacher see)")
    if len(sides) > 1:
        raise ConfigError(f"{where}: the global groups have different sizes {sorted(sides)}; global views share "
                          f"one size, the one evaluation uses")
    return sides.pop()


def view_shapes(groups: list[ViewGroup], in_size: int) -> tuple[list[int], int]:
    """(the side of every view, in batch order; how many of them are global)."""
    return ([g.view.size or in_size for g in groups for _ in range(g.count)],
            sum(g.count for g in groups if g.is_global))


def jitter_amounts(cfg: ViewConfig) -> tuple[float, float, float, float]:
    """(brightness, contrast, saturation, hue): ``views.jitter``, else SimCLR's (0.8s, 0.8s, 0.8s, 0.2s)."""
    if cfg.jitter is not None:
        return tuple(float(v) for v in cfg.jitter)  # type: ignore[return-value]
    s = cfg.jitter_strength
    return (0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)


def blur_kernel_size(frac: float, size: int) -> int:
    """Odd kernel side ``frac * size`` rounded down then up to odd (SimCLR: 23 for 224 px)."""
    k = int(frac * size)
    return k if k % 2 == 1 else k + 1


def _check_stats(mean: Sequence[float], std: Sequence[float], channels: int) -> None:
    if channels not in (1, 3):
        raise ValueError(f"views need 1 or 3 channels, got {channels}")
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"mean and std need one value per channel ({channels}), got {list(mean)} and {list(std)}")


def _normalise(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """[B, C, H, W] in [0, 1] -> (x - mean) / std per channel, in place."""
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return x.sub_(m).div_(s)


class TensorViews:
    """Batched views of uint8 batches, on the batch's device, with per-sample parameters.

    ``views = TensorViews(cfg, mean, std, channels=3, in_size=32)(images, generator)``: images uint8
    [B, C, H, W], generator on the images' device; returns one float32 tensor [B, C, S_g, S_g] per view of
    every group (:func:`view_groups`, global groups first), S_g the group's size (default ``cfg.size`` or
    ``in_size``), normalised by mean/std. ``n_global`` views come first and are global.
    """

    def __init__(self, cfg: ViewConfig, mean: Sequence[float], std: Sequence[float], channels: int, in_size: int,
                 method_groups: Callable[[int], list[dict]] | None = None):
        _check_stats(mean, std, channels)
        self.cfg = cfg
        self.mean, self.std = list(mean), list(std)
        self.channels = channels
        self.groups = [_TensorGroup(g, in_size) for g in view_groups(cfg, in_size, method_groups)]
        self.n_global = sum(g.count for g in self.groups if g.is_global)
        self.size = global_size([g.group for g in self.groups], in_size)
        self._constants: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def _on(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """(mean, std) [1, C, 1, 1] on ``device``, made once: a tensor built from Python numbers at every view
        would be a blocking copy to an accelerator."""
        if device not in self._constants:
            mean = torch.tensor(self.mean, device=device).view(1, -1, 1, 1)
            std = torch.tensor(self.std, device=device).view(1, -1, 1, 1)
            self._constants[device] = (mean, std)
        return self._constants[device]

    def __call__(self, images: Tensor, generator: torch.Generator, index: Tensor | None = None) -> list[Tensor]:
        # ``index`` (the batch's dataset indices) is not needed for crops of images
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != self.channels:
            raise ValueError(f"TensorViews expects uint8 images [B, {self.channels}, H, W], "
                             f"got {images.dtype} {tuple(images.shape)}")
        x = images.float().div_(255.0)
        mean, std = self._on(x.device)
        return [group.view(x, generator, self.channels).sub_(mean).div_(std)
                for group in self.groups for _ in range(group.count)]


class _TensorGroup:
    """One group's recipe: crop, flip, colour jitter, grey, blur, solarize, batched over the images."""

    def __init__(self, group: ViewGroup, in_size: int):
        cfg = group.view
        self.group, self.cfg, self.count, self.is_global = group, cfg, group.count, group.is_global
        self.size = cfg.size or in_size
        self.scale = (float(cfg.crop_scale[0]), float(cfg.crop_scale[1]))
        self.ratio = (float(cfg.crop_ratio[0]), float(cfg.crop_ratio[1]))
        self.kernel_size = blur_kernel_size(cfg.blur_kernel_frac, self.size)
        # Sigma is given for 224 px images; scale it so the blur covers the same fraction of the view.
        self.sigma = (cfg.blur_sigma[0] * self.size / 224, cfg.blur_sigma[1] * self.size / 224)
        self.jitter = jitter_amounts(cfg)  # brightness, contrast, saturation, hue
        self._ranges: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def _jitter_range(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """The jitter factor ranges (low, high) [4], made once per device. ColorJitter's ranges:
        [max(0, 1 - a), 1 + a] for the blends, [-a, a] for the hue shift."""
        if device not in self._ranges:
            amount = torch.tensor(self.jitter, device=device)
            low = torch.cat([(1 - amount[:3]).clamp(min=0), -amount[3:]])
            high = torch.cat([1 + amount[:3], amount[3:]])
            self._ranges[device] = (low, high)
        return self._ranges[device]

    def view(self, x: Tensor, generator: torch.Generator, channels: int) -> Tensor:
        """One view of x [B, C, H, W] in [0, 1] -> [B, C, S, S] in [0, 1], not yet normalised.

        Per-sample choices (jitter or not, grey, blur, solarize) go through ``augment.apply_where``: indexed
        on the CPU, masked elsewhere, so a view on a GPU never waits for the device. A probability of 0
        skips its op, which draws nothing of its own (every draw comes from the one ``u`` below).
        """
        cfg = self.cfg
        b, _, height, width = x.shape
        u = torch.rand(b, _DRAWS, generator=generator, device=x.device)
        boxes = augment.sample_crop_boxes(u[:, _AREA], u[:, _LOG_RATIO], u[:, _TOP], u[:, _LEFT],
                                          height, width, self.scale, self.ratio)
        v = augment.resized_crop(x, boxes, u[:, _FLIP] < cfg.hflip_p, self.size)

        if cfg.jitter_p > 0:
            low, high = self._jitter_range(x.device)
            factors = low + (high - low) * u[:, _FACTORS]
            order = u[:, _ORDER].argsort(dim=1)  # a uniformly random permutation per sample
            v = augment.color_jitter(v, factors, order, u[:, _JITTER] < cfg.jitter_p)
        if channels == 3 and cfg.grayscale_p > 0:
            v = augment.apply_where(v, u[:, _GREY] < cfg.grayscale_p, augment.to_grayscale)
        if self.kernel_size > 1 and cfg.blur_p > 0:
            sigma = self.sigma[0] + (self.sigma[1] - self.sigma[0]) * u[:, _SIGMA]
            v = augment.apply_where(v, u[:, _BLUR] < cfg.blur_p,
                                    lambda s, sig: augment.gaussian_blur(s, sig, self.kernel_size), sigma)
        if cfg.solarize_p > 0:
            v = augment.apply_where(v, u[:, _SOLARIZE] < cfg.solarize_p, augment.solarize)
        return v


def eval_preprocess(images: Tensor, mean: Sequence[float], std: Sequence[float], size: int) -> Tensor:
    """uint8 [B, C, H, W] -> float32 [B, C, size, size]: antialiased bilinear resize when the side
    differs, then per-channel normalisation; the deterministic input of evaluation and embedding."""
    x = images.float().div_(255.0)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        x = x.clamp_(0.0, 1.0)  # antialiased bilinear can overshoot slightly
    return _normalise(x, mean, std)


class PILViews:
    """The same recipe as per-image torchvision transforms on PIL images, for DataLoader workers.

    ``PILViews(cfg, mean, std, channels, in_size)(image)``: image uint8 [C, H, W] -> one float32 tensor
    [C, S_g, S_g] per view of every group, global groups first, as :class:`TensorViews`. Saturation, hue and
    grayscale are left out for 1 channel (no-ops there).
    """

    per_item = True  # applied to each image in the loader's workers, not to batches

    def __init__(self, cfg: ViewConfig, mean: Sequence[float], std: Sequence[float], channels: int, in_size: int,
                 method_groups: Callable[[int], list[dict]] | None = None):
        _check_stats(mean, std, channels)
        self.cfg = cfg
        groups = view_groups(cfg, in_size, method_groups)
        self.n_global = sum(g.count for g in groups if g.is_global)
        self.size = global_size(groups, in_size)
        self.transforms = [(g.count, _pil_transform(g.view, mean, std, channels, in_size)) for g in groups]

    def __call__(self, image: Tensor) -> list[Tensor]:
        pil = v2.functional.to_pil_image(image)
        return [transform(pil) for count, transform in self.transforms for _ in range(count)]


def _pil_transform(cfg: ViewConfig, mean: Sequence[float], std: Sequence[float], channels: int,
                   in_size: int) -> v2.Compose:
    size = cfg.size or in_size
    b, c, s, h = jitter_amounts(cfg)
    if channels == 3:
        jitter = v2.ColorJitter(brightness=b, contrast=c, saturation=s, hue=h)
    else:
        jitter = v2.ColorJitter(brightness=b, contrast=c)
    steps: list[Any] = [
        v2.RandomResizedCrop(size, scale=tuple(cfg.crop_scale), ratio=tuple(cfg.crop_ratio), antialias=True),
        v2.RandomHorizontalFlip(cfg.hflip_p),
        v2.RandomApply([jitter], p=cfg.jitter_p),
    ]
    if channels == 3:
        steps.append(v2.RandomGrayscale(cfg.grayscale_p))
    kernel = blur_kernel_size(cfg.blur_kernel_frac, size)
    if kernel > 1:
        sigma = (cfg.blur_sigma[0] * size / 224, cfg.blur_sigma[1] * size / 224)
        steps.append(v2.RandomApply([v2.GaussianBlur(kernel, sigma=sigma)], p=cfg.blur_p))
    # On 8-bit PIL images the 0.5 threshold is 128: pixels >= 127.5 / 255.
    steps += [
        v2.RandomSolarize(128, p=cfg.solarize_p),
        v2.PILToTensor(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(mean), list(std)),
    ]
    return v2.Compose(steps)


def make_views(cfg: ViewConfig, mean: Sequence[float], std: Sequence[float], channels: int, in_size: int,
               method_groups: Callable[[int], list[dict]] | None = None) -> TensorViews | PILViews:
    """The view maker ``cfg.backend`` names, after checking every ``views.*`` field and group."""
    check_view_config(cfg)
    cls = TensorViews if cfg.backend == "tensor" else PILViews
    return cls(cfg, mean, std, channels, in_size, method_groups)
