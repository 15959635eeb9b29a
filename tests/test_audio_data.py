"""Audio data: WAV reading, folders of WAV files, the spoken-digits split and labels, the random windows, the
modality of a dataset, the audio preprocessing and the MFCC baseline."""

import json
import math
import tarfile
from dataclasses import asdict

import numpy as np
import pytest
import torch
from scipy.io import wavfile

from contrastive.config import DataConfig
from contrastive.configure import resolve_config
from contrastive.errors import ConfigError, DataError
from contrastive.modalities import detect, load_splits, modality_of
from contrastive.modalities.audio import AUDIO, AudioPreprocess
from contrastive.modalities.audio.clips import AudioClips, AudioViews, clip_lengths, pad_clips, read_wav
from contrastive.modalities.image.preprocess import Preprocess
from contrastive.runs import read_preprocess

RATE = 8000


def tone(freq: float, n: int, amplitude: float = 0.5) -> np.ndarray:
    return (amplitude * 32767 * np.sin(2 * math.pi * freq * np.arange(n) / RATE)).astype(np.int16)


def write_fsdd(folder, digits=(0, 1), speakers=("ann", "bob"), indices=range(7)):
    """A small stand-in of fsdd/recordings: {digit}_{speaker}_{index}.wav, a tone per digit, lengths varying."""
    folder.mkdir(parents=True)
    for d in digits:
        for s, speaker in enumerate(speakers):
            for i in indices:
                wavfile.write(folder / f"{d}_{speaker}_{i}.wav", RATE, tone(300 + 200 * d + 30 * s, 900 + 100 * i))


# ------------------------------------------------------------------------------------------------ reading


def test_wav_files_read_back_as_float_mono_in_their_full_range(tmp_path):
    x = np.array([0, 1, -1, 32767, -32768, 1000], dtype=np.int16)
    wavfile.write(tmp_path / "a.wav", RATE, x)
    rate, samples = read_wav(tmp_path / "a.wav")
    assert rate == RATE and samples.dtype == np.float32
    assert np.array_equal(samples, x.astype(np.float32) / 32768)
    stereo = np.stack([x, np.zeros_like(x)], axis=1)  # [T, 2]: averaged into one channel
    wavfile.write(tmp_path / "s.wav", 16000, stereo)
    rate, samples = read_wav(tmp_path / "s.wav")
    assert rate == 16000 and np.array_equal(samples, x.astype(np.float32) / 32768 / 2)
    wavfile.write(tmp_path / "u.wav", RATE, np.array([0, 128, 255], dtype=np.uint8))
    assert np.array_equal(read_wav(tmp_path / "u.wav")[1], np.array([-1, 0, 127 / 128], dtype=np.float32))


def test_an_unreadable_or_empty_wav_is_named(tmp_path):
    (tmp_path / "bad.wav").write_bytes(b"RIFF not really")
    with pytest.raises(DataError, match=r"cannot read WAV file .*bad.wav.*data.skip_corrupt"):
        read_wav(tmp_path / "bad.wav")
    wavfile.write(tmp_path / "empty.wav", RATE, np.zeros(0, dtype=np.int16))
    with pytest.raises(DataError, match="empty.wav holds no samples"):
        read_wav(tmp_path / "empty.wav")


def test_a_wav_folder_is_audio_with_class_sub_folders_as_labels_and_nan_padding(tmp_path):
    for cls, n in (("hi", [300, 500]), ("lo", [400])):
        (tmp_path / cls).mkdir()
        for i, length in enumerate(n):
            wavfile.write(tmp_path / cls / f"{i}.wav", RATE, tone(440, length))
    assert detect(DataConfig(name=str(tmp_path))).name == "audio" and detect(DataConfig()).name == "image"
    splits = load_splits(DataConfig(name=str(tmp_path)), evaluate=False)
    ds = splits.pretrain
    assert isinstance(ds, AudioClips) and modality_of(ds).name == "audio" and ds.classes == ["hi", "lo"]
    assert ds.labels.tolist() == [0, 0, 1] and ds.samples.shape == (3, 1, 500) and ds.sample_rate == RATE
    assert clip_lengths(ds.clips).tolist() == [300, 500, 400]
    assert torch.isnan(ds.clips[0, 0, 300:]).all() and not torch.isnan(ds.clips[0, 0, :300]).any()
    assert torch.equal(ds.clips[2, 0, :400], torch.from_numpy(tone(440, 400)).float() / 32768)
    clip, label, index = ds[2]
    assert clip.shape == (1, 500) and (label, index) == (1, 2)


