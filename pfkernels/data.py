"""Embedded datasets and the reference models of the edge-of-stability literature, at 8x8 scale.

Everything here is seeded and deterministic: the same arguments give bit-identical tensors and
initial weights on every run and machine (CPU), so tests, demos and benchmarks share one setup.

- :func:`digits`: scikit-learn's 8x8 handwritten digits (1797 images, 64 pixels, labels 0-9),
  shipped with the package as ``pfkernels/datasets/digits.csv.gz`` so that no scikit-learn is
  needed at run time. Inputs are standardised with training-split statistics; targets are one-hot
  for the MSE loss of the EoS literature.
- :func:`synthetic_regression`: a teacher-network regression set of any size and dimension.
- :func:`mlp` and :func:`cnn`: the fully connected and convolutional nets of Cohen et al. (2021)
  adapted to 8x8 inputs; both take ``[N, 64]`` inputs.
- :func:`resnet` (and :func:`resnet18`): residual networks with BatchNorm built from torch layers
  (no torchvision, no downloaded weights): a small one for the digits, ResNet-18 at CIFAR scale
  (11,173,962 parameters) for curvature at real-model size.
- :func:`mse_loss` (``mean_n 0.5 * ||f_n - y_n||^2``, ARCHITECTURE.md "Conventions of the science")
  and :func:`cross_entropy_loss` (one-hot or integer targets).

The standard digits MLP of the project is ``mlp()`` (64-200-200-10, tanh, 55,210 parameters) on
``digits(n_train=1000)``; ``mlp(width=256)`` is the ~85k-parameter variant (85,002 parameters).
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from importlib import resources
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

from ._checks import check_arg as _check_arg

__all__ = [
    "Dataset",
    "cnn",
    "cross_entropy_loss",
    "digits",
    "mlp",
    "mse_loss",
    "resnet",
    "resnet18",
    "synthetic_regression",
]

DIGITS_SIZE = 1797
DIGITS_FEATURES = 64
DIGITS_CLASSES = 10

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "gelu": nn.GELU,
}


@dataclass(frozen=True)
class Dataset:
    """A train/test split as tensors.

    ``train`` and ``test`` are ``(X, Y)`` pairs: X float ``[N, d]``, Y float ``[N, k]`` (one-hot
    targets for classification, regression targets otherwise). ``train_labels``/``test_labels``
    are int64 ``[N]`` class labels (``None`` for regression sets).
    """

    train: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]
    train_labels: Tensor | None = None
    test_labels: Tensor | None = None
    name: str = ""

    @property
    def num_features(self) -> int:
        return self.train[0].shape[1]

    @property
    def num_outputs(self) -> int:
        return self.train[1].shape[1]


def _check_float_dtype(dtype: torch.dtype) -> None:
    _check_arg(
        isinstance(dtype, torch.dtype) and dtype.is_floating_point,
        "dtype",
        f"must be a floating-point torch dtype, got {dtype!r}",
    )


def _load_digits_array() -> np.ndarray:
    """The raw 1797 x 65 table (64 pixel intensities 0..16, then the label), as int64."""
    blob = resources.files("pfkernels").joinpath("datasets/digits.csv.gz").read_bytes()
    table = np.loadtxt(gzip.decompress(blob).decode("ascii").splitlines(), delimiter=",",
                       dtype=np.int64)
    if table.shape != (DIGITS_SIZE, DIGITS_FEATURES + 1):
        raise RuntimeError(f"pfkernels/datasets/digits.csv.gz is damaged: shape {table.shape}")
    return table


_DIGITS_CACHE: list[np.ndarray] = []


def digits(
    n_train: int = 1000, n_test: int = 500, seed: int = 0, dtype: torch.dtype = torch.float32
) -> Dataset:
    """scikit-learn's 8x8 digits as a standardised, one-hot train/test split.

    A seeded permutation of the 1797 images gives the first ``n_train`` as the training split and
    the next ``n_test`` as the test split (``n_train + n_test <= 1797``). Each pixel is
    standardised with the training split's mean and standard deviation (pixels constant on the
    training split are only centred), so the test split sees the same affine map.

    Returns a :class:`Dataset`: ``train = (X [n_train, 64], Y [n_train, 10])`` with X of ``dtype``
    on the CPU and Y one-hot of ``dtype``; likewise ``test``; ``train_labels``/``test_labels``
    int64. Deterministic in ``seed`` (an int >= 0).
    """
    for name, value in (("n_train", n_train), ("n_test", n_test), ("seed", seed)):
        _check_arg(isinstance(value, (int, np.integer)) and not isinstance(value, bool), name,
                   f"must be an int, got {type(value).__name__}")
    _check_arg(n_train >= 1, "n_train", f"must be >= 1, got {n_train}")
    _check_arg(n_test >= 0, "n_test", f"must be >= 0, got {n_test}")
    _check_arg(seed >= 0, "seed", f"must be >= 0 (it seeds NumPy's generator), got {seed}")
    _check_arg(
        n_train + n_test <= DIGITS_SIZE,
        "n_test",
        f"n_train + n_test = {n_train + n_test} exceeds the {DIGITS_SIZE} digits images",
    )
    _check_float_dtype(dtype)
    if not _DIGITS_CACHE:
        _DIGITS_CACHE.append(_load_digits_array())
    table = _DIGITS_CACHE[0]
    order = np.random.default_rng(seed).permutation(DIGITS_SIZE)
    train_rows, test_rows = order[:n_train], order[n_train : n_train + n_test]
    pixels = table[:, :DIGITS_FEATURES].astype(np.float64)
    labels = table[:, DIGITS_FEATURES]
    mean = pixels[train_rows].mean(axis=0)
    std = pixels[train_rows].std(axis=0)
    std[std == 0.0] = 1.0

    def split(rows: np.ndarray) -> tuple[Tensor, Tensor, Tensor]:
        x = torch.from_numpy((pixels[rows] - mean) / std).to(dtype)
        y = torch.from_numpy(labels[rows].copy())
        onehot = torch.nn.functional.one_hot(y, DIGITS_CLASSES).to(dtype)
        return x, onehot, y

    xtr, ytr, ltr = split(train_rows)
    xte, yte, lte = split(test_rows)
    return Dataset(train=(xtr, ytr), test=(xte, yte), train_labels=ltr, test_labels=lte,
                   name="digits")


def synthetic_regression(
    n: int = 512,
    d: int = 16,
    seed: int = 0,
    *,
    out_features: int = 1,
    n_test: int = 0,
    noise: float = 0.1,
    dtype: torch.dtype = torch.float32,
) -> Dataset:
    """A seeded regression set from a random one-hidden-layer tanh teacher.

    X ~ N(0, I_d); Y = tanh(X W1 / sqrt(d)) W2 / sqrt(32) + noise * N(0, 1), with a 32-unit
    teacher. Returns a :class:`Dataset` with ``train = (X [n, d], Y [n, out_features])`` and
    ``test`` of ``n_test`` rows drawn from the same distribution (labels are ``None``).
    Deterministic in ``seed``; computed in float64 then cast to ``dtype``.
    """
    for name, value in (("n", n), ("d", d), ("out_features", out_features), ("n_test", n_test)):
        _check_arg(isinstance(value, int) and not isinstance(value, bool), name,
                   f"must be an int, got {type(value).__name__}")
    _check_arg(n >= 1, "n", f"must be >= 1, got {n}")
    _check_arg(d >= 1, "d", f"must be >= 1, got {d}")
    _check_arg(out_features >= 1, "out_features", f"must be >= 1, got {out_features}")
    _check_arg(n_test >= 0, "n_test", f"must be >= 0, got {n_test}")
    _check_arg(noise >= 0.0, "noise", f"must be >= 0, got {noise}")
    _check_float_dtype(dtype)
    g = torch.Generator().manual_seed(seed)
    hidden = 32
    w1 = torch.randn(d, hidden, generator=g, dtype=torch.float64)
    w2 = torch.randn(hidden, out_features, generator=g, dtype=torch.float64)

    def draw(rows: int) -> tuple[Tensor, Tensor]:
        x = torch.randn(rows, d, generator=g, dtype=torch.float64)
        y = torch.tanh(x @ w1 / d**0.5) @ w2 / hidden**0.5
        y = y + noise * torch.randn(rows, out_features, generator=g, dtype=torch.float64)
        return x.to(dtype), y.to(dtype)

    return Dataset(train=draw(n), test=draw(n_test), name="synthetic_regression")


def _activation(activation: str) -> nn.Module:
    _check_arg(
        activation in _ACTIVATIONS,
        "activation",
        f"must be one of {sorted(_ACTIVATIONS)}, got {activation!r}",
    )
    return _ACTIVATIONS[activation]()


def _seeded_init(model: nn.Module, seed: int) -> nn.Module:
    """Re-draw every parameter from a private generator (PyTorch's default schemes, same scales).

    Weights: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) like nn.Linear/nn.Conv2d's defaults; biases the
    same. Drawn from a private generator, so models are reproducible in any context.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                fan_in = module.weight[0].numel()
                bound = 1.0 / fan_in**0.5
                for p in (module.weight, module.bias):
                    if p is not None:
                        p.copy_((torch.rand(p.shape, generator=g) * 2 - 1) * bound)
    return model


