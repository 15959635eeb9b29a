"""Evaluation of a frozen backbone: dataset -> features -> kNN / linear probe / embeddings."""

from contrastive.evaluation.embed import labels_path, save_embeddings
from contrastive.evaluation.features import check_labelled, extract_features, raw_pixel_features
from contrastive.evaluation.knn import knn_device, knn_predict, knn_top1
from contrastive.evaluation.linear import linear_probe

__all__ = [
    "check_labelled",
    "extract_features",
    "knn_device",
    "knn_predict",
    "knn_top1",
    "labels_path",
    "linear_probe",
    "raw_pixel_features",
    "save_embeddings",
]
