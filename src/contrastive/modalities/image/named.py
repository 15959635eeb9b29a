"""Named image datasets, each registered as a loader ``(cfg: DataConfig) -> Splits``.

Files are read in their original formats from ``data.data_dir`` (``data/locate.py``); torchvision downloads them
there only when they are missing and ``data.download`` is on, so nothing touches the network when the files
exist. Normalisation statistics are the datasets' usual published constants
(per-pixel mean and std of the training images); digits', being computed, are over all 1797 images.
"""

from __future__ import annotations

import dataclasses
import gzip
import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from contrastive.config import DataConfig
from contrastive.data.datasets import Splits
from contrastive.data.locate import data_root, locate, torchvision_download
from contrastive.errors import DataError
from contrastive.modalities.base import register_dataset
from contrastive.modalities.image.datasets import Concat, TensorImages, decide_in_memory, resize_images

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

MNIST_STATS = ((0.1307,), (0.3081,))
FASHION_MNIST_STATS = ((0.2860,), (0.3530,))
CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
STL10_STATS = ((0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713))

DIGIT_CLASSES = [str(d) for d in range(10)]
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot"]
STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]

IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
STL10_FILES = ("train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin", "unlabeled_X.bin")

# (channels, native side, pretraining images) of each dataset, known without reading it: what settings
# derived from the data (contrastive.autoconfig) start from.
SHAPES = {"digits": (1, 8, 1437), "fashion-mnist": (1, 28, 60000), "mnist": (1, 28, 60000),
          "cifar10": (3, 32, 50000), "cifar100": (3, 32, 50000), "stl10": (3, 96, 105000)}
CLASSES = {"digits": 10, "fashion-mnist": 10, "mnist": 10, "cifar10": 10, "cifar100": 100, "stl10": 10}


def _tensor_dataset(pixels: Tensor, labels: Tensor, cfg: DataConfig, *, name: str, classes: list[str],
                    stats: tuple[tuple[float, ...], tuple[float, ...]] | None) -> TensorImages:
    """Served at ``cfg.image_size`` (default: native): resized once here when ``cfg.in_memory`` (unset: when
    the resized set fits, see ``decide_in_memory``), else per item, so a dataset resized up (CIFAR to 224 px)
    need not be held at that size."""
    size = cfg.image_size or pixels.shape[-1]
    if size != pixels.shape[-1] and decide_in_memory(cfg.in_memory, pixels[:, :, :1, :1].numel() * size * size,
                                                     f"{name} ({len(pixels)} images at {size} px)"):
        pixels = resize_images(pixels, size)
    mean, std = stats or (None, None)
    return TensorImages(pixels, labels, name=name, classes=classes, size=size, mean=mean, std=std)


def _official(dataset: str, cfg: DataConfig, train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor],
              classes: list[str], stats: tuple[tuple[float, ...], tuple[float, ...]]) -> Splits:
    train_ds = _tensor_dataset(*train, cfg, name=f"{dataset}/train", classes=classes, stats=stats)
    test_ds = _tensor_dataset(*test, cfg, name=f"{dataset}/test", classes=classes, stats=stats)
    return Splits(train_ds, train_ds, test_ds,
                  note=f"{dataset}: official train/test split ({len(train_ds)}/{len(test_ds)} images)")


# --------------------------------------------------------------------------------------------------
# digits


