"""CPC on sound: the InfoNCE against a naive loop over sequences, steps and offsets, the encoder's frames and
padding, the GRU's causality, the wiring errors, exact resume, and evaluation of digits and speakers."""

import math

import numpy as np
import pytest
import torch
from scipy.io import wavfile

from contrastive import api
from contrastive.config import DataConfig
from contrastive.configure import resolve_config
from contrastive.errors import ConfigError
from contrastive.methods.base import Batch, StepInfo
from contrastive.methods.cpc_audio import CPCAudio, CPCAudioConfig
from contrastive.modalities import modality_of
from contrastive.nn.audio import AudioConv
from contrastive.training.checkpoint import load_checkpoint
from contrastive.trees import recipe_dir

RECIPE = recipe_dir() / "cpc-audio-spoken-digits.yaml"
INFO = StepInfo(step=0, epoch=0, total_steps=4)


def _method(steps=3, context=6, widths=(8, 8, 8, 8), seed=0) -> CPCAudio:
    torch.manual_seed(seed)
    return CPCAudio(AudioConv(1, list(widths), [10, 8, 4, 4], [5, 4, 2, 2]), CPCAudioConfig(steps, context))


def _windows(n=3, length=640, short=400, seed=1):
    """n windows of ``length`` samples (8 frames at downsampling 80); the last one's clip ends after ``short``."""
    x = torch.randn(n, 1, length, generator=torch.Generator().manual_seed(seed))
    x[-1, 0, short:] = float("nan")
    return x


# ------------------------------------------------------------------------------------------------ the loss


def _naive_loss(method: CPCAudio, x: torch.Tensor) -> torch.Tensor:
    """A loop over sequences i, steps t and offsets k: W_k c_t scored against every latent of the batch (padding
    frames as zero vectors), -log softmax at z_{t+k}, for every t + k inside its clip; the mean of the terms."""
    z, c, valid = method.net.sequences(x)
    n, t_len, d = z.shape
    latents = [z[j, s] * valid[j, s] for j in range(n) for s in range(t_len)]
    terms = []
    for i in range(n):
        for t in range(t_len):
            for k in range(1, method.cfg.steps + 1):
                if t + k >= t_len or not valid[i, t + k]:
                    continue
                w_k = method.predictors.weight[(k - 1) * d:k * d]  # [D, H]
                prediction = w_k @ c[i, t]
                logits = torch.stack([prediction @ latent for latent in latents])
                terms.append(-torch.log_softmax(logits, 0)[i * t_len + t + k])
    return torch.stack(terms).mean()


def test_cpc_info_nce_equals_a_naive_reference_for_sequences():
    method = _method()
    x = _windows()
    z, _, valid = method.net.sequences(x)
    assert z.shape[:2] == (3, 8) and valid.sum(1).tolist() == [8, 8, 5]  # 400 samples: 5 frames of 80
    out = method(Batch(views=[x], index=torch.arange(3), label=torch.zeros(3, dtype=torch.long)), step=INFO)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in method.named_parameters()}
    method.zero_grad()
    naive = _naive_loss(method, x)
    naive.backward()
    assert torch.allclose(out.loss, naive, rtol=1e-5), (out.loss, naive)
    for name, p in method.named_parameters():
        assert torch.allclose(grads[name], p.grad, rtol=1e-4, atol=1e-7), name
    # the predictions into the padding are left out: the loss is not the one that counts them
    assert out.loss > 0 and 0 <= out.metrics["cpc_accuracy"] <= 1


def test_the_accuracy_counts_the_predictions_that_count_only():
    method = _method()
    x = _windows()
    out = method(Batch(views=[x], index=torch.arange(3), label=torch.zeros(3, dtype=torch.long)), step=INFO)
    z, c, valid = method.net.sequences(x)
    n, t_len, d = z.shape
    candidates = (z * valid[..., None]).reshape(-1, d)
    right = total = 0
    for i in range(n):
        for t in range(t_len):
            for k in range(1, 4):
                if t + k < t_len and valid[i, t + k]:
                    scores = candidates @ (method.predictors.weight[(k - 1) * d:k * d] @ c[i, t])
                    right += int(scores.argmax() == i * t_len + t + k)
                    total += 1
    assert total == (7 + 6 + 5) * 2 + (4 + 3 + 2)  # the short clip's 5 frames leave 4 + 3 + 2 predictions
    assert out.metrics["cpc_accuracy"].item() == pytest.approx(right / total)


# ------------------------------------------------------------------------------------------------ the encoder


