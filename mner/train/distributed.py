"""Training past one process: DDP runs and seed-parallel sweeps under ``torchrun``.

``torchrun --nproc-per-node N -m mner train ...`` (or ``mner train --nproc N``, which
launches torchrun itself) starts N ranks. What they do depends on ``train.parallel``:

* ``ddp``: the ranks train one model together with DistributedDataParallel. Every rank
  builds the same length-bucketed global batches of an epoch (they depend only on the
  seed and the epoch) and takes its contiguous share of each (:func:`shard`), so the
  union over ranks is exactly what one process with the global batch sees. The global
  batch is ``batch_size x N`` (effective batch grows with the ranks), or ``batch_size``
  itself with ``train.global_batch: true``; then each rank's loss is weighted by its
  share so that the averaged gradient equals the one-process gradient up to float
  summation order.
* ``seeds``: seed-parallel: rank ``r`` trains seeds ``r, r + N, ...`` of ``--seeds`` on
  its own device as an ordinary one-process run; rank 0 writes the summary when all
  are done.
* ``auto`` (default): ``seeds`` when several seeds are asked for, else ``ddp``.

Devices: on CUDA rank ``r`` uses ``cuda:LOCAL_RANK`` (NCCL for DDP); on a CPU each rank
gets ``cores // local ranks`` intra-op threads (gloo). Control messages (errors, dev
scores, summaries) always go through a gloo group.

Only rank 0 writes the run folder, logs, dvclive metrics and checkpoints, and only it
takes the run folder's lock; evaluation runs on rank 0 alone with the same weights, so
its numbers are those of a one-process evaluation. A failure on rank 0 (a user mistake,
a full disk) is sent to the other ranks, which stop with the same one-line message.
"""

from __future__ import annotations

import contextlib
import os
import sys
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import torch
import torch.distributed as dist

from mner.errors import ConfigError, MnerError

T = TypeVar("T")
Mode = Literal["single", "ddp", "seeds"]


@dataclass(frozen=True)
class World:
    """Where this process stands among the ranks torchrun started.

    Attributes:
        rank: global rank (0 .. world_size - 1).
        world_size: number of ranks; 1 outside torchrun.
        local_rank: rank on this machine (picks the GPU).
        local_world_size: ranks on this machine (shares the CPU cores).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        """True on rank 0, the one rank that writes."""
        return self.rank == 0


def world() -> World:
    """This process's :class:`World`, from the environment torchrun sets (1 rank without)."""
    env = os.environ
    size = int(env.get("WORLD_SIZE", "1") or 1)
    if size <= 1:
        return World()
    return World(
        rank=int(env.get("RANK", "0")),
        world_size=size,
        local_rank=int(env.get("LOCAL_RANK", "0")),
        local_world_size=int(env.get("LOCAL_WORLD_SIZE", str(size))),
    )


def choose_mode(parallel: str, n_seeds: int, world_size: int) -> Mode:
    """What N ranks do with a run: ``single`` (one rank), ``ddp`` or ``seeds``.

    ``auto`` is seed-parallel for several seeds (Twitter-sized data rarely needs DDP but
    always needs seeds) and DDP for one.
    """
    if world_size <= 1:
        return "single"
    if parallel == "auto":
        return "seeds" if n_seeds > 1 else "ddp"
    if parallel not in ("ddp", "seeds"):
        raise ConfigError(f"train.parallel: expected auto, ddp or seeds, got {parallel!r}")
    return parallel  # type: ignore[return-value]


def rank_device(device: torch.device, w: World) -> torch.device:
    """The device of this rank: its local GPU on CUDA, else ``device`` unchanged."""
    if w.world_size > 1 and device.type == "cuda":
        n = torch.cuda.device_count()
        if w.local_rank >= n:
            raise ConfigError(
                f"local rank {w.local_rank} has no GPU: this machine has {n}; start at most "
                f"{n} ranks per node (torchrun --nproc-per-node {n})"
            )
        return torch.device("cuda", w.local_rank)
    return device


