"""Extraction across processes and machines: ranks, shard plans, agreement, the launcher.

``torchrun --nproc-per-node N [--nnodes M --rdzv-...] -m mner extract ...`` (or ``mner
extract --nproc N``, which starts torchrun's launcher itself) runs one copy of the
extraction per rank. :func:`mner.extract.runner.run_extract` sees the torchrun
environment (``WORLD_SIZE`` > 1) and:

1. cuts the ordered image list (and the sentence list) into one contiguous slice per
   rank (:func:`split`). Cuts fall on batch boundaries of the one-process run, so every
   rank forms exactly the batches a one-process run forms and writes the same bytes;
   the plan is recorded in each shard, and a resume reuses the recorded plan (it never
   shifts), or stops with one line when the inputs or the world size changed;
2. writes its slice to its own resumable shard ``NAME.h5.shard-0000R-of-0000W``
   (durable like a one-process cache: ``.partial``, done flags, verified, renamed);
3. after every shard is complete, rank 0 merges them by copy into one self-contained
   ``NAME.h5`` (:func:`mner.cache.writer.merge_shards`) and only then removes them.

Ranks coordinate through a gloo process group (the collectives carry small Python
objects only, so gloo serves CUDA runs too): every phase ends with an all-gather in
which each rank reports its one-line error or None (:func:`agree`), so a user mistake
met by one rank stops all of them with the same line instead of leaving the others
waiting.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import hashlib
import json
import logging
import os
import re
import signal
import tempfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

from mner import errors
from mner.errors import CacheError, ConfigError, MnerError

T = TypeVar("T")

#: How long a rank waits in a collective for the others (the slowest shard's run time
#: plus the merge). A rank that dies closes its connections, which ends the wait at
#: once; this bound only matters for a machine that vanishes silently.
COLLECTIVE_TIMEOUT = _dt.timedelta(days=7)

#: Test hook ``RANK:BATCHES``: that rank kills itself (SIGKILL) after that many batches.
KILL_AFTER_ENV = "MNER_EXTRACT_KILL_RANK_AFTER"

_SHARD_RE = re.compile(r"\.shard-(\d{5})-of-(\d{5})(\.partial)?$")


@dataclasses.dataclass(frozen=True)
class World:
    """This process's place among the ranks (from torchrun's environment).

    Attributes:
        rank: Global rank (``RANK``).
        size: Number of ranks (``WORLD_SIZE``).
        local_rank: Rank on this machine (``LOCAL_RANK``): the CUDA device index.
        local_size: Ranks on this machine (``LOCAL_WORLD_SIZE``): they share its cores.
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1


def world() -> World:
    """The torchrun environment, or a world of one outside torchrun.

    Raises:
        ConfigError: The variables are set but not integers, or inconsistent.
    """
    env = os.environ
    if "WORLD_SIZE" not in env:
        return World()
    try:
        w = World(rank=int(env.get("RANK", "0")), size=int(env["WORLD_SIZE"]),
                  local_rank=int(env.get("LOCAL_RANK", env.get("RANK", "0"))),
                  local_size=int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])))
    except ValueError:
        raise ConfigError("RANK / WORLD_SIZE / LOCAL_RANK are not integers; start mner under "
                          "torchrun, or unset them") from None
    if not (0 <= w.rank < w.size and 0 <= w.local_rank < w.local_size <= w.size):
        raise ConfigError(f"RANK {w.rank}, WORLD_SIZE {w.size}, LOCAL_RANK {w.local_rank}, "
                          f"LOCAL_WORLD_SIZE {w.local_size} are inconsistent; start mner under torchrun")
    return w