def test_frames_every_80_and_160_samples_as_the_paper():
    recipe = resolve_config(recipe=RECIPE).backbone
    conv = AudioConv(1, recipe["widths"], recipe["kernels"], recipe["strides"])
    assert conv.frames(torch.randn(2, 1, 4096))[0].shape == (2, 51, recipe["widths"][-1])  # 4096 / 80, rounded down
    paper = AudioConv(1, [16] * 5, [10, 8, 4, 4, 4], [5, 4, 2, 2, 2])
    assert paper.downsampling == 160 and paper.frames(torch.randn(1, 1, 20480))[0].shape == (1, 128, 16)
    assert paper.out_length(torch.tensor([20480, 160, 1])).tolist() == [128, 1, 0]


def test_a_clip_gives_the_same_frames_and_features_in_any_padded_batch():
    method = _method()
    clip = torch.randn(1, 1, 437, generator=torch.Generator().manual_seed(3))
    padded = torch.cat([torch.cat([clip, torch.full((1, 1, 300), float("nan"))], 2), torch.randn(1, 1, 737)])
    with torch.no_grad():
        z_alone, valid_alone = method.net.g_enc.frames(clip)
        z_pad, valid_pad = method.net.g_enc.frames(padded)
        n = int(valid_alone.sum())
        assert valid_alone.all() and int(valid_pad[0].sum()) == n == int(method.net.g_enc.out_length(torch.tensor(437)))
        assert torch.allclose(z_pad[0, :n], z_alone[0], atol=1e-6) and (z_pad[0, n:] == 0).all()
        assert torch.allclose(method.encoder()(padded)[0], method.encoder()(clip)[0], atol=1e-6)


def _last_sample(conv: AudioConv, frame: int) -> int:
    """The last waveform sample frame ``frame`` of the last layer reads (its receptive field's end)."""
    last = frame
    for k, s, p in reversed(list(zip(conv.kernels, conv.strides, conv.paddings))):
        last = last * s - p + k - 1
    return last


