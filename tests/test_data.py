"""Datasets: real file formats written small into tmp_path, pixels and labels checked exactly; no network."""

from __future__ import annotations

import gzip
import logging
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from contrastive.config import DataConfig
from contrastive.data import collate_skip_corrupt, is_labelled
from contrastive.errors import DataError
from contrastive.modalities import load_splits, resolve_dataset
from contrastive.modalities.image.datasets import Subset, TensorImages
from contrastive.modalities.image.folder import open_folder


def data_cfg(name: str | Path = "digits", **kw) -> DataConfig:
    kw = {"num_workers": 0, "download": False, **kw}
    return DataConfig(name=str(name), **kw)


def items(ds) -> list[tuple[torch.Tensor, int, int]]:
    return [ds[i] for i in range(len(ds))]


def assert_same_items(a, b) -> None:
    assert len(a) == len(b)
    for (xa, ya, ia), (xb, yb, ib) in zip(items(a), items(b)):
        assert torch.equal(xa, xb) and (ya, ia) == (yb, ib)


# ------------------------------------------------------------------------------------------------ digits


def sklearn_split(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    tr, te = train_test_split(np.arange(1797), test_size=0.2, stratify=d.target, random_state=seed)
    return np.sort(tr), np.sort(te), d.images, d.target


def test_digits_split_shapes_labels_and_seed():
    s = load_splits(data_cfg())
    assert (len(s.pretrain), len(s.eval_test)) == (1437, 360)
    assert s.pretrain is s.eval_train and "80/20" in s.note
    image, label, index = s.pretrain[7]
    assert image.dtype == torch.uint8 and image.shape == (1, 32, 32) and index == 7
    assert s.eval_test[359][2] == 359
    assert (s.pretrain.channels, s.pretrain.image_size, s.pretrain.num_classes) == (1, 32, 10)
    assert s.pretrain.mean == s.eval_test.mean and 0 < s.pretrain.mean[0] < 1

    tr, te, images, target = sklearn_split(0)
    assert set(tr).isdisjoint(te) and len(set(tr) | set(te)) == 1797
    assert torch.equal(s.pretrain.labels, torch.from_numpy(target[tr]))
    assert torch.equal(s.eval_test.labels, torch.from_numpy(target[te]))

    native = load_splits(data_cfg(image_size=8))  # no upsampling: pixels are sklearn's 0..16 scaled
    expect = np.rint(images[te] * 255 / 16).astype(np.uint8)
    assert torch.equal(native.eval_test.samples[:, 0], torch.from_numpy(expect))

    again, other = load_splits(data_cfg()), load_splits(data_cfg(split_seed=1))
    assert torch.equal(again.eval_test.samples, s.eval_test.samples)
    assert not torch.equal(other.eval_test.labels, s.eval_test.labels)
    assert torch.equal(other.eval_test.labels, torch.from_numpy(target[sklearn_split(1)[1]]))


# ------------------------------------------------------------------------------------------------ named formats


def write_idx(path: Path, array: np.ndarray) -> None:
    raw = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)