@register_dataset("digits", "image")
def digits(cfg: DataConfig) -> Splits:
    """scikit-learn's bundled 8x8 digits (1797 images, 0..16 scaled to 0..255), upsampled (bilinear) to
    ``image_size`` (default 32) so random crops have room; a seeded, stratified 80/20 train/test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    raw = load_digits()
    pixels = torch.from_numpy(np.rint(raw.images * (255 / 16)).astype(np.uint8)).unsqueeze(1)  # [1797, 1, 8, 8]
    labels = torch.from_numpy(raw.target).long()
    train_idx, test_idx = train_test_split(np.arange(len(labels)), test_size=0.2, stratify=raw.target,
                                           random_state=cfg.split_seed)
    # Sorted, so each split keeps scikit-learn's order and its positions are stable across runs.
    train_idx, test_idx = torch.from_numpy(np.sort(train_idx)), torch.from_numpy(np.sort(test_idx))
    sized = dataclasses.replace(cfg, image_size=cfg.image_size or 32)
    everything = _tensor_dataset(pixels, labels, sized, name="digits", classes=DIGIT_CLASSES, stats=None)
    train, test = (TensorImages(everything.pixels[idx], labels[idx], name=f"digits/{split}", classes=DIGIT_CLASSES,
                                size=everything.image_size, mean=everything.mean, std=everything.std)
                   for idx, split in ((train_idx, "train"), (test_idx, "test")))
    return Splits(train, train, test, note=f"digits: seeded stratified 80/20 split (seed {cfg.split_seed}: "
                                           f"{len(train)} train / {len(test)} test images)")


# --------------------------------------------------------------------------------------------------
# MNIST-style idx files


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """An idx file of unsigned bytes (plain or .gz) with ``ndim`` dimensions, as an array of that shape."""
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read {path} ({e}); delete it (to download again) or replace it") from None
    # Magic number: two zero bytes, the element type (0x08: unsigned byte), the number of dimensions.
    if len(raw) < 4 + 4 * ndim or raw[:4] != bytes([0, 0, 0x08, ndim]):
        raise DataError(f"{path} is not an idx file of {ndim}-d unsigned bytes (magic {raw[:4].hex()}, expected "
                        f"{bytes([0, 0, 0x08, ndim]).hex()}); delete it (to download again) or replace it")
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    body = raw[4 + 4 * ndim :]
    if len(body) != int(np.prod(dims)):
        raise DataError(f"{path} is truncated: {len(body)} bytes of data for dimensions {list(dims)}")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims).copy()


def _idx_file(folder: Path, stem: str) -> Path | None:
    return next((p for p in (folder / stem, folder / f"{stem}.gz") if p.is_file()), None)


def _has_idx(folder: Path) -> bool:
    return all(_idx_file(folder, stem) for pair in IDX_FILES.values() for stem in pair)


def _read_idx_split(folder: Path, split: str) -> tuple[Tensor, Tensor]:
    """``(images uint8 [N, 1, H, W], labels int64 [N])``."""
    images_path, labels_path = (_idx_file(folder, stem) for stem in IDX_FILES[split])
    images, labels = read_idx(images_path, 3), read_idx(labels_path, 1)
    if len(images) != len(labels):
        raise DataError(f"{images_path} holds {len(images)} images but {labels_path} {len(labels)} labels")
    return torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels).long()


_IDX_EXPECTED = "the idx files (train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, " \
                "t10k-labels-idx1-ubyte; plain or .gz)"


@register_dataset("fashion-mnist", "image")
def fashion_mnist(cfg: DataConfig) -> Splits:
    """Fashion-MNIST's idx files, in data_dir, its torchvision layout FashionMNIST/raw, or the Debian
    package's /usr/share/datasets/fashion-mnist; 60k/10k, 1 channel, 28 px."""
    root = data_root(cfg)
    folder = locate("fashion-mnist", cfg, [root, root / "FashionMNIST" / "raw", DEBIAN_FASHION_MNIST], _has_idx,
                     _IDX_EXPECTED, torchvision_download("FashionMNIST"))
    return _official("fashion-mnist", cfg, _read_idx_split(folder, "train"), _read_idx_split(folder, "test"),
                     FASHION_MNIST_CLASSES, FASHION_MNIST_STATS)


# What CIFAR's batches and the classic mnist.pkl.gz hold besides plain containers: numpy arrays and their dtypes.
# Anything else named in a pickle (os.system, a class of some package) is refused before it is called.
_PICKLE_GLOBALS = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                   ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                   ("numpy._core.multiarray", "scalar")}


