"""Image-caption data: the three captions file formats, folders of captioned images, and Flickr8k (a small
stand-in archive, and the shared flickr8k-128.tar.gz when present)."""

import io
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from shared_data import shared_file

from contrastive.config import DataConfig
from contrastive.errors import ConfigError, DataError
from contrastive.modalities import detect
from contrastive.modalities.image_text.captions import (
    CAPTION_FILES,
    FLICKR8K_SHAPE,
    ImageCaptions,
    caption_file,
    flickr8k,
    is_caption_folder,
    open_caption_folder,
    read_captions,
)
from contrastive.registry import lookup

# ------------------------------------------------------------------------------------------------ captions files


def test_token_file_groups_captions_by_image_in_file_order(tmp_path):
    f = tmp_path / "Flickr8k.token.txt"
    f.write_bytes(b"a.jpg#0\tA dog runs .\r\nb.jpg#0\tTwo cats .\r\n\r\na.jpg#1\t  The dog is brown .  \r\n"
                  b"c.jpg.1#0\tA train station\r\n")
    assert read_captions(f) == {"a.jpg": ["A dog runs .", "The dog is brown ."], "b.jpg": ["Two cats ."],
                                "c.jpg.1": ["A train station"]}


def test_plain_tsv_with_and_without_header(tmp_path):
    f = tmp_path / "captions.tsv"
    f.write_text("x.png\tfirst caption\ny.png\tsecond # not an id\nx.png\tthird\n")
    assert read_captions(f) == {"x.png": ["first caption", "third"], "y.png": ["second # not an id"]}
    f.write_text("\ufeffimage\tcaption\nsub/x.png\tone\n")  # a byte-order mark and a header
    assert read_captions(f) == {"sub/x.png": ["one"]}


def test_csv_with_header_and_quoted_captions(tmp_path):
    f = tmp_path / "captions.txt"
    f.write_text('image,caption\n'
                 '1000268201_693b08cb0e.jpg,A child in a pink dress .\n'
                 '\n'
                 '1000268201_693b08cb0e.jpg,"A girl, in pink, climbs stairs ."\n'
                 '1001773457_577c3a7d70.jpg,"A dog says ""woof"" ."\n')
    assert read_captions(f) == {"1000268201_693b08cb0e.jpg": ["A child in a pink dress .",
                                                              "A girl, in pink, climbs stairs ."],
                                "1001773457_577c3a7d70.jpg": ['A dog says "woof" .']}