def random_split(rng: np.random.Generator, n: int, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    return rng.integers(0, 256, (n, *shape), dtype=np.uint8), rng.integers(0, 10, n).astype(np.uint8)


def write_idx_set(folder: Path, rng: np.random.Generator, gz: bool) -> dict:
    sets = {"train": random_split(rng, 5, (28, 28)), "t10k": random_split(rng, 3, (28, 28))}
    ext = ".gz" if gz else ""
    for prefix, (x, y) in sets.items():
        write_idx(folder / f"{prefix}-images-idx3-ubyte{ext}", x)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{ext}", y)
    return sets


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_idx_round_trip(tmp_path, gz):
    sets = write_idx_set(tmp_path / "FashionMNIST" / "raw", np.random.default_rng(0), gz)  # torchvision's layout
    s = load_splits(data_cfg("fashion-mnist", data_dir=str(tmp_path)))
    for ds, (x, y) in ((s.eval_train, sets["train"]), (s.eval_test, sets["t10k"])):
        assert torch.equal(ds.samples, torch.from_numpy(x).unsqueeze(1))
        assert ds.labels.tolist() == y.tolist()
    assert s.pretrain is s.eval_train and s.pretrain.classes[9] == "Ankle boot"
    assert s.pretrain.mean == (0.2860,) and "official train/test split (5/3" in s.note


def test_idx_resized_in_memory_equals_streaming(tmp_path):
    write_idx_set(tmp_path, np.random.default_rng(1), gz=False)
    eager = load_splits(data_cfg("fashion-mnist", data_dir=str(tmp_path), image_size=32))
    lazy = load_splits(data_cfg("fashion-mnist", data_dir=str(tmp_path), image_size=32, in_memory=False))
    assert eager.eval_test.samples.shape == (3, 1, 32, 32) and lazy.eval_test.samples is None
    assert_same_items(eager.eval_test, lazy.eval_test)


def test_idx_bad_magic_names_file(tmp_path):
    write_idx_set(tmp_path, np.random.default_rng(2), gz=False)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x03" + bytes(20))
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte is not an idx file"):
        load_splits(data_cfg("mnist", data_dir=str(tmp_path)))


def test_mnist_pickle_and_torchvision_layout(tmp_path):
    rng = np.random.default_rng(3)
    parts = [rng.integers(0, 256, (n, 784)) for n in (4, 2, 3)]
    labels = [rng.integers(0, 10, n) for n in (4, 2, 3)]
    with gzip.open(tmp_path / "mnist.pkl.gz", "wb") as f:
        pickle.dump(tuple((p.astype(np.float32) / 256, y) for p, y in zip(parts, labels)), f)
    s = load_splits(data_cfg("mnist", data_dir=str(tmp_path)))
    assert torch.equal(s.eval_train.samples.flatten(1), torch.from_numpy(np.concatenate(parts[:2]).astype(np.uint8)))
    assert s.eval_train.labels.tolist() == np.concatenate(labels[:2]).tolist()
    assert torch.equal(s.eval_test.samples.flatten(1), torch.from_numpy(parts[2].astype(np.uint8)))
    assert s.eval_test.labels.tolist() == labels[2].tolist()

    sets = write_idx_set(tmp_path / "idx" / "MNIST" / "raw", rng, gz=True)
    s = load_splits(data_cfg("mnist", data_dir=str(tmp_path / "idx")))
    assert torch.equal(s.eval_test.samples[:, 0], torch.from_numpy(sets["t10k"][0]))


def test_cifar10_pickles_round_trip(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(4)
    batches = {f"data_batch_{i}": random_split(rng, 2, (3072,)) for i in range(1, 6)}
    batches["test_batch"] = random_split(rng, 3, (3072,))
    for name, (x, y) in batches.items():
        (folder / name).write_bytes(pickle.dumps({"data": x, "labels": y.tolist()}))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))
    s = load_splits(data_cfg("cifar10", data_dir=str(tmp_path)))
    train_x = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)])
    assert torch.equal(s.eval_train.samples, torch.from_numpy(train_x.reshape(10, 3, 32, 32)))
    assert s.eval_train.labels.tolist() == [int(v) for i in range(1, 6) for v in batches[f"data_batch_{i}"][1]]
    # Row layout is 1024 red, 1024 green, 1024 blue values, each row-major.
    x, y = batches["test_batch"]
    image, label, index = s.eval_test[2]
    assert image[1, 0, 5] == x[2, 1024 + 5] and image[2, 31, 31] == x[2, 3071] and (label, index) == (y[2], 2)
    assert s.eval_test.classes == names and s.eval_test.channels == 3 and s.eval_test.mean[0] == 0.4914


def test_cifar100_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    x, y = random_split(np.random.default_rng(6), 4, (3072,))
    for name in ("train", "test"):
        (folder / name).write_bytes(pickle.dumps({b"data": x, b"fine_labels": (y * 9).tolist(), b"coarse_labels": y}))
    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": [f"c{i}".encode() for i in range(100)]}))
    s = load_splits(data_cfg("cifar100", data_dir=str(tmp_path)))
    assert torch.equal(s.eval_test.samples, torch.from_numpy(x.reshape(4, 3, 32, 32)))
    assert s.eval_test.labels.tolist() == (y * 9).tolist() and s.eval_test.classes[99] == "c99"