class _ArraysOnly(pickle.Unpickler):
    """An unpickler that builds numpy arrays, dtypes and plain containers, and nothing else: a pickle in
    ``data.data_dir`` cannot run code while it is read."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which a dataset pickle never holds (only numpy "
                                         f"arrays): it was not loaded, and nothing in it ran")
        return super().find_class(module, name)


def _load_pickle(f: Any) -> Any:
    return _ArraysOnly(f, encoding="latin1").load()


def _read_mnist_pickle(path: Path) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """The classic mnist.pkl.gz: (train 50k, valid 10k, test 10k) of float32 pixels k/256 -> train = train +
    valid, test, as ``(images uint8 [N, 1, 28, 28], labels int64 [N])``."""
    try:
        with gzip.open(path, "rb") as f:
            parts = _load_pickle(f)
    except (OSError, EOFError, pickle.UnpicklingError, ValueError) as e:
        raise DataError(f"cannot read {path} ({e}); delete it (to download again) or replace it") from None

    def part(x: Any, y: Any) -> tuple[Tensor, Tensor]:
        pixels = np.clip(np.rint(np.asarray(x, dtype=np.float64) * 256), 0, 255).astype(np.uint8)
        return torch.from_numpy(pixels.reshape(-1, 1, 28, 28)), torch.from_numpy(np.asarray(y)).long()

    (tx, ty), (vx, vy), (sx, sy) = (part(*p) for p in parts)
    return (torch.cat([tx, vx]), torch.cat([ty, vy])), (sx, sy)


@register_dataset("mnist", "image")
def mnist(cfg: DataConfig) -> Splits:
    """MNIST from data_dir: the classic mnist.pkl.gz, or the idx files (torchvision's MNIST/raw layout);
    60k/10k, 1 channel, 28 px."""
    root = data_root(cfg)
    places = [root / "mnist.pkl.gz", root / "MNIST" / "raw", root]
    source = locate("mnist", cfg, places, lambda p: p.is_file() if p.name.endswith(".pkl.gz") else _has_idx(p),
                     "mnist.pkl.gz or " + _IDX_EXPECTED, torchvision_download("MNIST"))
    if source.name.endswith(".pkl.gz"):
        train, test = _read_mnist_pickle(source)
    else:
        train, test = _read_idx_split(source, "train"), _read_idx_split(source, "test")
    return _official("mnist", cfg, train, test, DIGIT_CLASSES, MNIST_STATS)


# --------------------------------------------------------------------------------------------------
# CIFAR


def _unpickle(path: Path) -> dict[str, Any]:
    """A CIFAR pickle as a dict with str keys, whether the pickle stored them as str or bytes."""
    try:
        with open(path, "rb") as f:
            d = _load_pickle(f)
    except (OSError, EOFError, pickle.UnpicklingError) as e:
        raise DataError(f"cannot read {path} ({e}); delete it (to download again) or replace it") from None
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


def _read_cifar(files: list[Path], label_key: str) -> tuple[Tensor, Tensor]:
    """``(images uint8 [N, 3, 32, 32], labels int64 [N])`` of the batch files, in order."""
    batches = [_unpickle(p) for p in files]
    images = np.concatenate([np.asarray(b["data"], dtype=np.uint8).reshape(-1, 3, 32, 32) for b in batches])
    labels = np.concatenate([np.asarray(b[label_key], dtype=np.int64) for b in batches])
    return torch.from_numpy(images), torch.from_numpy(labels)


def _cifar(dataset: str, cfg: DataConfig, folder_name: str, train_files: list[str], test_file: str,
           meta: tuple[str, str], label_key: str, tv_class: str,
           stats: tuple[tuple[float, ...], tuple[float, ...]]) -> Splits:
    names = [*train_files, test_file, meta[0]]
    folder = locate(dataset, cfg, [data_root(cfg) / folder_name],
                     lambda p: all((p / n).is_file() for n in names),
                     f"{folder_name}/ ({', '.join(names)})", torchvision_download(tv_class))
    classes = [c.decode() if isinstance(c, bytes) else c for c in _unpickle(folder / meta[0])[meta[1]]]
    return _official(dataset, cfg, _read_cifar([folder / n for n in train_files], label_key),
                     _read_cifar([folder / test_file], label_key), classes, stats)


@register_dataset("cifar10", "image")
def cifar10(cfg: DataConfig) -> Splits:
    """CIFAR-10 in torchvision's python format (data_dir/cifar-10-batches-py); 50k/10k, 32 px."""
    return _cifar("cifar10", cfg, "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch",
                  ("batches.meta", "label_names"), "labels", "CIFAR10", CIFAR10_STATS)


@register_dataset("cifar100", "image")
def cifar100(cfg: DataConfig) -> Splits:
    """CIFAR-100 (fine labels) in torchvision's python format (data_dir/cifar-100-python); 50k/10k, 32 px."""
    return _cifar("cifar100", cfg, "cifar-100-python", ["train"], "test", ("meta", "fine_label_names"),
                  "fine_labels", "CIFAR100", CIFAR100_STATS)


# --------------------------------------------------------------------------------------------------
# STL-10


def _stl10_images(path: Path) -> Tensor:
    """uint8 ``[N, 3, 96, 96]`` memory-mapped from a binary file (read from disk only as it is indexed)."""
    per_image = 3 * 96 * 96
    size = path.stat().st_size
    if size % per_image:
        raise DataError(f"{path} is {size} bytes, not a whole number of 3x96x96 images; delete it (to download "
                        f"again) or replace it")
    # Copy-on-write mapping: writable as torch wants, never written back. Images are stored column-major.
    mapped = np.memmap(path, dtype=np.uint8, mode="c", shape=(size // per_image, 3, 96, 96))
    return torch.from_numpy(mapped).transpose(2, 3)


def _stl10_labels(path: Path) -> Tensor:
    return torch.from_numpy(np.fromfile(path, dtype=np.uint8).astype(np.int64) - 1)  # stored 1..10


@register_dataset("stl10", "image")
def stl10(cfg: DataConfig) -> Splits:
    """STL-10's binary format (data_dir/stl10_binary), 96 px: pretraining on train + unlabeled (5k + 100k,
    the unlabeled with label -1); evaluation on the official train (5k) / test (8k) split. Without
    ``cfg.in_memory`` (or, unset, when they would not fit) the images stay memory-mapped."""
    folder = locate("stl10", cfg, [data_root(cfg) / "stl10_binary"],
                     lambda p: all((p / n).is_file() for n in STL10_FILES),
                     f"stl10_binary/ ({', '.join(STL10_FILES)})", torchvision_download("STL10", split="train"))
    names_file = folder / "class_names.txt"
    classes = names_file.read_text().split() if names_file.is_file() else STL10_CLASSES
    train_x, unlabeled_x, test_x = (_stl10_images(folder / n) for n in ("train_X.bin", "unlabeled_X.bin",
                                                                          "test_X.bin"))
    train_y, test_y = _stl10_labels(folder / "train_y.bin"), _stl10_labels(folder / "test_y.bin")
    if (len(train_x), len(test_x)) != (len(train_y), len(test_y)):
        raise DataError(f"{folder}: image and label files disagree in length "
                        f"(train {len(train_x)}/{len(train_y)}, test {len(test_x)}/{len(test_y)})")
    unlabeled_y = torch.full((len(unlabeled_x),), -1, dtype=torch.long)
    common = dict(classes=classes, stats=STL10_STATS)
    size = cfg.image_size or 96
    if decide_in_memory(cfg.in_memory, (len(train_x) + len(unlabeled_x)) * 3 * size * size,
                        f"stl10/train+unlabeled ({len(train_x) + len(unlabeled_x)} images at {size} px)"):
        # One tensor for train + unlabeled, the train split a view of its head: no second copy of the 5k.
        pixels = torch.empty(len(train_x) + len(unlabeled_x), 3, 96, 96, dtype=torch.uint8)
        pixels[: len(train_x)] = train_x
        pixels[len(train_x) :] = unlabeled_x
        pretrain = _tensor_dataset(pixels, torch.cat([train_y, unlabeled_y]), cfg, name="stl10/train+unlabeled",
                                   **common)
        train = TensorImages(pretrain.pixels[: len(train_x)], train_y, name="stl10/train", classes=classes,
                             size=pretrain.image_size, mean=STL10_STATS[0], std=STL10_STATS[1])
        test = _tensor_dataset(test_x.clone(memory_format=torch.contiguous_format), test_y, cfg,
                               name="stl10/test", **common)
    else:
        train = _tensor_dataset(train_x, train_y, cfg, name="stl10/train", **common)
        unlabeled = _tensor_dataset(unlabeled_x, unlabeled_y, cfg, name="stl10/unlabeled", **common)
        pretrain = Concat([train, unlabeled], name="stl10/train+unlabeled")
        test = _tensor_dataset(test_x, test_y, cfg, name="stl10/test", **common)
    return Splits(pretrain, train, test, note=f"stl10: pretraining on train+unlabeled ({len(pretrain)} images); "
                                              f"evaluation on the official train/test split "
                                              f"({len(train)}/{len(test)})")
