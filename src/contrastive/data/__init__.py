"""The dataset contract every kind of data keeps (``datasets.py``), where named datasets' files are found
(``locate.py``), and the building blocks above it: label subsets, P x K batches, batched image and colour kernels,
token views. Readers of each kind of data are its modality's (``contrastive.modalities``)."""

from contrastive.data.datasets import SampleDataset, Splits, collate_skip_corrupt, hold_out, is_labelled, subset

__all__ = ["SampleDataset", "Splits", "collate_skip_corrupt", "hold_out", "is_labelled", "subset"]