@pytest.mark.parametrize("in_memory", [True, False])
def test_stl10_binary_pretrain_is_train_plus_unlabeled(tmp_path, in_memory):
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    rng = np.random.default_rng(5)
    arrays = {n: rng.integers(0, 256, (k, 3, 96, 96), dtype=np.uint8) for n, k in
              (("train", 2), ("test", 2), ("unlabeled", 3))}
    for n, x in arrays.items():
        (folder / f"{n}_X.bin").write_bytes(x.transpose(0, 1, 3, 2).tobytes())  # stored column-major
    (folder / "train_y.bin").write_bytes(bytes([3, 10]))  # 1-based on disk
    (folder / "test_y.bin").write_bytes(bytes([1, 2]))
    s = load_splits(data_cfg("stl10", data_dir=str(tmp_path), in_memory=in_memory))
    assert (len(s.pretrain), len(s.eval_train), len(s.eval_test)) == (5, 2, 2)
    assert s.pretrain.labels.tolist() == [2, 9, -1, -1, -1] and s.eval_test.labels.tolist() == [0, 1]
    assert not is_labelled(s.pretrain) and is_labelled(s.eval_train)
    image, label, index = s.pretrain[3]
    assert torch.equal(image, torch.from_numpy(arrays["unlabeled"][1])) and (label, index) == (-1, 3)
    assert torch.equal(s.eval_test[1][0], torch.from_numpy(arrays["test"][1]))


def test_missing_named_files_say_where_and_what_to_do(tmp_path):
    for name, place in (("cifar10", "cifar-10-batches-py"), ("mnist", "mnist.pkl.gz"), ("stl10", "stl10_binary")):
        with pytest.raises(DataError) as e:
            load_splits(data_cfg(name, data_dir=str(tmp_path / "nowhere")))
        assert str(tmp_path / "nowhere" / place) in str(e.value)
        assert "data.data_dir=" in str(e.value) and "data.download=true" in str(e.value)


# ------------------------------------------------------------------------------------------------ folders