def test_the_context_is_causal_later_samples_change_no_earlier_context():
    method = _method(context=12)
    x = torch.randn(1, 1, 1600, generator=torch.Generator().manual_seed(5))
    changed = x.clone()
    cut = 900
    changed[..., cut:] = torch.randn(1, 1, 1600 - cut, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        _, c, _ = method.net.sequences(x)
        _, c2, _ = method.net.sequences(changed)
    conv = method.net.g_enc
    before = [t for t in range(c.shape[1]) if _last_sample(conv, t) < cut]
    assert before == list(range(len(before))) and 5 < len(before) < c.shape[1]
    assert torch.equal(c[0, :len(before)], c2[0, :len(before)])
    assert not torch.allclose(c[0, len(before)], c2[0, len(before)])  # the first frame that reads a change does
    assert not torch.allclose(c[0, -1], c2[0, -1])


# ------------------------------------------------------------------------------------------------ wiring


def test_too_short_a_window_and_an_image_backbone_are_named():
    method = _method(steps=12)
    with pytest.raises(ConfigError, match=r"windows of 640 samples give 8 frames, too few to predict method.steps=12.*modalities.audio.window"):
        method(Batch(views=[torch.randn(2, 1, 640)], index=torch.arange(2), label=torch.zeros(2)), step=INFO)
    from contrastive.nn.convnets import SmallCNNConfig, small_cnn

    with pytest.raises(ConfigError, match="backbone.name must be an audio backbone"):
        CPCAudio(small_cnn(SmallCNNConfig(), (1, 16, 16))[0], CPCAudioConfig())
    with pytest.raises(ConfigError, match="backbone.name=cpc_audio_conv reads audio data, and this data is image data"):
        _trainer_for(resolve_config(recipe=RECIPE, overrides=["data.name=digits"]), "/tmp/unused")


def _trainer_for(cfg, out):
    from contrastive.modalities import load_splits
    from contrastive.training.trainer import Trainer

    data = load_splits(cfg.data, evaluate=False).pretrain
    return Trainer(cfg, api.build_method(cfg, modality_of(data).context(cfg, data)), data, out)


# ------------------------------------------------------------------------------------------------ training


def _write_fsdd(folder, speakers=("ann", "bob"), indices=range(8)):
    """Spoken-digits files with a tone per digit, a timbre per speaker (harmonics) and lengths that vary."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for d in range(3):
        for s, speaker in enumerate(speakers):
            for i in indices:
                n = 1000 + 150 * ((d + i) % 5)
                t = np.arange(n) / 8000
                wave = np.sin(2 * math.pi * (250 + 150 * d) * t) + 0.5 * s * np.sin(2 * math.pi * 3 * (250 + 150 * d) * t)
                wave = wave * 0.3 + 0.01 * rng.standard_normal(n)
                wavfile.write(folder / f"{d}_{speaker}_{i}.wav", 8000, (wave * 32767).astype(np.int16))


FAST = ["backbone.widths=[8,8,8,8]", "method.context_dim=8", "method.steps=4", "modalities.audio.window=800",
        "train.batch_size=8", "train.progress=false", "train.tensorboard=false", "train.log_every=1",
        "eval.linear_epochs=5", "eval.knn_k=5"]


def _cfg(root, out, *extra):
    return resolve_config(recipe=RECIPE, overrides=FAST + [f"data.data_dir={root}", f"train.output={out}", *extra])


@pytest.mark.slow
def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path):
    _write_fsdd(tmp_path / "fsdd" / "recordings")  # 3 digits x 2 speakers x indices 5-7: 18 training clips
    full = api.pretrain(_cfg(tmp_path, tmp_path / "full", "train.epochs=3", "eval.enabled=false"))
    part = api.pretrain(_cfg(tmp_path, tmp_path / "part", "train.epochs=3", "train.max_steps=3", "eval.enabled=false"))
    assert (full["steps"], part["steps"]) == (6, 3)  # 2 steps an epoch; stopped mid-epoch
    ckpt = tmp_path / "part" / "checkpoint.pt"
    resumed = api.pretrain(_cfg(tmp_path, tmp_path / "part", "train.epochs=3", f"train.resume={ckpt}",
                                "eval.enabled=false"))
    assert resumed["steps"] == 6
    a, b = load_checkpoint(tmp_path / "full" / "checkpoint.pt"), load_checkpoint(ckpt)
    assert a["method"].keys() == b["method"].keys() and "predictors.weight" in a["method"]
    for k in a["method"]:
        assert torch.equal(a["method"][k], b["method"][k]), k
    for k, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["optimizer"]["state"][k][name]))
    assert (a["preprocess"]["modality"], a["preprocess"]["sample_rate"]) == ("audio", 8000)


@pytest.mark.slow
def test_pretraining_evaluates_digits_against_mfccs_and_the_checkpoint_probes_speakers(tmp_path):
    pytest.importorskip("librosa")
    _write_fsdd(tmp_path / "fsdd" / "recordings")
    res = api.pretrain(_cfg(tmp_path, tmp_path / "run", "train.epochs=1"))
    # 3 digits x 2 speakers x indices 0-4 for testing; the tones tell the digits apart for MFCCs
    assert res["evaluation"]["test_images"] == 30 and res["evaluation"]["train_images"] == 18
    assert res["mfcc_knn_top1"] == 1.0 and {"knn_top1", "linear_top1", "mfcc_linear_top1"} <= set(res)
    assert "20 MFCCs" in res["evaluation"]["mfcc_baseline"] and "raw_pixel_knn_top1" not in res
    speakers = api.evaluate(tmp_path / "run", DataConfig(name="spoken-digits", data_dir=str(tmp_path)),
                            protocols=("linear",), overrides=["data.label=speaker", "eval.linear_epochs=5"])
    assert speakers["evaluation"]["split"].endswith("label speaker") and speakers["evaluation"]["test_images"] == 30
    encoder, info = api.load_encoder(tmp_path / "run" / "encoder.pt")
    x = torch.randn(2, 1, 900)
    assert encoder(info["preprocess"](x)).shape == (2, 8)


# ------------------------------------------------------------------------------------------------ two processes


def _four_windows():
    x = torch.randn(4, 1, 640, generator=torch.Generator().manual_seed(2))
    x[2, 0, 400:] = float("nan")  # the second process's windows end early: it has fewer predictions that count
    x[3, 0, 250:] = float("nan")
    return x


def _grads(model, method, x):
    loss = model(Batch(views=[x], index=torch.arange(len(x)), label=torch.zeros(len(x))), step=INFO).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in method.named_parameters()}


def _cpc_worker(out_dir: str) -> None:
    import os

    from torch.nn.parallel import DistributedDataParallel

    from contrastive import distributed
    from contrastive.training.trainer import _ddp_options

    distributed.init_from_env(torch.device("cpu"))
    rank = distributed.rank()
    method = _method()
    ddp = DistributedDataParallel(method, **_ddp_options(method.ddp_options))
    loss, grads = _grads(ddp, method, _four_windows()[2 * rank:2 * rank + 2])
    torch.save({"loss": loss, "grads": grads}, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.slow
def test_two_processes_compute_the_single_process_gradient(tmp_path):
    from multiprocess import run_as_torchrun

    run_as_torchrun(_cpc_worker, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    method = _method()
    loss, grads = _grads(method, method, _four_windows())
    # rank 0 counts 18 + 18 predictions, rank 1 only 9 + 3: each is weighed by its share, so the ranks' mean is
    # the mean over all 48, which one process holding the four windows computes
    assert torch.stack([r["loss"] for r in ranks]).mean().item() == pytest.approx(loss.item(), rel=1e-5)
    for name, g in grads.items():
        for r in ranks:
            torch.testing.assert_close(r["grads"][name], g, rtol=1e-4, atol=1e-7, msg=name)
