"""torch.distributed glue for curvature under data parallelism: groups, flat reductions, rank 0.

pfkernels does not have a communication layer of its own: everything here is a thin wrapper over
``torch.distributed`` collectives (gloo on CPU tensors, NCCL on CUDA tensors), used by
:class:`pfkernels.HessianOperator`, :func:`pfkernels.eigsh` and the DAL optimizers.

Conventions shared by every ``process_group=`` argument in pfkernels:

* ``"default"``: the world group when ``torch.distributed`` is initialised, else no group;
* ``None``: no group: the computation is local to this process (nothing is reduced);
* a ``torch.distributed.ProcessGroup``: that group (every rank in it must make the same calls in
  the same order, as for any collective).

Reductions flatten a list of tensors into one buffer per dtype so that a step issues one
collective, not one per parameter tensor (each collective has a fixed latency, about 50-100 µs on
gloo over localhost and several µs on NCCL, which would dominate for a model of 200 small
tensors).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "all_gather_shards",
    "all_reduce_grads",
    "all_reduce_mean",
    "all_reduce_sum",
    "broadcast_seed",
    "broadcast_tensor",
    "example_mean",
    "init_from_env",
    "is_distributed",
    "is_rank_zero",
    "leave_launched",
    "operator_seed",
    "rank",
    "reduce_loss_and_grads",
    "resolve_group",
    "shard_batch",
    "shard_range",
    "unwrap_model",
    "weighted_mean",
    "world_size",
]

DEFAULT = "default"
# The group init_from_env created (so leave_launched tears down only what it set up).
_LAUNCHED: list = []


def _initialised() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def resolve_group(process_group: Any = DEFAULT, arg: str = "process_group"):
    """The group a ``process_group=`` argument stands for: a ProcessGroup, or None (local).

    ``"default"`` -> the world group if ``torch.distributed`` is initialised, else None; ``None``
    -> None; a ProcessGroup -> itself (``torch.distributed`` must then be initialised). Anything
    else raises TypeError naming ``arg``.
    """
    if process_group is None:
        return None
    if isinstance(process_group, str):
        if process_group != DEFAULT:
            raise ValueError(
                f"argument '{arg}': must be 'default', None or a torch.distributed.ProcessGroup, "
                f"got {process_group!r}"
            )
        return torch.distributed.group.WORLD if _initialised() else None
    if not torch.distributed.is_available() or not isinstance(
        process_group, torch.distributed.ProcessGroup
    ):
        raise TypeError(
            f"argument '{arg}': must be 'default', None or a torch.distributed.ProcessGroup, "
            f"got {type(process_group).__name__}"
        )
    if not _initialised():
        raise ValueError(f"argument '{arg}': torch.distributed is not initialised")
    return process_group


def is_distributed(process_group: Any = DEFAULT) -> bool:
    """True when ``process_group`` resolves to a group (see :func:`resolve_group`)."""
    return resolve_group(process_group) is not None


def world_size(process_group: Any = DEFAULT) -> int:
    """Number of ranks in the group; 1 when there is none."""
    group = resolve_group(process_group)
    return 1 if group is None else torch.distributed.get_world_size(group)


def rank(process_group: Any = DEFAULT) -> int:
    """This process's rank in the group; 0 when there is none."""
    group = resolve_group(process_group)
    return 0 if group is None else torch.distributed.get_rank(group)


def is_rank_zero(process_group: Any = DEFAULT) -> bool:
    """True on the rank that should log, print and write files: rank 0, or any process when
    there is no group."""
    return rank(process_group) == 0


def _flat_reduce(tensors: Sequence[Tensor], group, scale: int | None) -> list[Tensor]:
    """All-reduce (sum) ``tensors`` as one flat buffer per dtype; new tensors, inputs untouched."""
    out: list[Tensor | None] = [None] * len(tensors)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        by_dtype.setdefault(t.dtype, []).append(i)
    for idx in by_dtype.values():
        parts = [tensors[i].detach().reshape(-1) for i in idx]
        flat = torch.cat(parts) if len(parts) > 1 else parts[0].clone()
        torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM, group=group)
        if scale is not None:
            flat.div_(scale)
        for i, chunk in zip(idx, torch.split(flat, [p.numel() for p in parts])):
            out[i] = chunk.view(tensors[i].shape)
    return out  # type: ignore[return-value]