def write_png(path: Path, value: int, size: tuple[int, int] = (8, 8)) -> None:
    """A solid RGB image (value, value + 1, value + 2)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, value + 1, value + 2)).save(path)


def labelled_tree(root: Path, per_class: int = 10, classes=("cat", "dog")) -> Path:
    for c, name in enumerate(classes):
        for i in range(per_class):
            write_png(root / name / f"{i:02d}.png", 100 * c + i)
    return root


@pytest.mark.parametrize("in_memory", [True, False])
def test_labelled_folder_pixels_labels_order(tmp_path, in_memory):
    ds = open_folder(labelled_tree(tmp_path / "tree"), data_cfg(in_memory=in_memory))
    assert (len(ds), ds.channels, ds.image_size, ds.classes) == (20, 3, 8, ["cat", "dog"])
    assert ds.labels.tolist() == [0] * 10 + [1] * 10
    image, label, index = ds[13]
    assert image.dtype == torch.uint8 and image.shape == (3, 8, 8) and (label, index) == (1, 13)
    assert image[:, 4, 4].tolist() == [103, 104, 105] and bool((image == image[:, :1, :1]).all())
    mean = np.array([[100 * c + i + k for c in range(2) for i in range(10)] for k in range(3)]).mean(1) / 255
    assert np.allclose(ds.mean, mean) and ds.std[0] > 0


def test_folder_in_memory_and_streaming_identical(tmp_path):
    root = labelled_tree(tmp_path / "tree", per_class=3)
    write_png(root / "dog" / "wide.png", 0, size=(12, 8))
    Image.fromarray(np.tile((np.arange(12) * 20).astype(np.uint8), (8, 1))).save(root / "dog" / "wide.png")
    eager, lazy = (open_folder(root, data_cfg(in_memory=m, num_workers=w)) for m, w in ((True, 1), (False, 0)))
    assert isinstance(eager, TensorImages) and eager.samples.shape == (7, 3, 8, 8)
    assert_same_items(eager, lazy)
    assert eager.mean == pytest.approx(lazy.mean) and eager.std == pytest.approx(lazy.std)
    # 12x8 gray ramp: shorter side is already 8, so the centre crop keeps columns 2..9 exactly.
    assert eager[6][0][0, 0].tolist() == [40, 60, 80, 100, 120, 140, 160, 180]


def test_folder_resized_to_image_size(tmp_path):
    ds = open_folder(labelled_tree(tmp_path / "tree", per_class=2), data_cfg(image_size=16))
    assert ds.samples.shape == (4, 3, 16, 16) and ds[3][0][:, 9, 3].tolist() == [101, 102, 103]


def test_unlabeled_flat_folder_just_works(tmp_path):
    for i in range(5):
        write_png(tmp_path / "flat" / f"img{i}.PNG", 10 * i)  # upper-case extension counts
    (tmp_path / "flat" / "notes.txt").write_text("not an image")
    s = load_splits(data_cfg(tmp_path / "flat"))
    assert len(s.pretrain) == 5 and s.pretrain.labels.tolist() == [-1] * 5
    assert s.pretrain.classes is None and s.pretrain.num_classes is None and not is_labelled(s.pretrain)
    assert s.eval_train is None and s.eval_test is None and "--train-data" in s.note
    assert s.pretrain[2][0][0, 0, 0] == 20


def test_train_test_subfolders(tmp_path):
    labelled_tree(tmp_path / "data" / "train", per_class=4)
    labelled_tree(tmp_path / "data" / "val", per_class=2, classes=("dog",))  # a class missing on the test side
    s = load_splits(data_cfg(tmp_path / "data"))
    assert s.pretrain is s.eval_train and len(s.eval_train) == 8 and len(s.eval_test) == 2
    assert s.eval_test.classes == ["cat", "dog"] and s.eval_test.labels.tolist() == [1, 1]
    assert "val/" in s.note


@pytest.mark.parametrize("in_memory", [True, False])
def test_holdout_is_stratified_and_seeded(tmp_path, in_memory):
    root = labelled_tree(tmp_path / "tree")
    s = load_splits(data_cfg(root, holdout=0.2, in_memory=in_memory))
    assert (len(s.pretrain), len(s.eval_test)) == (16, 4) and s.pretrain is s.eval_train
    assert s.eval_test.labels.tolist() == [0, 0, 1, 1]
    assert s.note == f"held out 20% of {root} (seed 0, 4 images) for evaluation"
    held = [int(x[0][0, 0, 0]) for x in items(s.eval_test)]
    rest = [int(x[0][0, 0, 0]) for x in items(s.pretrain)]
    assert sorted(held + rest) == [100 * c + i for c in range(2) for i in range(10)]
    assert [x[2] for x in items(s.eval_test)] == [0, 1, 2, 3]
    assert isinstance(s.eval_test, TensorImages if in_memory else Subset)
    assert s.eval_test.mean == pytest.approx(s.pretrain.mean)

    again = load_splits(data_cfg(root, holdout=0.2, in_memory=not in_memory))
    assert_same_items(again.eval_test, s.eval_test)
    others = [[int(x[0][0, 0, 0]) for x in items(load_splits(data_cfg(root, holdout=0.2, split_seed=k)).eval_test)]
              for k in (1, 2, 3)]
    assert any(o != held for o in others)


def test_train_and_test_data_overrides(tmp_path):
    for i in range(4):
        write_png(tmp_path / "flat" / f"{i}.png", i)
    labelled = labelled_tree(tmp_path / "tree")
    s = load_splits(data_cfg(tmp_path / "flat", train_data=str(labelled)))
    assert len(s.pretrain) == 4 and (len(s.eval_train), len(s.eval_test)) == (18, 2) and "held out 10%" in s.note

    test = labelled_tree(tmp_path / "test", per_class=1)
    s = load_splits(data_cfg(labelled, test_data=str(test)))
    assert len(s.pretrain) == len(s.eval_train) == 20 and s.eval_test.labels.tolist() == [0, 1]

    with pytest.raises(DataError, match="no labels"):
        load_splits(data_cfg(tmp_path / "flat", test_data=str(test)))
    with pytest.raises(DataError, match="3-channel"):
        load_splits(data_cfg("digits", train_data=str(labelled)))


def test_resolve_dataset_holds_out_a_single_folder(tmp_path):
    s = resolve_dataset(str(labelled_tree(tmp_path / "tree")), data_cfg(holdout=0.5))
    assert (len(s.eval_train), len(s.eval_test)) == (10, 10)


# ------------------------------------------------------------------------------------------------ errors


def corrupt_folder(root: Path) -> Path:
    for name in ("a", "b", "c"):
        write_png(root / f"{name}.png", 7)
    (root / "x.jpg").write_bytes(b"this is not a jpeg at all")
    return root


def test_corrupt_image_is_named_in_both_modes(tmp_path):
    root = corrupt_folder(tmp_path / "bad")
    with pytest.raises(DataError, match="skip_corrupt=true") as e:
        open_folder(root, data_cfg(num_workers=1))  # in memory: at load time
    assert str(root / "x.jpg") in str(e.value)
    ds = open_folder(root, data_cfg(in_memory=False))
    assert ds[0][0].shape == (3, 8, 8)
    with pytest.raises(DataError, match="fix or remove it") as e:
        ds[3]
    assert str(root / "x.jpg") in str(e.value)


def test_skip_corrupt(tmp_path, caplog):
    root = corrupt_folder(tmp_path / "bad")
    with caplog.at_level(logging.WARNING, logger="contrastive.data"):
        eager = open_folder(root, data_cfg(skip_corrupt=True))
    assert len(eager) == 3 and "skipped 1 unreadable image(s)" in caplog.text and "x.jpg" in caplog.text

    lazy = open_folder(root, data_cfg(skip_corrupt=True, in_memory=False))
    assert len(lazy) == 4 and lazy[3] is None
    (images, labels, indices), skipped = next(iter(DataLoader(lazy, batch_size=4, collate_fn=collate_skip_corrupt)))
    assert skipped == 1 and images.shape == (3, 3, 8, 8) and indices.tolist() == [0, 1, 2]
    assert labels.tolist() == [-1, -1, -1] and collate_skip_corrupt([None, None]) == (None, 2)
    assert lazy.mean == pytest.approx(eager.mean)


def test_missing_and_empty_paths(tmp_path):
    with pytest.raises(DataError, match="does not exist") as e:
        load_splits(data_cfg(tmp_path / "no-such-folder"))
    assert str(tmp_path / "no-such-folder") in str(e.value)
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(DataError, match="no images"):
        load_splits(data_cfg(tmp_path / "empty"))


# ------------------------------------------------------------------------------------------------ odd folders


def test_hidden_and_non_image_files_are_ignored_and_counted(tmp_path, caplog):
    root = labelled_tree(tmp_path / "tree", per_class=3)
    (root / "cat" / ".DS_Store").write_bytes(b"\0\1")
    (root / "cat" / "._00.png").write_bytes(b"AppleDouble")  # macOS metadata: an image's name, not an image
    (root / ".thumbnails").mkdir()
    write_png(root / ".thumbnails" / "t.png", 1)  # a hidden folder is no class
    (root / "dog" / "notes.txt").write_text("not an image")
    (root / "README.md").write_text("about the data")
    with caplog.at_level(logging.INFO, logger="contrastive.data"):
        ds = open_folder(root, data_cfg())
    assert len(ds) == 6 and ds.classes == ["cat", "dog"]
    assert "ignored 3 hidden file(s) or folder(s)" in caplog.text and "ignored 2 non-image file(s)" in caplog.text


def test_symlinked_files_and_folders_are_followed(tmp_path):
    real = labelled_tree(tmp_path / "real", per_class=2)
    root = tmp_path / "linked"
    (root / "cat").mkdir(parents=True)
    (root / "cat" / "a.png").symlink_to(real / "cat" / "00.png")
    (root / "dog").symlink_to(real / "dog", target_is_directory=True)
    (root / "dog_more").mkdir()
    (root / "dog_more" / "loop").symlink_to(root, target_is_directory=True)  # a link back up: entered once
    write_png(root / "dog_more" / "x.png", 50)
    ds = open_folder(root, data_cfg())
    assert ds.classes == ["cat", "dog", "dog_more"] and ds.labels.tolist() == [0, 1, 1, 2, 2, 2, 2]
    assert ds[0][0][:, 0, 0].tolist() == [0, 1, 2] and ds[2][0][:, 0, 0].tolist() == [101, 102, 103]


def test_mixed_sizes_and_modes_decode_at_the_median_side(tmp_path):
    for i, (size, mode) in enumerate([((40, 30), "RGB"), ((20, 20), "L"), ((64, 48), "RGBA"), ((30, 50), "P")]):
        (tmp_path / "mixed").mkdir(exist_ok=True)
        Image.new(mode, size).save(tmp_path / "mixed" / f"{i}.png")
    ds = open_folder(tmp_path / "mixed", data_cfg())
    assert ds.samples.shape == (4, 3, 30, 30)  # shorter sides 30, 20, 48, 30: median (low) 30


def test_a_folder_larger_than_memory_streams(tmp_path, monkeypatch, caplog):
    from contrastive import machine
    from contrastive.modalities.image.folder import FolderImages

    root = labelled_tree(tmp_path / "tree", per_class=5)  # 10 images, 3 x 8 x 8 bytes each decoded
    monkeypatch.setattr(machine, "available_memory", lambda device: (3 * 8 * 8 * 10 * 2 - 1, "a test's limit"))
    with caplog.at_level(logging.WARNING, logger="contrastive.data"):
        ds = open_folder(root, data_cfg())
    assert isinstance(ds, FolderImages) and ds.samples is None and "data.in_memory=false" in caplog.text
    monkeypatch.setattr(machine, "available_memory", lambda device: (3 * 8 * 8 * 10 * 2, "a test's limit"))
    assert isinstance(open_folder(root, data_cfg()), TensorImages)
    assert isinstance(open_folder(root, data_cfg(in_memory=False)), FolderImages)  # a setting wins


def test_without_evaluation_a_labelled_folder_is_pretrained_on_whole(tmp_path):
    root = labelled_tree(tmp_path / "tree")
    s = load_splits(data_cfg(root), evaluate=False)
    assert len(s.pretrain) == 20 and s.eval_train is None and s.eval_test is None and "none held out" in s.note
    assert len(load_splits(data_cfg(root)).pretrain) == 18


class _RunsCode:
    """What a crafted pickle holds: unpickling it calls ``os.system``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_crafted_dataset_pickle_is_refused_and_runs_nothing(tmp_path):
    import gzip

    marker = tmp_path / "ran"
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(4)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x, y = random_split(rng, 2, (3072,))
        (folder / name).write_bytes(pickle.dumps({"data": x, "labels": y.tolist()}))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": _RunsCode(marker)}))
    with pytest.raises(DataError, match=r"batches.meta .*names posix.system, which a dataset pickle never holds"):
        load_splits(data_cfg("cifar10", data_dir=str(tmp_path), download=False))
    with gzip.open(tmp_path / "mnist.pkl.gz", "wb") as f:
        pickle.dump(_RunsCode(marker), f)
    with pytest.raises(DataError, match=r"mnist.pkl.gz .*names posix.system"):
        load_splits(data_cfg("mnist", data_dir=str(tmp_path), download=False))
    assert not marker.exists()  # refused before anything in them was called