def test_a_wav_folder_holds_out_per_class_and_keeps_the_clips_in_memory(tmp_path):
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(5):
            wavfile.write(tmp_path / cls / f"{i}.wav", RATE, tone(440, 200 + 100 * i))
    s = load_splits(DataConfig(name=str(tmp_path), holdout=0.4))
    assert isinstance(s.eval_test, AudioClips) and isinstance(s.pretrain, AudioClips)
    assert sorted(s.eval_test.labels.tolist()) == [0, 0, 1, 1] and len(s.pretrain) == 6
    # each side is padded to its own longest clip, and keeps the whole set's statistics
    assert s.eval_test.samples.shape[-1] == int(clip_lengths(s.eval_test.clips).max())
    assert s.eval_test.mean == s.pretrain.mean


def test_clips_at_different_sample_rates_are_refused_naming_both(tmp_path):
    wavfile.write(tmp_path / "a.wav", 8000, tone(440, 100))
    wavfile.write(tmp_path / "b.wav", 16000, tone(440, 100))
    with pytest.raises(DataError, match=r"a.wav is sampled at 8000 Hz but .*b.wav at 16000 Hz.*resample"):
        load_splits(DataConfig(name=str(tmp_path)), evaluate=False)


# ------------------------------------------------------------------------------------------------ spoken-digits


def _fsdd_cfg(root, **kw):
    return DataConfig(name="spoken-digits", data_dir=str(root), **kw)


def test_spoken_digits_tests_on_index_0_to_4_with_digit_and_speaker_labels(tmp_path):
    write_fsdd(tmp_path / "fsdd" / "recordings")
    s = load_splits(_fsdd_cfg(tmp_path))
    # 2 digits x 2 speakers: indices 0-4 test (20 clips), 5-6 train (8)
    assert (len(s.pretrain), len(s.eval_test)) == (8, 20) and s.eval_train is s.pretrain
    assert s.pretrain.classes == [str(d) for d in range(10)] and s.pretrain.label == "digit"
    # name order: 0_ann_5, 0_ann_6, 0_bob_5, 0_bob_6, 1_ann_5, ...
    assert s.pretrain.labels.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert s.pretrain.labelings["speaker"][0].tolist() == [0, 0, 1, 1, 0, 0, 1, 1]
    assert s.pretrain.labelings["speaker"][1] == ["ann", "bob"]
    lengths = clip_lengths(s.pretrain.clips).tolist()
    assert lengths == [1400, 1500] * 4  # indices 5 and 6
    assert sorted(set(clip_lengths(s.eval_test.clips).tolist())) == [900, 1000, 1100, 1200, 1300]
    speakers = load_splits(_fsdd_cfg(tmp_path, label="speaker"))
    assert speakers.pretrain.classes == ["ann", "bob"] and speakers.eval_train is speakers.pretrain
    assert speakers.eval_test.labels.tolist() == [0] * 5 + [1] * 5 + [0] * 5 + [1] * 5
    assert torch.equal(speakers.pretrain.clips.nan_to_num(7.0), s.pretrain.clips.nan_to_num(7.0))
    with pytest.raises(ConfigError, match="data.label=gender: spoken-digits/train has the labellings digit, speaker"):
        load_splits(_fsdd_cfg(tmp_path, label="gender"))
    with pytest.raises(ConfigError, match="data.label=speaker: digits.* a single labelling"):
        load_splits(DataConfig(name="digits", label="speaker"))


