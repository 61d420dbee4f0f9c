"""The embedded datasets and reference models: shapes, statistics, determinism, bad arguments."""

import gzip
from importlib import resources

import numpy as np
import pytest
import torch

from pfkernels import data


def test_packaged_digits_file():
    blob = resources.files("pfkernels").joinpath("datasets/digits.csv.gz").read_bytes()
    table = np.loadtxt(gzip.decompress(blob).decode().splitlines(), delimiter=",")
    assert table.shape == (1797, 65)
    assert table[:, :64].min() == 0 and table[:, :64].max() == 16
    assert sorted(np.unique(table[:, 64]).astype(int)) == list(range(10))


def test_digits_split(seed):
    ds = data.digits(n_train=300, n_test=200, seed=seed)
    (x, y), (xt, yt) = ds.train, ds.test
    assert x.shape == (300, 64) and y.shape == (300, 10) and xt.shape == (200, 64)
    assert x.dtype == y.dtype == torch.float32
    assert torch.equal(y.sum(1), torch.ones(300)) and set(y.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(y.argmax(1), ds.train_labels) and torch.equal(yt.argmax(1), ds.test_labels)
    assert ds.train_labels.dtype == torch.int64
    # Standardised with the training split's statistics: pixels constant there stay zero.
    mean, std = x.double().mean(0), x.double().std(0, unbiased=False)
    assert mean.abs().max() < 1e-5
    varying = std > 0
    assert torch.allclose(std[varying], torch.ones_like(std[varying]), atol=1e-5)
    assert torch.equal(x[:, ~varying], torch.zeros_like(x[:, ~varying]))
    # No image is in both splits.
    rows = {tuple(r) for r in x.tolist()}
    assert not any(tuple(r) in rows for r in xt.tolist() if any(r))


def test_digits_deterministic(seed):
    a = data.digits(n_train=100, n_test=50, seed=seed, dtype=torch.float64)
    b = data.digits(n_train=100, n_test=50, seed=seed, dtype=torch.float64)
    c = data.digits(n_train=100, n_test=50, seed=seed + 1, dtype=torch.float64)
    assert a.train[0].dtype == torch.float64
    assert all(torch.equal(p, q) for p, q in zip(a.train + a.test, b.train + b.test))
    assert not torch.equal(a.train_labels, c.train_labels)
    full = data.digits(n_train=1797, n_test=0)
    assert full.train[0].shape == (1797, 64) and full.test[0].shape == (0, 64)
    assert torch.bincount(full.train_labels).min() >= 170  # about 180 images per class


def test_digits_bad_arguments():
    with pytest.raises(ValueError, match="'n_test'.*1797"):
        data.digits(n_train=1500, n_test=500)
    with pytest.raises(ValueError, match="'n_train'"):
        data.digits(n_train=0)
    with pytest.raises(ValueError, match="'n_train'"):
        data.digits(n_train=10.5)
    with pytest.raises(ValueError, match="'dtype'"):
        data.digits(dtype=torch.int32)


def test_synthetic_regression(seed):
    a = data.synthetic_regression(n=50, d=7, seed=seed, out_features=2, n_test=9)
    b = data.synthetic_regression(n=50, d=7, seed=seed, out_features=2, n_test=9)
    assert a.train[0].shape == (50, 7) and a.train[1].shape == (50, 2) and a.test[0].shape == (9, 7)
    assert all(torch.equal(p, q) for p, q in zip(a.train + a.test, b.train + b.test))
    assert a.train_labels is None and a.num_features == 7 and a.num_outputs == 2
    clean = data.synthetic_regression(n=50, d=7, seed=seed, noise=0.0)
    assert clean.train[1].abs().max() < 32**0.5  # |tanh| <= 1 through a 32-unit teacher
    with pytest.raises(ValueError, match="'d'"):
        data.synthetic_regression(d=0)
    with pytest.raises(ValueError, match="'noise'"):
        data.synthetic_regression(noise=-1.0)


@pytest.mark.parametrize("activation", ["tanh", "relu", "gelu"])
def test_mlp(seed, activation):
    model = data.mlp(width=13, depth=3, activation=activation, seed=seed)
    assert sum(p.numel() for p in model.parameters()) == 65 * 13 + 2 * 14 * 13 + 14 * 10
    x = torch.randn(5, 64)
    assert model(x).shape == (5, 10)
    same = data.mlp(width=13, depth=3, activation=activation, seed=seed)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), same.parameters()))
    other = data.mlp(width=13, depth=3, activation=activation, seed=seed + 1)
    assert not torch.equal(model[0].weight, other[0].weight)
    bound = 1 / 64**0.5
    assert model[0].weight.abs().max() <= bound


