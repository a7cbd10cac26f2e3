"""Linear probe: frozen pre-logit features + a closed-form L2-regularised linear classifier.

The fast few-shot evaluator of BiT's successors (big_vision): ridge regression onto +-1 targets,
regularisation 2^10 by default. Fitted as scikit-learn's ``Ridge(fit_intercept=True)`` is: features
and targets centred on the training mean, unregularised intercept, so the two agree to rounding.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from .data import BadImageError, LabelledImages, match_classes, select_examples
from .evaluate import evaluating, model_outputs
from .runtime import Runtime, setup

DEFAULT_L2 = 2.0**10
log = logging.getLogger("bigtransfer")


def extract_features(model: nn.Module, source: LabelledImages, resolution: int, runtime: Runtime,
                     batch_size: int = 256, precision: str = "fp32", workers: int = 0,
                     progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Pre-logit features (N, C) of every item, images resized straight to `resolution`, and labels. Images
    that do not decode are left out, named in a warning: a probe is fitted and scored on the readable ones."""
    features, labels, _ = _features(model, source, resolution, runtime, batch_size, precision, workers, progress)
    return features, labels


def _features(model: nn.Module, source: LabelledImages, resolution: int, runtime: Runtime, batch_size: int,
              precision: str, workers: int, progress: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`extract_features` and which items it kept (a bool per item)."""
    inner = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
    inner = getattr(inner, "module", inner)  # DDP's
    with evaluating(model):
        features, errors = model_outputs(inner.forward_features, source, inner.num_features, resolution,
                                         batch_size, runtime.device, workers, precision, progress)
    for report in errors.values():
        log.warning("bad image left out of the probe: %s", report)
    kept = np.ones(len(source), dtype=bool)
    kept[list(errors)] = False
    features = features.numpy()  # float32, as extracted: ridge_fit sums it in float64 a block of rows at a time
    return (features if kept.all() else features[kept]), np.asarray(source.targets)[kept], kept


def ridge_fit(features: np.ndarray, labels: np.ndarray, num_classes: int,
              l2: float = DEFAULT_L2) -> tuple[np.ndarray, np.ndarray]:
    """(weights (C, K), intercept (K,)) of ridge regression onto +-1 one-vs-rest targets, in float64.

    With more images than features (the primal form), the sums it needs are taken a block of rows at a time:
    a probe of all of ImageNet (1.28M x 2,048 float32 features, 10 GB) makes no float64 copy of them, no
    centred copy, and no N x K target matrix (the targets enter as per-class sums of the centred features)."""
    labels = np.asarray(labels)
    if labels.size and labels.dtype.kind not in "iu":
        raise TypeError(f"labels must be class indices (integers), got {labels.dtype}")
    labels = np.ascontiguousarray(labels, dtype=np.int64)  # as index_add_ takes them
    n, c = features.shape
    y_mean = 2.0 * np.bincount(labels, minlength=num_classes) / n - 1.0
    if n < c:  # the dual form solves an n x n system: few-shot sets are far smaller than the feature size
        x = np.asarray(features, dtype=np.float64)
        x_mean = x.mean(0)
        xc, yc = x - x_mean, 2.0 * np.eye(num_classes)[labels] - 1.0 - y_mean
        weights = xc.T @ np.linalg.solve(xc @ xc.T + l2 * np.eye(n), yc)
        return weights, y_mean - x_mean @ weights
    rows = max(1, _BLOCK_CELLS // max(c, 1))
    blocks = [slice(lo, lo + rows) for lo in range(0, n, rows)]
    x_mean = sum(np.asarray(features[b], dtype=np.float64).sum(0) for b in blocks) / n
    gram, class_sums = np.zeros((c, c)), torch.zeros(num_classes, c, dtype=torch.float64)
    for b in blocks:
        xc = np.asarray(features[b], dtype=np.float64) - x_mean
        gram += xc.T @ xc
        class_sums.index_add_(0, torch.from_numpy(labels[b]), torch.from_numpy(xc))
    # xc' (2 onehot - 1 - y_mean) = 2 (per-class sums)' - (sum of xc) (1 + y_mean)': the last term is 0 but for rounding
    cross = 2.0 * class_sums.numpy().T - np.outer(class_sums.numpy().sum(0), 1.0 + y_mean)
    weights = np.linalg.solve(gram + l2 * np.eye(c), cross)
    return weights, y_mean - x_mean @ weights


_BLOCK_CELLS = 2**24  # features per block of rows in ridge_fit's sums: 128 MiB of float64


def ridge_accuracy(train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray], num_classes: int,
                   l2: float = DEFAULT_L2) -> float:
    weights, intercept = ridge_fit(*train, num_classes, l2)
    predictions = (test[0] @ weights + intercept).argmax(1)
    return float((predictions == test[1]).mean())


def linear_probe(model: nn.Module, train: LabelledImages, test: LabelledImages, resolution: int,
                 runtime: Runtime | None = None, shots: Sequence[int | None] = (None,), seeds: Sequence[int] = (0,),
                 l2: float = DEFAULT_L2, batch_size: int = 256, precision: str = "fp32",
                 workers: int = 0, progress: bool = False) -> list[dict]:
    """Test accuracy of the probe for every (examples per class, seed); None means all training data.
    Features are extracted once, of the drawn training images only unless None is asked for (a 10-shot probe
    of CIFAR-10 reads 100 of its 50,000); every k and seed only re-fits the closed form. The draws are
    fine-tuning's (`select_examples`): the same seed gives the same images, an unreadable one replaced.
    `runtime`: by default the model's device (`runtime.setup`)."""
    runtime = runtime or setup(str(next(model.parameters()).device))
    if train.multi_label:
        raise ValueError(f"the linear probe fits one class per image: {train.name} has several")
    test = match_classes(train.classes, test)
    draws = {(k, seed): select_examples(train, k, seed, readable=True)[1]
             for k in shots if k is not None for seed in seeds}
    items = np.arange(len(train)) if None in shots else np.unique([i for d in draws.values() for i in d])
    train_x, train_y, kept = _features(model, train.subset(items.tolist()), resolution, runtime, batch_size,
                                       precision, workers, progress)
    row = np.full(len(train), -1)
    row[items[kept]] = np.arange(len(train_y))
    test_xy = extract_features(model, test, resolution, runtime, batch_size, precision, workers, progress)
    rows = []
    for k in shots:
        for seed in (0,) if k is None else seeds:
            if k is None:  # all of it, as it is: an index would copy it
                xy = train_x, train_y
            else:
                idx = row[draws[k, seed]]
                if (idx < 0).any():  # it decoded when drawn, not when read again
                    lost = np.asarray(draws[k, seed])[idx < 0][0]
                    raise BadImageError(train.describe(int(lost)), "unreadable when its features were extracted")
                xy = train_x[idx], train_y[idx]
            acc = ridge_accuracy(xy, test_xy, len(train.classes), l2)
            rows.append({"examples_per_class": k, "seed": seed, "accuracy": acc})
    return rows