def test_16_bit_and_exif_rotated_images_decode_as_a_viewer_shows_them(tmp_path):
    from PIL import Image

    from contrastive.modalities.image.folder import decode_image

    grey = np.full((8, 8), 32768, dtype=np.uint16)  # mid-grey in 16 bits: 128 in 8, not PIL's clipped 255
    grey[:, :4] = 1024  # a dark left half: 4 in 8 bits
    Image.fromarray(grey).save(tmp_path / "deep.png")
    got = decode_image(tmp_path / "deep.png", 8)
    assert got[:, :, 4:].unique().tolist() == [128] and got[:, :, :4].unique().tolist() == [4]
    # a 4 x 2 image, stored landscape, with EXIF orientation 6 (shown rotated 90 degrees clockwise: portrait)
    pixels = np.repeat((np.arange(8).reshape(2, 4) * 30).astype(np.uint8)[..., None], 3, axis=2)  # all distinct
    img = Image.fromarray(pixels)
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(tmp_path / "turned.png", exif=exif)
    shown = decode_image(tmp_path / "turned.png", 2)  # portrait 2 x 4 -> shorter side 2, centre crop of 2 rows
    upright = np.rot90(pixels, k=-1)  # 90 degrees clockwise: [4, 2]
    assert shown.shape == (3, 2, 2)
    assert torch.equal(shown, torch.from_numpy(upright[1:3].copy()).permute(2, 0, 1))
    unturned = torch.from_numpy(pixels[:, 1:3].copy()).permute(2, 0, 1)  # what ignoring the EXIF tag gives
    assert not torch.equal(shown, unturned)


def test_images_of_one_flat_colour_are_refused_naming_the_cause(tmp_path):
    from PIL import Image

    from contrastive import api
    from contrastive.configure import resolve_config

    (tmp_path / "flat").mkdir()
    for i in range(8):
        Image.new("RGB", (16, 16), (100, 100, 100)).save(tmp_path / "flat" / f"{i}.png")
    cfg = resolve_config(recipe={}, tree={"data": {"name": str(tmp_path / "flat")},
                                          "train": {"output": str(tmp_path / "run"), "batch_size": 4, "epochs": 1},
                                          "eval": {"enabled": False}})
    with pytest.raises(DataError, match=r"channel 0 has one value in every pixel of every image \(std 0\)"):
        api.pretrain(cfg)