def _reduce(tensors, process_group, mean: bool, who: str):
    single = isinstance(tensors, Tensor)
    items = [tensors] if single else list(tensors)
    for i, t in enumerate(items):
        if not isinstance(t, Tensor):
            raise TypeError(
                f"argument 'tensors': must be a tensor or a list of tensors; item {i} is "
                f"{type(t).__name__}"
            )
    devices = {t.device for t in items}
    if len(devices) > 1:
        raise ValueError(
            f"argument 'tensors': {who} needs one device, got {sorted(map(str, devices))}"
        )
    group = resolve_group(process_group)
    if group is None:
        out = [t.detach().clone() for t in items]
    elif not items:
        out = []
    else:
        out = _flat_reduce(items, group, torch.distributed.get_world_size(group) if mean else None)
    return out[0] if single else out


def all_reduce_sum(tensors: Tensor | Sequence[Tensor], process_group: Any = DEFAULT):
    """Σ over the ranks of a tensor, or of each tensor of a list, in one collective per dtype.

    Args:
        tensors: a tensor or a list of tensors on one device (CPU for gloo, CUDA for NCCL), any
            shapes; detached before reducing.
        process_group: see the module docstring.

    Returns:
        New tensors of the same shapes and dtypes (a tensor for a tensor, a list for a list; the
        list's tensors are views of one flat buffer per dtype). Without a group, detached copies.
        Every rank receives the same bits (the collective reduces, then distributes the result).
    """
    return _reduce(tensors, process_group, mean=False, who="all_reduce_sum")


def all_reduce_mean(tensors: Tensor | Sequence[Tensor], process_group: Any = DEFAULT):
    """As :func:`all_reduce_sum`, divided by the world size: the equal-weight mean over ranks
    that DistributedDataParallel applies to gradients."""
    return _reduce(tensors, process_group, mean=True, who="all_reduce_mean")


def broadcast_tensor(tensor: Tensor, process_group: Any = DEFAULT, src: int = 0) -> Tensor:
    """Rank ``src``'s ``tensor`` on every rank (a new tensor; without a group, a copy).

    Every rank must pass a tensor of the same shape and dtype. ``src`` is a rank within the group.
    """
    if not isinstance(tensor, Tensor):
        raise TypeError(f"argument 'tensor': must be a tensor, got {type(tensor).__name__}")
    group = resolve_group(process_group)
    out = tensor.detach().clone().contiguous()
    if group is not None:
        torch.distributed.broadcast(
            out, src=torch.distributed.get_global_rank(group, src), group=group
        )
    return out


def broadcast_seed(seed: int | None = None, process_group: Any = DEFAULT,
                   device: str | torch.device = "cpu") -> int:
    """A seed every rank agrees on: rank 0's ``seed`` (rank 0 draws one from torch's global
    generator when it is None). Without a group, ``seed`` or a fresh draw.

    ``device`` must be one the group's backend accepts (CPU for gloo, the rank's CUDA device for
    NCCL).
    """
    if seed is not None and not isinstance(seed, int):
        raise TypeError(f"argument 'seed': must be an int or None, got {type(seed).__name__}")
    value = int(torch.randint(0, 2**62, ())) if seed is None else seed
    group = resolve_group(process_group)
    if group is None:
        return value
    return int(broadcast_tensor(torch.tensor([value], dtype=torch.int64, device=device), group)[0])


def weighted_mean(total: Tensor, count: int, process_group: Any = DEFAULT) -> Tensor:
    """``Σ_ranks total / Σ_ranks count`` in one collective: the count rides as one extra element
    of the flat buffer, so the global example count costs no separate reduction.

    Args:
        total: this rank's ``Σ_b n_b x_b`` (any shape, floating).
        count: this rank's ``Σ_b n_b`` (a non-negative int).

    Returns:
        A new tensor shaped and typed like ``total``, the same bits on every rank. The buffer is
        float64 for float64 totals and float32 otherwise (half-precision totals are summed in
        float32), so the count is exact up to 2**53 and 2**24 examples respectively (beyond,
        rounded at float32's relative 6e-8). Without a group, ``total / count``.
    """
    group = resolve_group(process_group)
    if group is None:
        return total / count
    work = torch.float64 if total.dtype == torch.float64 else torch.float32
    flat = torch.cat([total.detach().reshape(-1).to(work),
                      torch.tensor([count], dtype=work, device=total.device)])
    torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM, group=group)
    return (flat[:-1] / flat[-1]).view(total.shape).to(total.dtype)