def test_standard_model_sizes():
    assert sum(p.numel() for p in data.mlp().parameters()) == 55_210
    assert sum(p.numel() for p in data.mlp(width=256).parameters()) == 85_002
    assert sum(p.numel() for p in data.cnn().parameters()) == 6_090
    assert len(list(data.mlp(depth=0).parameters())) == 2
    assert sum(p.numel() for p in data.resnet().parameters()) == 77_754
    assert sum(p.numel() for p in data.resnet18().parameters()) == 11_173_962


def test_models_leave_global_rng_alone():
    state = torch.get_rng_state()
    data.mlp(seed=3)
    data.cnn(seed=3)
    data.resnet(seed=3)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("channels", [(4,), (3, 5), (2, 3, 4)])
def test_cnn(seed, channels):
    model = data.cnn(channels=channels, activation="relu", seed=seed)
    x = torch.randn(6, 64)
    assert model(x).shape == (6, 10)
    same = data.cnn(channels=channels, activation="relu", seed=seed)
    assert torch.equal(model(x), same(x))


@pytest.mark.parametrize("blocks", [(1,), (2, 1), (1, 1, 1)])
def test_resnet(seed, blocks):
    model = data.resnet(blocks=blocks, width=4, seed=seed).eval()
    same = data.resnet(blocks=blocks, width=4, seed=seed).eval()
    x = torch.randn(6, 64)
    assert torch.equal(model(x), same(x))
    assert model(x).shape == (6, 10)
    assert torch.equal(model(x.reshape(6, 1, 8, 8)), model(x))
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    # Train mode normalises with batch statistics: outputs depend on the rest of the batch.
    model.train()
    assert not torch.allclose(model(x)[:3], model(x[:3]))


def test_model_bad_arguments():
    with pytest.raises(ValueError, match="'activation'"):
        data.mlp(activation="sigmoid")
    with pytest.raises(ValueError, match="'width'"):
        data.mlp(width=0)
    with pytest.raises(ValueError, match="'depth'"):
        data.mlp(depth=-1)
    with pytest.raises(ValueError, match="'channels'"):
        data.cnn(channels=(4, 4, 4, 4))
    with pytest.raises(ValueError, match="'channels'"):
        data.cnn(channels=(4, 0))
    with pytest.raises(ValueError, match="'blocks'"):
        data.resnet(blocks=())
    with pytest.raises(ValueError, match="'width'"):
        data.resnet(width=0)


def test_losses(seed):
    f, y = torch.randn(7, 3, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)
    expected = sum(0.5 * float(((f[i] - y[i]) ** 2).sum()) for i in range(7)) / 7
    assert abs(float(data.mse_loss(f, y)) - expected) < 1e-12
    assert data.mse_loss(f, y).dim() == 0
    with pytest.raises(ValueError, match="'targets'"):
        data.mse_loss(f, y[:, :2])
    labels = torch.randint(0, 3, (7,))
    onehot = torch.nn.functional.one_hot(labels, 3).double()
    assert torch.allclose(data.cross_entropy_loss(f, labels), data.cross_entropy_loss(f, onehot))
    expected_ce = -torch.log_softmax(f, 1)[torch.arange(7), labels].mean()
    assert torch.allclose(data.cross_entropy_loss(f, labels), expected_ce, rtol=1e-12)
