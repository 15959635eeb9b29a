"""contrastive: self-supervised representation learning and its evaluation."""

__version__ = "0.1.0"