def mlp(
    in_features: int = DIGITS_FEATURES,
    out_features: int = DIGITS_CLASSES,
    width: int = 200,
    depth: int = 2,
    activation: str = "tanh",
    seed: int = 0,
) -> nn.Sequential:
    """A fully connected net: ``depth`` hidden layers of ``width`` units with ``activation``.

    ``nn.Sequential(Linear(in, w), act, ..., Linear(w, out))``; ``depth=0`` is a linear model.
    Takes ``[N, in_features]``, returns ``[N, out_features]``, float32 on the CPU. Parameters:
    ``(in+1)w + (depth-1)(w+1)w + (w+1)out`` (55,210 for the defaults, 85,002 with width 256).
    Deterministic in ``seed``.
    """
    for name, value in (("in_features", in_features), ("out_features", out_features),
                        ("width", width), ("depth", depth)):
        _check_arg(isinstance(value, int) and not isinstance(value, bool), name,
                   f"must be an int, got {type(value).__name__}")
        _check_arg(value >= (0 if name == "depth" else 1), name, f"must be positive, got {value}")
    _activation(activation)
    layers: list[nn.Module] = []
    fan_in = in_features
    # The modules' own default initialisation draws from the global RNG: leave it as it was.
    with torch.random.fork_rng(devices=[]):
        for _ in range(depth):
            layers += [nn.Linear(fan_in, width), _activation(activation)]
            fan_in = width
        layers.append(nn.Linear(fan_in, out_features))
    return _seeded_init(nn.Sequential(*layers), seed)