@pytest.mark.parametrize("name, text, message", [
    ("tok.txt", "a.jpg#0\tone\na.jpg#1 two\n", r"tok.txt, line 2: expected name#n<TAB>caption, got 1"),
    ("tok.txt", "a.jpg#0\tone\n\nb.jpg\ttwo\n", r"tok.txt, line 3: caption id 'b.jpg' is not <image name>#<n>"),
    ("tok.txt", "a.jpg#0\tone\na.jpg#1\t \n", r"tok.txt, line 2: empty caption for a.jpg"),
    ("c.tsv", "a.png\tone\na.png\ttwo\tthree\n", r"c.tsv, line 2: expected name<TAB>caption, got 3"),
    ("c.csv", "image,caption\na.png,one\n\na.png,two, three\n", r"c.csv, line 4: 3 field\(s\) where 2 .*quote"),
    ("c.csv", "image,caption\na.png,\"\"\n", r"c.csv, line 2: empty caption for a.png"),
    ("c.txt", "just some words\n", r"c.txt, line 1: not a captions file"),
    ("c.txt", "\n  \n", r"c.txt: no captions \(the file is empty or blank\)"),
    ("c.csv", "image,caption\n", r"c.csv: no captions, only a header"),
])
def test_malformed_lines_name_the_file_and_the_line(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(DataError, match=message):
        read_captions(tmp_path / name)


def test_caption_file_prefers_the_first_of_the_known_names(tmp_path):
    assert caption_file(tmp_path) is None and not is_caption_folder(tmp_path)
    (tmp_path / "Flickr8k.token.txt").write_text("a.jpg#0\tx\n")
    assert caption_file(tmp_path) == tmp_path / "Flickr8k.token.txt" and is_caption_folder(tmp_path)
    (tmp_path / "captions.csv").write_text("image,caption\na.jpg,x\n")
    assert caption_file(tmp_path) == tmp_path / "captions.csv"
    assert not is_caption_folder(tmp_path / "captions.csv")
    assert CAPTION_FILES[0] == "captions.txt"


# ------------------------------------------------------------------------------------------------ caption folders


def _pixels(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (4, 4, 3), dtype=np.uint8)


@pytest.fixture
def captioned(tmp_path) -> Path:
    """root/captions.csv naming Images/a.png, Images/b.png and c.png (by name or path); root/Images/extra.png
    has no caption."""
    root = tmp_path / "pairs"
    (root / "Images").mkdir(parents=True)
    for seed, path in enumerate(["Images/a.png", "Images/b.png", "c.png", "Images/extra.png"]):
        Image.fromarray(_pixels(seed)).save(root / path)
    (root / "captions.csv").write_text('image,caption\nc.png,a grey square\nImages/b.png,"noise, mostly"\n'
                                       'a.png,first of a\na.png,second of a\n')
    return root


def test_caption_folder_pairs_every_named_image_with_its_captions(captioned, caplog):
    with caplog.at_level(logging.INFO, logger="contrastive.data"):
        ds = open_caption_folder(captioned, DataConfig(name=str(captioned), num_workers=0))
    assert "skipped 1 image(s) that captions.csv gives no caption" in caplog.text
    assert isinstance(ds, ImageCaptions) and ds.modality == "image-text" and ds.classes is None
    assert ds.image_names == ["Images/b.png", "a.png", "c.png"]  # sorted by the names the file gives
    assert ds.captions == [["noise, mostly"], ["first of a", "second of a"], ["a grey square"]]
    assert ds.image_size == 4 and ds.labels.tolist() == [-1, -1, -1]
    image, label, index = ds[1]
    assert torch.equal(image, torch.from_numpy(_pixels(0)).permute(2, 0, 1)) and (label, index) == (-1, 1)
    every = np.stack([_pixels(s) for s in (1, 0, 2)]).reshape(-1, 3) / 255  # per-channel, over all pixels
    assert ds.mean == pytest.approx(every.mean(0), abs=1e-12) and ds.std == pytest.approx(every.std(0), abs=1e-12)

    part = ds.take(torch.tensor([2, 0]))
    assert isinstance(part, ImageCaptions) and part.image_names == ["c.png", "Images/b.png"]
    assert part.captions == [["a grey square"], ["noise, mostly"]]
    assert torch.equal(part.pixels, ds.pixels[[2, 0]]) and (part.mean, part.std) == (ds.mean, ds.std)


def test_caption_folder_decodes_at_the_configured_size(captioned):
    Image.new("RGB", (6, 4), (200, 10, 30)).save(captioned / "c.png")  # a solid colour stays itself when resized
    ds = open_caption_folder(captioned, DataConfig(name=str(captioned), image_size=2, num_workers=0))
    assert ds.pixels.shape == (3, 3, 2, 2)
    assert ds.pixels[2].flatten(1).tolist() == [[200] * 4, [10] * 4, [30] * 4]


def test_an_image_named_but_missing_is_an_error_naming_both(captioned):
    with open(captioned / "captions.csv", "a") as f:
        f.write("d.png,not there\n")
    with pytest.raises(DataError, match=r"captions.csv names 1 image\(s\) that are not under .*pairs: d.png"):
        open_caption_folder(captioned, DataConfig(name=str(captioned), num_workers=0))


def test_a_name_found_twice_must_be_given_as_a_path(captioned):
    Image.fromarray(_pixels(9)).save(captioned / "a.png")  # a.png now at the top too: the top one is meant
    ds = open_caption_folder(captioned, DataConfig(name=str(captioned), num_workers=0))
    assert torch.equal(ds.pixels[1], torch.from_numpy(_pixels(9)).permute(2, 0, 1))
    (captioned / "More").mkdir()
    (captioned / "a.png").rename(captioned / "More" / "a.png")  # now in two sub-folders: neither is meant
    with pytest.raises(DataError, match=r"names a.png, and .*pairs holds 2 images of that name"):
        open_caption_folder(captioned, DataConfig(name=str(captioned), num_workers=0))


def test_unreadable_images_stop_or_are_skipped_with_their_captions(captioned):
    (captioned / "Images" / "b.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"cannot read image .*b.png"):
        open_caption_folder(captioned, DataConfig(name=str(captioned), num_workers=0))
    ds = open_caption_folder(captioned, DataConfig(name=str(captioned), num_workers=0, skip_corrupt=True))
    assert ds.image_names == ["a.png", "c.png"] and ds.captions == [["first of a", "second of a"], ["a grey square"]]
    assert torch.equal(ds.pixels[0], torch.from_numpy(_pixels(0)).permute(2, 0, 1))


def test_caption_folders_are_always_in_memory(captioned, tmp_path):
    with pytest.raises(ConfigError, match="data.in_memory=false"):
        open_caption_folder(captioned, DataConfig(name=str(captioned), in_memory=False))
    with pytest.raises(DataError, match=r"no captions file \(captions.txt"):
        open_caption_folder(tmp_path, DataConfig(name=str(tmp_path)))


# ------------------------------------------------------------------------------------------------ Flickr8k

COLOURS = {"3.jpg": (250, 0, 0), "1.jpg": (0, 250, 0), "2.jpg": (0, 0, 250), "4.jpg": (120, 120, 120),
           "9.jpg": (50, 60, 70)}  # 9.jpg is on no list


def write_flickr8k(root: Path, *, archive: bool) -> None:
    """A stand-in of flickr8k-128/ (solid-colour 16 px JPEGs; lists 3, 1, 2 train and 4 dev), packed with the
    text files after the images, as the shared archive has them."""
    files = {f"images/{n}": _jpeg(c) for n, c in COLOURS.items()}
    files["Flickr8k.token.txt"] = b"".join(f"{n}#{k}\tcaption {k} of {n}\n".encode()
                                           for n in ("1.jpg", "2.jpg", "3.jpg", "4.jpg", "5.jpg") for k in range(2))
    files["Flickr_8k.trainImages.txt"] = b"3.jpg\n1.jpg\n2.jpg\n"
    files["Flickr_8k.devImages.txt"] = b"4.jpg\n"
    if not archive:
        for name, data in files.items():
            (root / "flickr8k-128" / name).parent.mkdir(parents=True, exist_ok=True)
            (root / "flickr8k-128" / name).write_bytes(data)
        return
    with tarfile.open(root / "flickr8k-128.tar.gz", "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"flickr8k-128/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _jpeg(colour: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(out, "JPEG", quality=95)
    return out.getvalue()


@pytest.mark.parametrize("archive", [True, False])
def test_flickr8k_reads_the_lists_in_order_with_their_captions(tmp_path, archive):
    write_flickr8k(tmp_path, archive=archive)
    splits = flickr8k(DataConfig(name="flickr8k", data_dir=str(tmp_path), num_workers=0 if archive else 2))
    train, dev = splits.pretrain, splits.eval_test
    assert splits.eval_train is None and "dev" in splits.note and "test images are not in the archive" in splits.note
    assert train.image_names == ["3.jpg", "1.jpg", "2.jpg"] and dev.image_names == ["4.jpg"]
    assert train.captions[0] == ["caption 0 of 3.jpg", "caption 1 of 3.jpg"]
    assert dev.captions == [["caption 0 of 4.jpg", "caption 1 of 4.jpg"]]
    assert train.image_size == 128 and train.pixels.shape == (3, 3, 128, 128)
    for ds in (train, dev):
        for image, name in zip(ds.pixels, ds.image_names):
            colour = torch.tensor(COLOURS[name]).view(3, 1, 1)
            assert (image.int() - colour).abs().max() <= 3
    # the statistics of the training images (three pure colours), on both sides
    assert train.mean == pytest.approx((250 / 765,) * 3, abs=0.01)
    assert (dev.mean, dev.std) == (train.mean, train.std)


def test_flickr8k_refuses_incomplete_files_and_says_where_it_looked(tmp_path):
    with pytest.raises(DataError, match=r"neither .*flickr8k-128.tar.gz nor .*flickr8k-128/ exists.*data.data_dir"):
        flickr8k(DataConfig(name="flickr8k", data_dir=str(tmp_path)))
    write_flickr8k(tmp_path, archive=False)
    (tmp_path / "flickr8k-128" / "images" / "2.jpg").unlink()
    with pytest.raises(DataError, match=r"1 image\(s\) of Flickr_8k.trainImages.txt have no image file \(2.jpg\)"):
        flickr8k(DataConfig(name="flickr8k", data_dir=str(tmp_path), num_workers=0))


def test_flickr8k_is_a_registered_image_text_dataset():
    assert lookup("datasets", "flickr8k") is flickr8k
    assert detect(DataConfig(name="flickr8k")).name == "image-text"
    assert FLICKR8K_SHAPE == (3, 128, 6000)


def test_flickr8k_shared_archive():
    archive = shared_file("flickr8k-128.tar.gz")
    splits = flickr8k(DataConfig(name="flickr8k", data_dir=str(archive.parent), image_size=32, num_workers=0))
    train, dev = splits.pretrain, splits.eval_test
    assert (len(train), len(dev)) == (6000, 1000) and train.pixels.shape[1:] == (3, 32, 32)
    assert all(len(c) == 5 for c in train.captions + dev.captions)
    assert not set(train.image_names) & set(dev.image_names)
    with tarfile.open(archive) as tar:
        member = tar.getmember("flickr8k-128/Flickr_8k.devImages.txt")
        first = tar.extractfile(member).read().decode().split("\n")[0].strip()
        tokens = tar.extractfile("flickr8k-128/Flickr8k.token.txt").read().decode().split("\n")
    line = next(t for t in tokens if t.startswith(f"{first}#0\t"))
    assert dev.image_names[0] == first and dev.captions[0][0] == line.split("\t")[1].strip()
    assert (dev.mean, dev.std) == (train.mean, train.std)