def rank_threads(threads: int | None, w: World) -> int | None:
    """Intra-op threads of this rank: ``threads`` if set, else its share of the cores."""
    if threads is not None or w.world_size <= 1:
        return threads
    return max(1, (os.cpu_count() or 1) // max(1, w.local_world_size))


# -- process groups -------------------------------------------------------------------

_GROUPS: dict[str, Any] = {}


@contextlib.contextmanager
def process_group(device: torch.device, mode: Mode) -> Iterator[World]:
    """Join the ranks for the block (nothing to do for one rank).

    Creates the default group (NCCL for DDP on CUDA, else gloo) unless the caller already
    did, plus a gloo group for control messages and one for the contrastive losses'
    gathers (a group of their own, so they never interleave with DDP's gradient
    all-reduces). Destroys what it created on exit.
    """
    w = world()
    if w.world_size <= 1:
        yield w
        return
    created = not dist.is_initialized()
    if created:
        backend = "nccl" if device.type == "cuda" and mode == "ddp" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend)
    _GROUPS["control"] = dist.new_group(backend="gloo")
    _GROUPS["loss"] = dist.new_group()
    try:
        yield w
    finally:
        _GROUPS.clear()
        if created:
            dist.destroy_process_group()


def active() -> bool:
    """True inside :func:`process_group` with more than one rank."""
    return bool(_GROUPS) and dist.is_initialized() and dist.get_world_size() > 1


def _together(w: World) -> bool:
    # A seed-parallel rank trains as World() (one process): no collectives then.
    return w.world_size > 1 and active()


def barrier(w: World) -> None:
    """Wait for every rank of ``w`` (no-op for one)."""
    if _together(w):
        dist.barrier(group=_GROUPS["control"])


def broadcast(obj: T, w: World) -> T:
    """Rank 0's ``obj`` on every rank of ``w`` (``obj`` itself for one rank)."""
    if not _together(w):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_GROUPS["control"])
    return box[0]


def gather(obj: Any, w: World) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank of ``w``."""
    if not _together(w):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=_GROUPS["control"])
    return out


def all_sum(value: float, w: World) -> float:
    """The sum of ``value`` over the ranks of ``w`` (in float64)."""
    if not _together(w):
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, group=_GROUPS["control"])
    return float(t.item())


class RankFailed(MnerError):
    """Rank 0 stopped with a user-facing error; the other ranks stop with its message
    (the CLI prints it on rank 0 only)."""


def _outcome(fn: Callable[[], T]) -> tuple[str, Any]:
    try:
        return "ok", fn()
    except MnerError as exc:
        return "error", str(exc)
    except OSError as exc:
        return "oserror", (exc.errno, exc.strerror, exc.filename)


def _raise(kind: str, payload: Any, rank: int) -> None:
    if kind == "error":
        raise RankFailed(payload if rank == 0 else f"rank {rank}: {payload}")
    if kind == "oserror":
        errno_, strerror, filename = payload
        raise OSError(errno_, strerror, filename)
    raise RankFailed(f"rank {rank} failed: {payload}")


def on_main(fn: Callable[[], T], w: World) -> T:
    """Run ``fn`` on rank 0 only and hand its result (or its error) to every rank.

    A user-facing error (:class:`MnerError`, an environment ``OSError``) raised by ``fn``
    on rank 0 is re-raised there and raised with the same message on the other ranks
    (as :class:`RankFailed`), so no rank is left waiting for a rank 0 that has stopped.
    Any other exception is a bug: the other ranks stop with a line naming it.
    """
    if not _together(w):
        return fn()
    if w.is_main:
        try:
            result = fn()
        except MnerError as exc:
            broadcast(("error", str(exc)), w)
            raise
        except OSError as exc:
            broadcast(("oserror", (exc.errno, exc.strerror, exc.filename)), w)
            raise
        except Exception as exc:
            broadcast(("bug", f"{type(exc).__name__}: {exc}"), w)
            raise
        return broadcast(("ok", result), w)[1]
    kind, payload = broadcast(None, w)
    if kind != "ok":
        _raise(kind, payload, 0)
    return payload


def main_first(fn: Callable[[], T], w: World) -> T:
    """Run ``fn`` on rank 0, then (if it succeeded) on the other ranks.

    For the checks every rank would fail alike (data, cache, config): rank 0 reports
    them once; the others stop with :class:`RankFailed`.
    """
    if not _together(w):
        return fn()
    if w.is_main:
        out: list[T] = []
        on_main(lambda: out.append(fn()), w)  # only the status travels, not the result
        return out[0]
    on_main(lambda: None, w)
    return fn()


def everywhere(fn: Callable[[], T], w: World) -> list[Any]:
    """Run ``fn`` on every rank; every rank's result in rank order, on every rank.

    Used for seed-parallel work, where each rank trains its own seeds: a rank's failure
    reaches every rank through the final gather (and is raised there) instead of
    leaving rank 0 waiting.
    """
    outcomes = gather(_outcome(fn), w)
    for rank, (kind, payload) in enumerate(outcomes):
        if kind != "ok":
            _raise(kind, payload, rank)
    return [payload for _, payload in outcomes]


class _LossOf(torch.nn.Module):
    """``forward(batch) = tagger.loss(batch)``: DDP synchronises through ``forward``."""

    def __init__(self, tagger: torch.nn.Module):
        super().__init__()
        self.tagger = tagger

    def forward(self, batch):  # noqa: D102
        return self.tagger.loss(batch)


def wrap_ddp(tagger: torch.nn.Module) -> torch.nn.Module:
    """The DDP module whose ``forward(batch)`` is ``tagger.loss(batch)``.

    ``find_unused_parameters``: a head may leave parameters unused in a step (ablation
    switches, a batch without images), which plain DDP takes for a hang.
    """
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(_LossOf(tagger), find_unused_parameters=True)


# -- the sampler ----------------------------------------------------------------------


def shard(batch: Sequence[int], rank: int, world_size: int) -> tuple[list[int], float]:
    """This rank's contiguous share of one global batch, and the weight of its loss.

    Shares differ in size by at most one; the weight ``len(share) * world_size /
    len(batch)`` makes the mean over ranks of the weighted per-rank mean losses equal
    the mean over the global batch, and hence the averaged gradients the one-process
    gradient. A rank left without an example (a global batch smaller than the world)
    gets the batch's first example with weight 0: DDP needs every rank to take part.

    Returns:
        ``(indices, weight)``.
    """
    n = len(batch)
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    size = base + (1 if rank < extra else 0)
    if size == 0:
        return [batch[0]], 0.0
    return list(batch[start : start + size]), size * world_size / n


def shard_batches(
    batches: Sequence[Sequence[int]], rank: int, world_size: int
) -> tuple[list[list[int]], list[float]]:
    """:func:`shard` of each global batch: this rank's batches and their loss weights."""
    out, weights = [], []
    for b in batches:
        idx, wt = shard(b, rank, world_size)
        out.append(idx)
        weights.append(wt)
    return out, weights