def unwrap_model(model: Any) -> Any:
    """The module inside ``DistributedDataParallel`` (or ``DataParallel``); anything else as is.

    pfkernels evaluates models with ``torch.func.functional_call`` and differentiates with
    ``torch.autograd.grad``: DDP's forward (buffer broadcast, bucket preparation) and its gradient
    hooks are not wanted there, and the reduction is done explicitly instead.
    """
    wrappers = (torch.nn.DataParallel,)
    if torch.distributed.is_available():
        wrappers += (torch.nn.parallel.DistributedDataParallel,)
    return model.module if isinstance(model, wrappers) else model


def reduce_loss_and_grads(loss: Tensor, grads: Sequence[Tensor], process_group: Any = DEFAULT
                          ) -> tuple[Tensor, list[Tensor]]:
    """The rank-mean of a 0-d loss and of a list of gradients, in one flat all-reduce per dtype.

    Without a group, ``(loss, grads)`` unchanged (the same objects, graphs attached). With one,
    detached reduced tensors: the mean over ranks with equal weights, as DDP averages gradients.
    Used by the DAL optimizers so that every rank sees the same loss (and so raises together on a
    non-finite one) and the same g.
    """
    group = resolve_group(process_group)
    if group is None:
        return loss, list(grads)
    out = all_reduce_mean([loss.detach().reshape(()), *grads], group)
    return out[0], out[1:]


def operator_seed(A: Any, seed: int | None) -> int | None:
    """The seed :func:`pfkernels.eigsh` uses for ``A``: ``seed`` itself, unless ``A`` is reduced
    over a process group (``A.process_group`` is not None) and ``seed`` is None; then rank 0 draws
    one and broadcasts it (8 bytes, once per solve).

    That is what makes a distributed eigensolve replicated: ``A``'s products are all-reduced, so
    with the same start vector and the same breakdown restarts every rank runs the same Lanczos
    recurrence and gets the same bits. An explicit ``seed`` or ``v0`` must be the same on every
    rank (previous eigenvectors of a distributed solve are).
    """
    group = getattr(A, "process_group", None)
    if seed is not None or group is None:
        return seed
    return broadcast_seed(None, group, device=getattr(A, "device", "cpu"))


def init_from_env(device: str | torch.device = "cpu", timeout_s: float = 300.0):
    """Joins the job a launcher such as ``torchrun`` started, if any: ``(group, device)``.

    When ``WORLD_SIZE`` > 1 is set in the environment and ``torch.distributed`` is not yet
    initialised, initialises the default group (NCCL for a CUDA ``device``, gloo otherwise, with
    a ``timeout_s`` timeout so a failed rank does not leave the others hanging) and, for CUDA,
    selects the GPU ``LOCAL_RANK``. Returns the world group (or the existing one) and the device
    this rank should use; ``(None, device)`` for a single process. Pair with
    :func:`leave_launched` when the work is done.
    """
    device = torch.device(device)
    if not _initialised():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not torch.distributed.is_available():
            return None, device
        torch.distributed.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        _LAUNCHED.append(torch.distributed.group.WORLD)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return torch.distributed.group.WORLD, device


def shard_batch(batch: Sequence[Tensor], process_group: Any = DEFAULT
                ) -> tuple[tuple[Tensor, ...], float]:
    """This rank's contiguous slice of a replicated batch, and its weight ``R n_r / N``.

    ``batch``: tensors sharing their leading (example) size N, the same on every rank. Rank r
    gets rows ``torch.tensor_split(range(N), R)[r]`` (sizes differ by at most one). Scaling the
    rank's mean loss by the weight makes the equal-weight mean over ranks (DDP's, DAL's) the
    example-weighted mean over all N examples. Without a group: ``(tuple(batch), 1.0)``.
    """
    group = resolve_group(process_group)
    batch = tuple(batch)
    if group is None:
        return batch, 1.0
    world, me = torch.distributed.get_world_size(group), torch.distributed.get_rank(group)
    n = batch[0].shape[0]
    if n < world:
        raise ValueError(f"argument 'batch': {n} examples cannot be split over {world} ranks")
    shard = tuple(t.tensor_split(world)[me] for t in batch)
    return shard, world * shard[0].shape[0] / n


