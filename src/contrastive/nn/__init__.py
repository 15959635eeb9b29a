"""Network parts: backbones (registered by name, each saying what it reads), heads, EMA, memory, shuffled batch
norm. Importing this package registers every backbone."""

from contrastive.nn import audio, convnets, text, vit  # noqa: F401  (fill the backbone registry)
