"""Evaluation of a frozen encoder, the protocols every kind of data shares: dataset -> features -> kNN / linear
probe / embeddings. A modality's own protocols (STS, SentEval, retrieval) are its own."""

from contrastive.evaluation.embed import labels_path, save_embeddings
from contrastive.evaluation.features import check_labelled, extract_features
from contrastive.evaluation.frozen import evaluate_frozen
from contrastive.evaluation.knn import knn_device, knn_predict, knn_top1
from contrastive.evaluation.linear import linear_probe

__all__ = [
    "check_labelled",
    "evaluate_frozen",
    "extract_features",
    "knn_device",
    "knn_predict",
    "knn_top1",
    "labels_path",
    "linear_probe",
    "save_embeddings",
]
