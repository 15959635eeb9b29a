"""Image-caption retrieval and zero-shot classification from embeddings (CLIP's evaluations).

Retrieval: a similarity matrix [n_images, n_texts] where each text is a caption of one image (Flickr8k and
COCO have five per image). Image -> text recall@k is the share of images with at least one of their captions
among their k most similar texts; text -> image recall@k the share of captions whose image is among their k
most similar images. A candidate that ties with the best correct one counts as ranked above it, so constant
scores give the lowest recall, never a lucky one.

Zero-shot classification (Radford et al. 2021, Sec. 3.1.4): each class's name in prompts ("a photo of a
{}."), the prompts' text embeddings L2-normalised and averaged per class ("ensembling ... in embedding
space"), then renormalised; an image goes to the class whose embedding has the highest cosine similarity.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from contrastive.errors import DataError

RECALL_AT = (1, 5, 10)


def _rank_of_best_correct(sim: Tensor, correct: Tensor) -> Tensor:
    """[q, c] scores and [q, c] bool (at least one True a row) -> [q] 0-based rank of each query's best
    correct candidate: the number of wrong candidates scored at least as high."""
    best = sim.masked_fill(~correct, float("-inf")).amax(dim=1, keepdim=True)  # [q, 1]
    return ((sim >= best) & ~correct).sum(dim=1)


def retrieval_recall(sim: Tensor, text_image: Tensor, ks: Sequence[int] = RECALL_AT) -> dict[str, float]:
    """Recall@k both ways: ``sim`` [n_images, n_texts], ``text_image`` [n_texts] long, the image each text
    describes. Returns ``{"image_to_text@k": ..., "text_to_image@k": ...}`` as fractions in [0, 1]."""
    n_images, n_texts = sim.shape
    if text_image.shape != (n_texts,):
        raise DataError(f"text_image has shape {tuple(text_image.shape)}; it needs one image index per text "
                        f"({n_texts})")
    if n_texts and (text_image.min() < 0 or text_image.max() >= n_images):
        raise DataError(f"text_image names images outside 0..{n_images - 1}")
    correct = text_image[None, :] == torch.arange(n_images, device=sim.device)[:, None]  # [n_images, n_texts]
    if not correct.any(dim=1).all():
        raise DataError("an image without a caption has no correct text; drop it or give it a caption")
    i2t = _rank_of_best_correct(sim, correct)  # [n_images]
    t2i = _rank_of_best_correct(sim.T, correct.T)  # [n_texts]
    out = {}
    for k in ks:
        out[f"image_to_text@{k}"] = float((i2t < k).double().mean())
        out[f"text_to_image@{k}"] = float((t2i < k).double().mean())
    return out


def class_prompts(class_names: Sequence[str], templates: Sequence[str] = ("a photo of a {}.",)) -> list[str]:
    """Every template filled with every class name, class-major: [C * T] strings, class c's at c*T .. c*T+T-1.
    The default template is CLIP's ("A photo of a {label}." helps, Sec. 3.1.4)."""
    return [t.format(name) for name in class_names for t in templates]


def class_embeddings(prompt_embeddings: Tensor, num_classes: int) -> Tensor:
    """[C * T, D] prompt embeddings (class-major, as :func:`class_prompts`) -> [C, D]: each normalised, averaged
    over a class's T templates and normalised again (CLIP's prompt ensemble)."""
    if prompt_embeddings.shape[0] % num_classes:
        raise DataError(f"{prompt_embeddings.shape[0]} prompt embeddings are not a whole number of templates for "
                        f"{num_classes} classes")
    z = F.normalize(prompt_embeddings.float(), dim=1).view(num_classes, -1, prompt_embeddings.shape[1])
    return F.normalize(z.mean(dim=1), dim=1)


def zero_shot_predict(image_embeddings: Tensor, class_embeddings: Tensor) -> Tensor:
    """[n, D] images and [C, D] classes -> [n] long, the class of highest cosine similarity (ties: the lowest
    index)."""
    sim = torch.einsum("nd,cd->nc", F.normalize(image_embeddings.float(), dim=1),
                       F.normalize(class_embeddings.float(), dim=1))  # [n, C]
    return sim.argmax(dim=1)


def zero_shot_top1(image_embeddings: Tensor, labels: Tensor, class_embeddings: Tensor) -> float:
    """Top-1 accuracy of :func:`zero_shot_predict` against ``labels`` [n]."""
    return float((zero_shot_predict(image_embeddings, class_embeddings) == labels).double().mean())
