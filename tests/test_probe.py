"""The linear probe against a hand-made separable problem and scikit-learn's Ridge."""

import copy

import numpy as np
import pytest
from sklearn.linear_model import Ridge

import bigtransfer as bt
from bigtransfer.data import match_classes, open_dataset, sample_per_class
from bigtransfer.probe import extract_features, linear_probe, ridge_accuracy, ridge_fit
from bigtransfer.runtime import setup


def test_exact_on_a_separable_problem():
    rng = np.random.default_rng(0)
    centres = np.eye(5) * 10
    y = rng.integers(0, 5, 200)
    x = centres[y] + rng.normal(0, 0.5, (200, 5))
    assert ridge_accuracy((x[:100], y[:100]), (x[100:], y[100:]), 5) == 1.0


@pytest.mark.parametrize("n,c,l2", [(200, 16, 1024.0), (12, 64, 1024.0), (50, 30, 0.5)])
def test_matches_scikit_learn_ridge(n, c, l2, monkeypatch):
    """Both the primal (n >= c) and the dual (n < c) solve equal Ridge(fit_intercept=True) on +-1 targets; the
    primal's sums over blocks of rows too (a class absent from a block, a short last block), from float32."""
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(n, c)) * rng.uniform(0.1, 3, c) + 2.0, rng.integers(0, 4, n)
    y[:4] = np.arange(4)
    ref = Ridge(alpha=l2, fit_intercept=True).fit(x, 2.0 * np.eye(4)[y] - 1.0)
    for rows in (n, 7):
        monkeypatch.setattr("bigtransfer.probe._BLOCK_CELLS", rows * c)
        weights, intercept = ridge_fit(x, y, 4, l2)
        np.testing.assert_allclose(weights, ref.coef_.T, rtol=1e-7, atol=1e-10)
        np.testing.assert_allclose(intercept, ref.intercept_, rtol=1e-7, atol=1e-10)
    for labels in (y.astype(np.uint8), y[::-1].copy()[::-1], y.astype(">i8")):  # any integer array, any layout
        np.testing.assert_allclose(ridge_fit(x, labels, 4, l2)[0], ref.coef_.T, rtol=1e-7, atol=1e-10)
    with pytest.raises(TypeError, match="labels must be class indices"):  # not truncated to some class
        ridge_fit(x, y + 0.7, 4, l2)
    single = x.astype(np.float32)
    ref32 = Ridge(alpha=l2, fit_intercept=True).fit(single.astype(np.float64), 2.0 * np.eye(4)[y] - 1.0)
    weights, intercept = ridge_fit(single, y, 4, l2)
    np.testing.assert_allclose(weights, ref32.coef_.T, rtol=1e-7, atol=1e-10)
    np.testing.assert_allclose(intercept, ref32.intercept_, rtol=1e-7, atol=1e-10)
    # and its predictions, on features far from the origin (where a dropped intercept shows)
    shifted = x + 50.0
    test_x, test_y = shifted[::-1] + rng.normal(size=x.shape), y[::-1]
    ref = Ridge(alpha=l2, fit_intercept=True).fit(shifted, 2.0 * np.eye(4)[y] - 1.0)
    assert ridge_accuracy((shifted, y), (test_x, test_y), 4, l2) == np.mean(ref.predict(test_x).argmax(1) == test_y)


def test_probe_rows_for_shots_and_seeds():
    model = bt.create_model("BiT-R14x0.25", num_classes=0)
    train, test = open_dataset("digits", "train"), open_dataset("digits", "test")
    rows = linear_probe(model, train, test, 32, setup("cpu"), shots=(1, 5, None), seeds=(0, 1))
    assert [(r["examples_per_class"], r["seed"]) for r in rows] == [(1, 0), (1, 1), (5, 0), (5, 1), (None, 0)]
    # every row is scikit-learn's Ridge fitted on that draw of k per class
    (train_x, train_y), (test_x, test_y) = (extract_features(model, d, 32, setup("cpu")) for d in (train, test))
    for r in rows:
        k = r["examples_per_class"]
        idx = np.arange(len(train_y)) if k is None else sample_per_class(train_y, k, r["seed"], train.classes)
        assert len(idx) == (len(train_y) if k is None else 10 * k)
        ref = Ridge(alpha=1024.0).fit(train_x[idx], 2.0 * np.eye(10)[train_y[idx]] - 1.0)
        assert r["accuracy"] == pytest.approx(np.mean(ref.predict(test_x).argmax(1) == test_y), abs=1.5 / len(test_y))
    assert len({r["accuracy"] for r in rows}) == 5  # draws and k give other fits
    assert rows[-1]["accuracy"] > 0.5  # even random GN+WS features separate digits with all 1,000 examples
    # without None, only the drawn training images are read, and each row is the same fit
    read = set()

    class Counted(type(train)):
        def __getitem__(self, i):
            read.add(i)
            return super().__getitem__(i)

    counted = copy.copy(train)
    counted.__class__ = Counted
    assert linear_probe(model, counted, test, 32, setup("cpu"), shots=(1, 5), seeds=(0, 1)) == rows[:4]
    drawn = {i for k in (1, 5) for seed in (0, 1) for i in sample_per_class(train.targets, k, seed, train.classes)}
    assert read == drawn and len(read) <= 120 < len(train)
    # the package's top level has it too, and the runtime defaults to the model's device
    assert bt.linear_probe(model, train, test, 32, shots=(1,), seeds=(1,))[0] == rows[1]
    tags = match_classes(train.classes, train, multi_label=True)  # a tuple of labels per image
    with pytest.raises(ValueError, match="the linear probe fits one class per image: digits has several"):
        linear_probe(model, tags, test, 32, shots=(None,))