def test_spoken_digits_reads_the_archive_as_the_folder(tmp_path):
    write_fsdd(tmp_path / "unpacked" / "fsdd" / "recordings")
    with tarfile.open(tmp_path / "fsdd-recordings.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "unpacked" / "fsdd", arcname="fsdd")
    a, b = load_splits(_fsdd_cfg(tmp_path)), load_splits(_fsdd_cfg(tmp_path / "unpacked"))
    for x, y in ((a.pretrain, b.pretrain), (a.eval_test, b.eval_test)):
        # NaN is never equal to itself: the padding is compared as a number
        assert torch.equal(x.clips.nan_to_num(7.0), y.clips.nan_to_num(7.0)) and torch.equal(x.labels, y.labels)
    assert a.pretrain.mean == b.pretrain.mean


def test_spoken_digits_missing_says_where_it_looked_and_that_nothing_is_downloaded(tmp_path):
    with pytest.raises(DataError, match=r"neither .*fsdd-recordings.tar.gz nor .*fsdd/recordings/ exists.*not "
                                        r"downloaded.*data.data_dir"):
        load_splits(_fsdd_cfg(tmp_path))


# ------------------------------------------------------------------------------------------------ views


def _clips():
    return pad_clips([np.linspace(-1, 1, n, dtype=np.float32) for n in (50, 200, 120)])  # [3, 1, 200]


def test_audio_views_are_windows_inside_the_clip_and_repeat_under_a_seed():
    clips = _clips()
    views = AudioViews(2, 80, [0.0, 0.0], mean=[0.1], std=[0.5])
    a = views(clips, torch.Generator().manual_seed(3))
    b = views(clips, torch.Generator().manual_seed(3))
    c = views(clips, torch.Generator().manual_seed(4))
    assert len(a) == 2 and a[0].shape == (3, 1, 80)
    for x, y in zip(a, b):
        assert torch.equal(x.nan_to_num(9.0), y.nan_to_num(9.0))
    assert not torch.equal(a[1][1:].nan_to_num(9.0), c[1][1:].nan_to_num(9.0))
    for view in a:
        raw = view * 0.5 + 0.1  # undo the normalisation
        # clip 0 (50 samples) is shorter than the window: it starts it, NaN padding follows
        assert torch.allclose(raw[0, 0, :50], clips[0, 0, :50], atol=1e-6) and torch.isnan(raw[0, 0, 50:]).all()
        for i, n in ((1, 200), (2, 120)):  # longer clips: a contiguous run of the clip, wholly inside it
            start = int(torch.argmin((clips[i, 0, :n - 79] - raw[i, 0, 0]).abs()))
            assert torch.allclose(raw[i, 0], clips[i, 0, start:start + 80], atol=1e-6)


def test_audio_views_gain_scales_each_window_within_its_range():
    clips = pad_clips([np.ones(100, dtype=np.float32)] * 64)
    views = AudioViews(1, 100, [-6.0, 6.0], mean=[0.0], std=[1.0])
    gains = views(clips, torch.Generator().manual_seed(0))[0][:, 0, 0]
    db = 20 * torch.log10(gains)
    assert db.min() >= -6 - 1e-4 and db.max() <= 6 + 1e-4 and db.std() > 2  # spread over the range, not constant
    assert torch.equal(views(clips, torch.Generator().manual_seed(0))[0][:, 0].std(1), torch.zeros(64))


@pytest.mark.parametrize("change, match", [({"views": {"backend": "pil"}}, "views.backend=pil"),
                                           ({"views": {"groups": [{"count": 2}]}}, "views.groups"),
                                           ({"modalities": {"audio": {"window": 0}}}, "modalities.audio.window"),
                                           ({"modalities": {"audio": {"gain_db": [3.0, -3.0]}}},
                                            "modalities.audio.gain_db")])
def test_bad_audio_view_settings_are_named(change, match):
    clips = AudioClips(_clips(), {"class": (torch.full((3,), -1), None)}, name="c", sample_rate=RATE)
    tree = {"method": {"name": "cpc-audio"}, "backbone": {"name": "cpc_audio_conv"}}
    with pytest.raises(ConfigError, match=match):
        AUDIO.views(resolve_config(recipe={}, tree={**tree, **change}), clips)
    with pytest.raises(ConfigError, match="view groups are crops of images"):  # BYOL's paper views
        AUDIO.views(resolve_config(recipe={}, tree={"method": {"name": "byol"}, "backbone": tree["backbone"]}), clips)


# ------------------------------------------------------------------------------------------------ evaluation side


def test_audio_preprocessing_round_trips_and_refuses_other_data(tmp_path):
    pre = AudioPreprocess(RATE, (0.5,), (2.0,))
    assert read_preprocess(asdict(pre), "x") == pre
    image = Preprocess(1, 16, (0.5,), (0.2,))
    assert read_preprocess(asdict(image), "x") == image
    old = {k: v for k, v in asdict(image).items() if k != "modality"}  # written before preprocessing said its kind
    assert read_preprocess(old, "x") == image
    clips = _clips()
    out = pre(clips)
    assert out.shape == (3, 1, 200) and torch.equal(out[1], (clips[1] - 0.5) / 2.0)
    assert pre(clips[[0, 2]]).shape == (2, 1, 120)  # cut after the batch's longest clip
    ds = AudioClips(clips, {"class": (torch.zeros(3), None)}, name="x", sample_rate=16000)
    with pytest.raises(DataError, match="trained on 8000 Hz audio; x is 16000 Hz audio: resample"):
        modality_of(ds).for_encoder(ds, pre)
    with pytest.raises(DataError, match="trained on image data; x holds audio data"):
        modality_of(ds).for_encoder(ds, image)


def test_mfcc_baseline_is_librosas_statistics_of_each_clips_own_samples():
    librosa = pytest.importorskip("librosa")
    from contrastive.modalities.audio import mfcc_features

    rng = np.random.default_rng(0)
    raw = [rng.standard_normal(n).astype(np.float32) * 0.1 for n in (900, 1600, 1200)]
    ds = AudioClips(pad_clips(raw), {"class": (torch.tensor([0, 1, 0]), ["a", "b"])}, name="x", sample_rate=RATE)
    feats, labels = mfcc_features(ds, n_mfcc=13)
    assert feats.shape == (3, 26) and labels.tolist() == [0, 1, 0]
    for i, clip in enumerate(raw):  # the padding is left out: the clip alone gives the same row
        m = librosa.feature.mfcc(y=clip, sr=RATE, n_mfcc=13, n_fft=256, hop_length=80, n_mels=40)
        assert torch.allclose(feats[i], torch.from_numpy(np.concatenate([m.mean(1), m.std(1)])), atol=1e-4)


# ------------------------------------------------------------------------------------------------ derived settings


@pytest.mark.slow
def test_a_wav_folder_without_a_recipe_gets_the_methods_recipe_and_settings_from_its_clips(tmp_path, monkeypatch):
    """`contrastive pretrain --method cpc-audio --data <WAV folder> --epochs 1`: the paper's recipe, with the window,
    the encoder's strides, its width and the batch derived from 8 kHz clips of 0.1-0.2 s on a CPU."""
    from contrastive.cli import main
    from contrastive.modalities import audio

    for cls, freq in (("lo", 300), ("hi", 900)):
        (tmp_path / "clips" / cls).mkdir(parents=True)
        for i in range(24):
            wavfile.write(tmp_path / "clips" / cls / f"{i}.wav", RATE, tone(freq + 10 * i, 800 + 40 * i))
    folder = str(tmp_path / "clips")
    cfg = resolve_config(tree={"method": {"name": "cpc-audio"}, "data": {"name": folder}},
                         overrides=["train.device=cpu"])
    assert cfg.auto["recipe"].startswith("cpc-audio.yaml: the method's recipe for sound")
    # 90% of the clips are at most 1,640 samples (0.205 s), shorter than the paper's 1.28 s (10,240 samples at 8 kHz):
    # the window is that length rounded up to whole 10 ms frames (80 samples)
    lengths = sorted(800 + 40 * i for i in range(24) for _ in range(2))
    longest = math.ceil(lengths[int(0.9 * len(lengths))] / 80) * 80
    assert AUDIO.settings(cfg).window == longest == 1680
    assert "90% of them fit whole" in cfg.auto["modalities.audio.window"]
    # 10 ms frames at 8 kHz: the paper's strides without the last (downsampling 80), 64 channels on a CPU
    assert cfg.backbone == {"name": "cpc_audio_conv", "widths": [64] * 4, "kernels": [10, 8, 4, 4],
                            "strides": [5, 4, 2, 2]}
    assert cfg.train.epochs == audio.CPU_MAX_EPOCHS and cfg.train.batch_size == 8  # 43 clips (5 held out): 4 steps
    assert "over 43 clips" in cfg.auto["train.batch_size"]
    monkeypatch.chdir(tmp_path)
    assert main(["pretrain", "--method", "cpc-audio", "--data", folder, "--epochs", "1", "--output", "run",
                 "train.progress=false"]) == 0
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["modality"] == "audio" and res["steps"] == 43 // 8 and 0 <= res["knn_top1"] <= 1
    assert "mfcc_knn_top1" in res
    with pytest.raises(ConfigError, match="simclr does not train on it; methods for audio data: cpc-audio"):
        resolve_config(tree={"data": {"name": folder}}, overrides=["train.device=cpu"])


def test_float_wavs_with_samples_that_are_not_finite_are_refused_and_loud_ones_named_once(tmp_path, caplog):
    bad = np.zeros(100, dtype=np.float32)
    bad[10] = np.nan
    wavfile.write(tmp_path / "nan.wav", RATE, bad)
    with pytest.raises(DataError, match=r"nan.wav holds samples that are not finite numbers"):
        read_wav(tmp_path / "nan.wav")
    (tmp_path / "loud").mkdir()
    for i in range(3):
        wavfile.write(tmp_path / "loud" / f"{i}.wav", RATE, np.full(100, 2.0 if i else 0.5, dtype=np.float32))
    with caplog.at_level("WARNING", logger="contrastive.data"):
        load_splits(DataConfig(name=str(tmp_path / "loud")), evaluate=False)
    assert caplog.text.count("outside [-1, 1]") == 1 and "2 clip(s)" in caplog.text


def test_a_member_of_a_dataset_archive_past_the_cap_is_refused_unread(tmp_path, monkeypatch):
    from contrastive.data import locate

    write_fsdd(tmp_path / "fsdd" / "recordings", digits=(0,), speakers=("ann",), indices=range(6))
    with tarfile.open(tmp_path / "fsdd-recordings.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "fsdd", arcname="recordings")
    import shutil

    shutil.rmtree(tmp_path / "fsdd")
    monkeypatch.setattr(locate, "MEMBER_CAP", 1000)  # the recordings are 1.8-2.8 kB
    with pytest.raises(DataError, match=r"fsdd-recordings.tar.gz: member recordings/.*0_ann_0.wav holds 1,844 bytes"):
        load_splits(DataConfig(name="spoken-digits", data_dir=str(tmp_path)))