def shard_range(n: int, process_group: Any = DEFAULT) -> tuple[int, int]:
    """This rank's contiguous slice ``[lo, hi)`` of ``n`` elements split evenly over the group:
    the split of ``torch.tensor_split(range(n), R)`` (the first ``n % R`` ranks hold one more).
    Without a group, ``(0, n)``. A rank's slice is empty when ``n < R``."""
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"argument 'n': must be a non-negative int, got {n!r}")
    world, me = world_size(process_group), rank(process_group)
    size, extra = divmod(n, world)
    lo = me * size + min(me, extra)
    return lo, lo + size + (1 if me < extra else 0)


def all_gather_shards(local: Tensor, n: int, process_group: Any = DEFAULT) -> Tensor:
    """The full ``[..., n]`` tensor from every rank's slice ``[..., hi - lo]`` of its last
    dimension (slices as :func:`shard_range`), the same bits on every rank; one all_gather of
    ``ceil(n / R)`` elements per leading row and rank (slices are zero-padded to one size, which
    every backend accepts). Without a group, a copy of ``local``."""
    if not isinstance(local, Tensor):
        raise TypeError(f"argument 'local': must be a tensor, got {type(local).__name__}")
    group = resolve_group(process_group)
    lo, hi = shard_range(n, group)
    if local.shape[-1] != hi - lo:
        raise ValueError(f"argument 'local': last dimension {local.shape[-1]} is not this rank's "
                         f"slice length {hi - lo} of n={n}")
    if group is None:
        return local.detach().clone()
    world = torch.distributed.get_world_size(group)
    width = -(-n // world)
    padded = torch.nn.functional.pad(local.detach(), (0, width - (hi - lo))).contiguous()
    parts = [torch.empty_like(padded) for _ in range(world)]
    torch.distributed.all_gather(parts, padded, group=group)
    size, extra = divmod(n, world)
    return torch.cat([part[..., : size + (1 if r < extra else 0)]
                      for r, part in enumerate(parts)], dim=-1)


def all_reduce_grads(params: Sequence[Tensor], process_group: Any = DEFAULT) -> None:
    """Replaces each parameter's ``.grad`` by its mean over the ranks, in one flat collective
    (what DDP's hooks would do after ``backward()``); parameters without a gradient are skipped
    (they must be the same on every rank). No-op without a group."""
    group = resolve_group(process_group)
    if group is None:
        return
    with_grad = [p for p in params if p.grad is not None]
    for p, g in zip(with_grad, all_reduce_mean([p.grad for p in with_grad], group)):
        p.grad.copy_(g)


def example_mean(values: Sequence[float | None], count: int, process_group: Any = DEFAULT
                 ) -> list[float | None]:
    """Per-rank means of ``count`` examples (floats, e.g. a loss and an accuracy) -> their means
    over all examples of all ranks, in one collective. ``None`` entries stay None (they must be
    None on every rank). Without a group, the values unchanged."""
    group = resolve_group(process_group)
    values = list(values)
    if group is None:
        return values
    present = [i for i, v in enumerate(values) if v is not None]
    total = torch.tensor([values[i] * count for i in present], dtype=torch.float64)
    device = "cuda" if torch.distributed.get_backend(group) == "nccl" else "cpu"
    means = weighted_mean(total.to(device), count, group).tolist()
    for i, m in zip(present, means):
        values[i] = m
    return values


def leave_launched() -> None:
    """Waits for every rank, then destroys the group :func:`init_from_env` created (a rank that
    exits while a peer still holds the connection can abort it); nothing if it created none."""
    if _LAUNCHED and _initialised():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    _LAUNCHED.clear()