class _Image8x8(nn.Module):
    """[N, 64] -> [N, 1, 8, 8]: lets the CNN take the same flat inputs as the MLP."""

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], 1, 8, 8)


def cnn(
    channels: tuple[int, ...] = (16, 32),
    out_features: int = DIGITS_CLASSES,
    activation: str = "tanh",
    seed: int = 0,
) -> nn.Sequential:
    """The small CNN of the EoS literature at 8x8: per stage, 3x3 conv (padding 1), activation,
    2x2 max pooling; then a linear read-out.

    Takes ``[N, 64]`` (8x8 images, row-major), returns ``[N, out_features]``. With 1 to 3 stages
    the spatial size goes 8 -> 4 -> 2 -> 1. The default ``(16, 32)`` has 6,090 parameters.
    Deterministic in ``seed``.
    """
    _check_arg(
        isinstance(channels, (tuple, list)) and 1 <= len(channels) <= 3,
        "channels",
        f"must be a tuple of 1 to 3 channel counts, got {channels!r}",
    )
    _check_arg(
        all(isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in channels),
        "channels",
        f"entries must be positive ints, got {channels!r}",
    )
    _check_arg(isinstance(out_features, int) and out_features >= 1, "out_features",
               f"must be a positive int, got {out_features!r}")
    _activation(activation)
    layers: list[nn.Module] = [_Image8x8()]
    c_in, side = 1, 8
    with torch.random.fork_rng(devices=[]):
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 3, padding=1), _activation(activation), nn.MaxPool2d(2)]
            c_in, side = c, side // 2
        layers += [nn.Flatten(), nn.Linear(c_in * side * side, out_features)]
    return _seeded_init(nn.Sequential(*layers), seed)


class _BasicBlock(nn.Module):
    """He et al.'s basic residual block: two 3x3 conv + BatchNorm, identity or 1x1 projection."""

    def __init__(self, c_in: int, c_out: int, stride: int, activation: str):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.act1 = _activation(activation)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.act2 = _activation(activation)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        return self.act2(out + self.shortcut(x))


class _Images(nn.Module):
    """Flat ``[N, C*S*S]`` -> ``[N, C, S, S]``; image-shaped inputs pass through."""

    def __init__(self, channels: int, side: int):
        super().__init__()
        self.channels, self.side = channels, side

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2:
            return x.reshape(x.shape[0], self.channels, self.side, self.side)
        return x