# -- gathering contrastive negatives across ranks -------------------------------------

_GATHER = {"on": False, "rows_valid": True, "sum_scale": 1.0}


@contextlib.contextmanager
def gathering(rows_valid: bool = True, sum_scale: float = 1.0) -> Iterator[None]:
    """Within the block (a DDP training step), contrastive losses gather across ranks.

    Args:
        rows_valid: False when this rank's batch is a weight-0 stand-in (see
            :func:`shard`): its rows then take part in no other rank's loss.
        sum_scale: the factor a loss term summed over this rank's rows only (a CRF or
            distillation loss with ``reduction="sum"``) is multiplied by
            (:func:`local_sum_scale`): the trainer weights each rank's loss for terms
            that are means over the rows (:func:`shard`), so a summed term needs
            ``len(batch) / len(share)`` on top to equal, after DDP's average, the sum
            over the global batch one process takes.
    """
    if not active():
        yield
        return
    before = dict(_GATHER)
    _GATHER.update(on=True, rows_valid=rows_valid, sum_scale=sum_scale)
    try:
        yield
    finally:
        _GATHER.update(before)


def sum_scale(weight: float, world_size: int) -> float:
    """The :func:`gathering` ``sum_scale`` of a rank whose loss weight is ``weight``.

    ``weight = len(share) * N / len(batch)`` (:func:`shard`) makes the ranks' weighted
    means average to the global mean; a term summed over the share needs ``N / weight``
    more, so that ``(1/N) sum_r weight_r * (N / weight_r) * S_r = sum_r S_r``, the global
    sum one process takes. A weight-0 stand-in contributes nothing either way.
    """
    return world_size / weight if weight > 0 else 0.0


def local_sum_scale() -> float:
    """The factor for a loss summed over this rank's rows (1.0 outside a DDP step).

    Losses gathered across ranks (:func:`gather_rows`) are global and need none.
    """
    return float(_GATHER["sum_scale"]) if gathering_active() else 1.0


def gathering_active() -> bool:
    """True while :func:`gathering` is on (a DDP training step with several ranks)."""
    return _GATHER["on"] and active()


