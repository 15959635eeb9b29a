import pytest

from contrastive.config import Config
from contrastive.trees import find_recipe, parse_override, recipe_dir
from contrastive.configure import apply_overrides, resolve_config
from contrastive.errors import ConfigError
from contrastive.methods import method_config
from contrastive.modalities.audio import AUDIO
from contrastive.registry import lookup


def test_defaults_then_recipe_then_overrides():
    cfg = resolve_config(recipe=None, tree={"data": {"name": "cifar10"}}, overrides=["optim.lr=0.3", "seed=7"])
    assert find_recipe("simclr", "cifar10").name == "simclr-cifar10.yaml"
    assert cfg.optim.lr == 0.3 and cfg.seed == 7
    assert cfg.method["temperature"] == 0.5  # from the CIFAR-10 recipe (SimCLR B.9)
    assert method_config(cfg).temperature == 0.5


def test_override_value_types():
    assert parse_override("views.crop_scale=[0.2, 1.0]") == (["views", "crop_scale"], [0.2, 1.0])
    assert parse_override("optim.grad_clip=null") == (["optim", "grad_clip"], None)
    cfg = apply_overrides(Config(), ["optim.lr=1", "optim.grad_clip=2"])
    assert isinstance(cfg.optim.lr, float) and cfg.optim.grad_clip == 2.0
    # YAML 1.1 reads 1e-3 as a string; a float field still takes it as the number
    assert apply_overrides(Config(), ["optim.lr=1e-3"]).optim.lr == 0.001
    with pytest.raises(ConfigError, match="optim.lr: expected a number, got 'fast'"):
        apply_overrides(Config(), ["optim.lr=fast"])


@pytest.mark.parametrize("override,match", [
    ("optim.learning_rate=0.1", "unknown config key optim.learning_rate"),
    ("bogus=1", "unknown config key bogus"),
    ("method.temprature=0.2", "unknown config key method.temprature"),
    ("train.epochs=ten", "train.epochs: expected an integer"),
    ("method.name=nope", "unknown method 'nope'"),
    ("optim.lr", "not of the form key=value"),
    ("train.batch_size=0", "train.batch_size=0 is out of range: it must be >= 1"),
    ("train.epochs=0", "train.epochs=0 is out of range"),
    ("optim.lars_eta=0", "optim.lars_eta=0.0 is out of range: it must be > 0"),
    ("data.holdout=1.5", "data.holdout=1.5 is out of range: it must be below 1"),
])
def test_bad_keys_and_values_name_the_field(override, match):
    with pytest.raises(ConfigError, match=match):
        resolve_config(overrides=[override])


def test_missing_recipe_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=str(tmp_path / "none.yaml")):
        resolve_config(recipe=tmp_path / "none.yaml")


def test_recipe_with_unknown_key_is_named(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("train:\n  epochz: 3\n")
    with pytest.raises(ConfigError, match="unknown config key train.epochz"):
        resolve_config(recipe=p)


RECIPES = sorted(p.name for p in recipe_dir().glob("*.yaml"))


@pytest.mark.parametrize("name", RECIPES)
def test_every_shipped_recipe_resolves_and_takes_a_training_step(name):
    """Each recipe in configs/ validates, is the one found for its method and dataset, and builds a
    method whose loss is finite and reaches every parameter of backbone and head."""
    import torch

    from contrastive.api import BuildContext, build_method
    from contrastive.methods.base import Batch, StepInfo

    cfg = resolve_config(recipe=recipe_dir() / name)
    method_name = cfg.method["name"]
    dataset = name.removesuffix(".yaml").removeprefix(method_name).lstrip("-")
    if dataset:
        assert find_recipe(method_name, dataset).name == name
    reads = lookup("backbones", cfg.backbone["name"]).reads
    audio = reads == "audio"  # waveform windows [n, 1, T]
    channels = 1 if ("mnist" in dataset or dataset == "digits" or audio) else 3
    size = 64 if dataset == "stl10" else 16
    n = 8
    if "patch_size" in cfg.method:  # CPC: a grid with a row below the largest offset, two images of it
        m = cfg.method
        size, n = max(size, m["patch_size"] + max(m["offsets"]) * m["patch_stride"]), 2
    window = AUDIO.settings(cfg).window
    ctx = BuildContext(input_shape=(channels, window) if audio else (channels, size, size), dataset_size=64,
                       num_classes=10, batch_size=n,
                       world_size=1, steps_per_epoch=8, epochs=cfg.train.epochs, backbone_section=cfg.backbone,
                       mean=(0.5,) * channels, std=(0.25,) * channels)
    torch.manual_seed(0)
    method = build_method(cfg, ctx)
    shape = (window,) if audio else (size, size)
    views = [torch.randn(n, channels, *shape) for _ in range(cfg.views.n_views)]
    ids = torch.randint(1000, 2000, (n, 12))  # token ids of words (not special tokens, not padding)
    if reads == "text":  # sentences: one view, or the columns of pairs and triples
        views = [ids] * (3 if method_name == "simcse-sup" else 1)
    elif "text" in cfg.method:  # image-caption pairs: a crop and a caption
        views = [views[0], ids]
    batch = Batch(views=views, index=torch.arange(n), label=torch.arange(n) % 2)
    info = StepInfo(step=0, epoch=0, total_steps=10, steps_per_epoch=8, epochs=cfg.train.epochs)
    out = method(batch, step=info)
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.loss.item() > 0
    no_grad = [n for n, p in method.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == []
    method.after_step(out.updates, info)


@pytest.mark.parametrize("override", ["eval.knn_temperature=nan", "optim.lr=inf", "method.temperature=-.inf",
                                      "optim.weight_decay=.nan"])
def test_a_number_that_is_not_finite_is_refused_by_name(override):
    """nan passes every range check (nan < low is False): it is refused as what it is."""
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"{key}: expected a finite number"):
        resolve_config(overrides=[override])