def resnet(
    blocks: tuple[int, ...] = (1, 1, 1),
    width: int = 16,
    in_channels: int = 1,
    image_size: int = 8,
    out_features: int = DIGITS_CLASSES,
    activation: str = "relu",
    seed: int = 0,
) -> nn.Sequential:
    """A residual network with BatchNorm (He et al. 2016, the CIFAR-style stem).

    A 3x3 conv stem with ``width`` channels (+ BatchNorm, activation), then one stage per entry of
    ``blocks`` with that many basic blocks; stage i has ``width * 2**i`` channels and halves the
    spatial size from the second stage on; global average pooling and a linear read-out. Takes
    flat ``[N, in_channels * image_size**2]`` (the digits' ``[N, 64]`` with the defaults) or
    ``[N, in_channels, image_size, image_size]`` inputs; returns ``[N, out_features]``.

    The default is a small digits ResNet (3 stages of 1 block, 16-32-64 channels: 77,754
    parameters). BatchNorm needs train mode (batch statistics) for the training loss's curvature.
    Deterministic in ``seed``; float32 on the CPU.
    """
    _check_arg(
        isinstance(blocks, (tuple, list)) and len(blocks) >= 1
        and all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in blocks),
        "blocks",
        f"must be a non-empty tuple of positive block counts, got {blocks!r}",
    )
    for name, value in (("width", width), ("in_channels", in_channels),
                        ("image_size", image_size), ("out_features", out_features)):
        _check_arg(isinstance(value, int) and not isinstance(value, bool) and value >= 1, name,
                   f"must be a positive int, got {value!r}")
    _activation(activation)
    with torch.random.fork_rng(devices=[]):
        layers: list[nn.Module] = [
            _Images(in_channels, image_size),
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            _activation(activation),
        ]
        c_in = width
        for stage, count in enumerate(blocks):
            c_out = width * 2**stage
            for b in range(count):
                layers.append(_BasicBlock(c_in, c_out, 2 if stage > 0 and b == 0 else 1,
                                          activation))
                c_in = c_out
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, out_features)]
    return _seeded_init(nn.Sequential(*layers), seed)


def resnet18(out_features: int = 10, in_channels: int = 3, image_size: int = 32,
             seed: int = 0) -> nn.Sequential:
    """ResNet-18 at CIFAR scale: :func:`resnet` with blocks (2, 2, 2, 2) and width 64.

    11,173,962 parameters with 3 input channels and 10 outputs (torchvision's ``resnet18`` with
    a 3x3 stem and no max pooling). Random initialisation from ``seed``; nothing is downloaded.
    """
    return resnet((2, 2, 2, 2), 64, in_channels, image_size, out_features, "relu", seed)


def mse_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    """The EoS literature's square loss: ``mean over examples of 0.5 * ||f_n - y_n||^2``.

    outputs, targets: ``[N, k]`` (or ``[N]``, treated as k = 1) of one floating dtype. Returns a
    0-d tensor. Equivalent to ``0.5 * ((outputs - targets) ** 2).sum() / N``.
    """
    if outputs.shape != targets.shape:
        raise ValueError(
            f"argument 'targets': shape {tuple(targets.shape)} differs from outputs "
            f"{tuple(outputs.shape)}"
        )
    n = outputs.shape[0] if outputs.dim() > 0 else 1
    return 0.5 * (outputs - targets).pow(2).sum() / max(n, 1)


def cross_entropy_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy of logits ``outputs [N, k]`` against one-hot/probability targets
    ``[N, k]`` or int64 class labels ``[N]``. Returns a 0-d tensor.

    Equivalent to ``torch.nn.functional.cross_entropy(outputs, targets)`` (which accepts both
    target forms).
    """
    labels = targets.dim() == 1 and not targets.is_floating_point()
    _check_arg(
        outputs.dim() == 2 and ((labels and targets.shape[0] == outputs.shape[0])
                                or tuple(targets.shape) == tuple(outputs.shape)),
        "targets",
        f"must be class labels [N] or probabilities [N, k] for outputs [N, k] = "
        f"{tuple(outputs.shape)}, got {tuple(targets.shape)} ({targets.dtype})",
    )
    return torch.nn.functional.cross_entropy(outputs, targets)