def cpu_share(w: World) -> int:
    """Intra-op threads for one rank on a CPU: this machine's cores over its ranks (>= 1)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, w.local_size))


def rank_device(name: str, w: World) -> str:
    """The device of this rank: ``cuda:LOCAL_RANK`` for ``cuda``/``auto`` with CUDA, else ``name``.

    Raises:
        ConfigError: More ranks on this machine than visible GPUs, or ``cuda:i`` under
            several ranks (each rank takes its own GPU).
    """
    if w.size == 1:
        return name
    cuda = name == "cuda" or (name == "auto" and torch.cuda.is_available())
    if name.startswith("cuda:"):
        raise ConfigError(f"device {name!r} under {w.size} ranks: pass device cuda (each rank "
                          "uses cuda:LOCAL_RANK) or cpu")
    if not cuda:
        return name
    have = torch.cuda.device_count()
    if w.local_rank >= have:
        raise ConfigError(f"{w.local_size} ranks on this machine but {have} GPUs visible; pass "
                          f"--nproc-per-node {have} to torchrun (or --nproc {have})")
    return f"cuda:{w.local_rank}"


# -- shard plans -----------------------------------------------------------------------------


def split(n: int, size: int, unit: int) -> list[tuple[int, int]]:
    """Contiguous ``[start, stop)`` slices of ``n`` rows for ``size`` ranks, cut at multiples of ``unit``.

    Whole batches of ``unit`` rows are dealt out as evenly as possible, the first ranks
    taking the extra batches (the last batch may be short); a rank gets nothing when
    there are fewer batches than ranks. Depends only on ``n``, ``size`` and ``unit``.

    >>> split(10, 2, 4)
    [(0, 8), (8, 10)]
    """
    nb = -(-n // unit) if n else 0
    base, extra = divmod(nb, size)
    cuts = [min(n, (r * base + min(r, extra)) * unit) for r in range(size)] + [n]
    return [(cuts[r], cuts[r + 1]) for r in range(size)]


def list_digest(items: Sequence[str]) -> str:
    """sha256 of an ordered id list (what a shard plan was cut from)."""
    h = hashlib.sha256()
    for s in items:
        h.update(s.encode() + b"\n")
    return h.hexdigest()


def make_plan(ids: Sequence[str], keys: Sequence[str], size: int, batch: int, text_batch: int
              ) -> dict[str, Any]:
    """The shard plan of a run: boundaries for images and sentences, and what they were cut from."""
    return {"world_size": size, "batch_size": batch,
            "images": [list(b) for b in split(len(ids), size, batch)],
            "text": [list(b) for b in split(len(keys), size, text_batch)],
            "image_list_sha256": list_digest(ids), "text_list_sha256": list_digest(keys)}


def shard_path(out: Path, rank: int, size: int) -> Path:
    """Rank ``rank``'s shard of ``out``: ``NAME.h5.shard-0000R-of-0000W``."""
    return out.with_name(f"{out.name}.shard-{rank:05d}-of-{size:05d}")


def existing_shards(out: Path) -> dict[Path, int]:
    """Shard files of ``out`` on disk (complete or ``.partial``) -> the world size they belong to."""
    found: dict[Path, int] = {}
    if not out.parent.is_dir():
        return found
    for p in out.parent.glob(out.name + ".shard-*"):
        m = _SHARD_RE.search(p.name)
        if m and p.name.startswith(out.name + ".shard-"):
            found[p] = int(m.group(2))
    return found


def drop_merged_leftovers(out: Path, merged_size: int | None) -> None:
    """Delete complete shards of ``out`` left behind by a merge that was committed.

    A run stopped between renaming the merged cache into place and deleting the shards
    leaves complete shards of the world size ``out`` records; they hold nothing the
    cache lacks. Partial shards, or shards of another world size, are kept.
    """
    if not merged_size or merged_size < 2:
        return
    found = existing_shards(out)
    if found and all(n == merged_size and not p.name.endswith(".partial") for p, n in found.items()):
        for p in found:
            p.unlink(missing_ok=True)


def check_no_other_world(out: Path, size: int) -> None:
    """Stop when shards of ``out`` from a run with another world size are on disk.

    Raises:
        CacheError: One line naming a shard, its world size and the two ways on.
    """
    other = sorted((p, n) for p, n in existing_shards(out).items() if n != size)
    if other:
        p, n = other[0]
        how = "run with one process" if n == 1 else f"re-run with {n} processes (--nproc {n}, or torchrun with {n} ranks in all)"
        raise CacheError(f"{p}: shard of an interrupted extraction with {n} processes, this run "
                         f"has {size}; {how} to resume it, or pass --overwrite to start over")


# -- coordination ----------------------------------------------------------------------------


def init_group(w: World) -> bool:
    """Join the gloo process group of this torchrun job; True when this call created it."""
    import torch.distributed as dist

    if w.size == 1 or (dist.is_available() and dist.is_initialized()):
        return False
    dist.init_process_group("gloo", timeout=COLLECTIVE_TIMEOUT)
    return True