class _AllGatherGrad(torch.autograd.Function):
    """All-gather along dim 0 that passes gradients back to the rank that owns each row.

    Every rank computes the same loss over the gathered rows, so the gradient of a row
    is the sum of the gradients all ranks computed for it (an all-reduce), of which
    this rank keeps its own rows. Works with gloo and NCCL alike.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:  # noqa: D102
        x = x.contiguous()
        n = dist.get_world_size(group)
        parts = [torch.empty_like(x) for _ in range(n)]
        dist.all_gather(parts, x, group=group)
        ctx.group, ctx.rank, ctx.rows = group, dist.get_rank(group), x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: D102
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        start = ctx.rank * ctx.rows
        return grad[start : start + ctx.rows], None


def gather_rows(
    tensors: Sequence[torch.Tensor], valid: torch.Tensor, site: str
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Concatenate, in rank order, every rank's rows of ``tensors`` (with gradients).

    Ranks may hold different numbers of rows (the last batch of an epoch): rows are
    padded to the largest count and the padding marked invalid.

    Args:
        tensors: (B_r, ...) tensors of this rank, all with the same B_r.
        valid: (B_r,) bool: which of this rank's rows take part.
        site: the caller's code location; every rank must be at the same one (a head
            calls the loss the same number of times on every rank, decided by its
            config, never by the data), which is checked so a mismatch is an error and
            not a hang or a silently wrong loss.

    Returns:
        ``(gathered tensors (sum B_r, ...), gathered valid (sum B_r,))``.
    """
    group = _GROUPS["loss"]
    dev = valid.device
    b = valid.shape[0]
    key = zlib.crc32(site.encode()) & 0x7FFFFFFF
    meta = torch.tensor([b, key], dtype=torch.long, device=dev)
    metas = [torch.empty_like(meta) for _ in range(dist.get_world_size(group))]
    dist.all_gather(metas, meta, group=group)
    sizes = [int(m[0]) for m in metas]
    if any(int(m[1]) != key for m in metas):
        raise RuntimeError(
            f"contrastive gather out of step: rank {dist.get_rank(group)} is at {site}, another rank "
            "elsewhere; a head must call info_nce the same number of times on every rank"
        )
    most = max(sizes)
    ok = valid.bool() & bool(_GATHER["rows_valid"])

    def pad(t: torch.Tensor) -> torch.Tensor:
        if t.shape[0] == most:
            return t
        return torch.cat([t, t.new_zeros((most - t.shape[0], *t.shape[1:]))], dim=0)

    keep = torch.cat([torch.arange(s, device=dev) + r * most for r, s in enumerate(sizes)])
    out = [_AllGatherGrad.apply(pad(t), group)[keep] for t in tensors]
    all_valid = _AllGatherGrad.apply(pad(ok.to(torch.uint8)), group)[keep].bool()
    return out, all_valid


def caller_site(depth: int = 2) -> str:
    """``file:line`` of the caller ``depth`` frames up (for :func:`gather_rows`)."""
    f = sys._getframe(depth)
    return f"{os.path.basename(f.f_code.co_filename)}:{f.f_lineno}"


# -- launching torchrun ---------------------------------------------------------------


def launch(nproc: int, argv: Sequence[str]) -> int:
    """Run ``mner ARGV`` under torchrun with ``nproc`` ranks on this machine.

    The same as ``torchrun --standalone --nproc-per-node NPROC -m mner ARGV`` (a free
    rendezvous port on localhost, so two launches never collide). Returns the exit code:
    0, or the first failed rank's (each rank has printed its own error line).

    Raises:
        ConfigError: ``nproc`` < 1, or already running under torchrun.
    """
    if nproc < 1:
        raise ConfigError(f"--nproc must be at least 1, got {nproc}")
    if world().world_size > 1:
        raise ConfigError("--nproc starts torchrun itself; under torchrun leave --nproc out")
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(
        ["--standalone", "--nproc-per-node", str(nproc), "--module", "mner", *argv]
    )
    # Keep torchrun's own chatter (rendezvous, OMP warning, its failure report) off the
    # user's terminal: each failed rank has printed its one-line error already.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    import logging

    for name in list(logging.Logger.manager.loggerDict):
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        run(args)
    except ChildFailedError as exc:
        codes = [f.exitcode for f in exc.failures.values()]
        return next((c for c in codes if c and c > 0), 1)
    return 0