def gather(obj: Any, w: World) -> list[Any]:
    """Every rank's ``obj`` in rank order (a world of one: ``[obj]``)."""
    if w.size == 1:
        return [obj]
    import torch.distributed as dist

    got: list[Any] = [None] * w.size
    dist.all_gather_object(got, obj)
    return got


def agree(w: World, fn: Callable[[], T]) -> T:
    """Run ``fn`` on every rank; if any rank met a :class:`MnerError`, all raise the first one.

    A phase ends in this all-gather on every rank, so no rank walks into the next phase
    (or waits forever in it) while another has stopped.
    """
    value: T | None = None
    err: MnerError | None = None
    try:
        value = fn()
    except MnerError as exc:
        err = exc
    errs = [e for e in gather(_portable(err), w) if e is not None]
    if errs:
        kind, message = errs[0]
        raise getattr(errors, kind, MnerError)(message)
    return value  # type: ignore[return-value]


def _portable(err: MnerError | None) -> tuple[str, str] | None:
    return None if err is None else (type(err).__name__, str(err))


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into :class:`KeyboardInterrupt` for the block.

    torchrun stops the other ranks with SIGTERM when one fails (and forwards a
    scheduler's SIGTERM). Python's default would end the process inside an HDF5 write
    and leave a partial shard that cannot be verified (set aside, recomputed); raised
    between two statements instead, the writer closes its file and the shard resumes
    where it stopped.
    """
    def stop(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        before = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def kill_hook(w: World) -> int:
    """Batches after which this rank kills itself (:data:`KILL_AFTER_ENV`), 0 for never."""
    raw = os.environ.get(KILL_AFTER_ENV, "")
    if not raw:
        return 0
    rank, _, n = raw.partition(":")
    return int(n or 0) if int(rank) == w.rank else 0


# -- the launcher (``--nproc N``) ------------------------------------------------------------


def launch(nproc: int, entry: Callable[..., Any], *args: Any) -> Any:
    """Run ``entry(*args)`` on ``nproc`` local ranks through torchrun's launcher API.

    The same machinery as ``torchrun --standalone --nproc-per-node N``: a c10d
    rendezvous on a free local port, no restarts. Each rank's :class:`MnerError` is
    written to a file and re-raised here as the same one line.

    Returns:
        Rank 0's return value.

    Raises:
        MnerError: The first failing rank's one-line error, or one line naming the rank
            and its exit code when it died without one (killed, out of memory, a bug).
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    cfg = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, rdzv_backend="c10d",
                       rdzv_endpoint="localhost:0", run_id=str(uuid.uuid4()), max_restarts=0,
                       start_method="spawn", monitor_interval=0.1)
    # The agent logs each failed worker with a traceback of its own; the one line
    # raised below says what happened, so its loggers are muted while it runs.
    muted = {name: lg.level for name, lg in logging.root.manager.loggerDict.items()
             if isinstance(lg, logging.Logger) and name.startswith(("torch.distributed", "torch.multiprocessing"))}
    for name in muted:
        logging.getLogger(name).setLevel(logging.CRITICAL + 1)
    with tempfile.TemporaryDirectory(prefix="mner-nproc-") as errdir:
        try:
            results = elastic_launch(cfg, _entry)(errdir, entry, *args)
        except ChildFailedError as exc:
            raise _child_error(errdir, exc) from None
        finally:
            for name, level in muted.items():
                logging.getLogger(name).setLevel(level)
    return results[0]


def _entry(errdir: str, entry: Callable[..., Any], *args: Any) -> Any:
    """One rank of :func:`launch`: a :class:`MnerError` is saved for the launcher, exit 2."""
    try:
        return entry(*args)
    except MnerError as exc:
        rank = os.environ.get("RANK", "0")
        Path(errdir, f"rank-{rank}.json").write_text(json.dumps(_portable(exc)))
        raise SystemExit(2) from None


def _child_error(errdir: str, exc: Any) -> MnerError:
    saved = sorted(Path(errdir).glob("rank-*.json"), key=lambda p: int(p.stem.split("-")[1]))
    if saved:
        kind, message = json.loads(saved[0].read_text())
        return getattr(errors, kind, MnerError)(message)
    rank, failure = min(exc.failures.items())
    code = failure.exitcode
    how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
    return MnerError(f"extraction rank {rank} stopped ({how}); re-run the same command to resume")
