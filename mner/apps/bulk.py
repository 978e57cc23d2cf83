"""Bulk prediction: ``mner predict --input POSTS --out predictions.jsonl``.

Streams any number of posts through a :class:`~mner.apps.predict.Predictor`:

- **Streaming.** JSON-lines input is read line by line (CoNLL input, a dataset file, is
  read whole). Valid posts are cut into chunks of ``batch_size`` consecutive posts in
  input order; each chunk's images are extracted and its posts tagged together, and its
  output lines are written and flushed before the next chunk is read.
- **Output.** One JSON line per post, in input order:
  ``{"id", "line", "entities", "image_status"}`` with the entities in the Hugging Face
  pipeline's shape (:func:`mner.apps.predict.scored_entities`); ``line`` is the post's
  line in the input. A post whose image is missing or broken still gets its line, tagged
  without the image.
- **Malformed lines** (bad JSON or UTF-8, a wrong field) are reported on stderr as
  ``error: FILE:LINE: what is wrong`` and listed in ``OUT.problems.txt``; the other posts
  are predicted. The caller exits 2 when there were any (:attr:`BulkResult.problems`).
- **Resume.** A re-run with the same ``--out`` skips the posts already written
  (identified by input line, checked against their id: an output written for another
  input is refused). A kill can only tear the last line; it is detected and rewritten.
  Chunks depend only on the input, never on what was done, so a resumed file is byte for
  byte the uninterrupted one. The output is locked (:mod:`mner.locks`) against a second
  writer.
- **torchrun.** Under ``torchrun --nproc-per-node N -m mner predict ...`` rank r takes
  the chunks c with ``c % N == r`` (deterministic), writes them to its own resumable
  ``OUT.rank<r>-of-<N>`` file, and after a barrier rank 0 merges every shard in input
  order into ``OUT`` (written aside and renamed) and removes the shards. Each chunk is
  the same batch at any world size, so the merged file equals a one-process run's.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from mner.apps.predict import Post, Predictor, image_line, json_line_post, read_posts
from mner.errors import DataError
from mner.locks import locked

#: Test hook: ``MNER_TEST_PREDICT_KILL_AFTER=k`` makes the process SIGKILL itself after
#: writing k chunks and half of the next line (a torn line, as a real kill leaves).
KILL_ENV = "MNER_TEST_PREDICT_KILL_AFTER"
#: Posts per chunk (images extracted and posts tagged together) by default.
DEFAULT_BATCH_SIZE = 64


@dataclass(frozen=True)
class Item:
    """One input line: a post, or the reason it could not be read."""

    line: int
    post: Post | None = None
    problem: str | None = None


@dataclass
class BulkResult:
    """What a bulk prediction did.

    Attributes:
        written: posts predicted and written by this run (this rank).
        skipped: posts found already written (resume).
        problems: one ``FILE:LINE: what is wrong`` per malformed input line (rank 0).
        out: the output file.
    """

    written: int = 0
    skipped: int = 0
    problems: list[str] = field(default_factory=list)
    out: Path | None = None


def problems_path(out: Path) -> Path:
    """``OUT.problems.txt``: the malformed input lines of the last run on ``out``."""
    return out.with_name(out.name + ".problems.txt")


def shard_path(out: Path, rank: int, world: int) -> Path:
    """Rank ``rank``'s part of ``out`` under torchrun."""
    return out.with_name(f"{out.name}.rank{rank}-of-{world}")


def iter_items(path: Path, images_dir: Path | None) -> Iterator[Item]:
    """The input's lines as :class:`Item` in file order (JSON lines streamed).

    Raises:
        DataError: the file is missing or unreadable as a whole.
    """
    import re

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file; pass a .conll/.txt or .jsonl file")
    if path.suffix != ".jsonl":
        posts, problems = read_posts(path, images_dir)
        items = [Item(int(p.where.rsplit(":", 1)[1]), post=p) for p in posts]
        for msg in problems:
            m = re.match(re.escape(str(path)) + r":(\d+):", msg)
            items.append(Item(int(m.group(1)) if m else 0, problem=msg))
        yield from sorted(items, key=lambda it: it.line)
        return
    try:
        f = path.open("rb")
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc}); check the file's permissions") from None
    with f:
        # Only "\n" ends a line: JSON escapes every other line break inside strings.
        for n, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                yield Item(n, problem=f"{path}:{n}: not UTF-8 text ({exc.reason} at byte {exc.start}); "
                                      "re-encode the file as UTF-8")
                continue
            if not line.strip():
                continue
            try:
                yield Item(n, post=json_line_post(line, n, path, images_dir))
            except ValueError as exc:
                yield Item(n, problem=f"{path}:{n}: {exc}")


def count_lines(path: Path) -> int | None:
    """Lines of the input (for the progress bar's ETA), or None when it cannot be read."""
    try:
        with Path(path).open("rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
    except OSError:
        return None


def read_done(path: Path, *, repair: bool) -> dict[int, str]:
    """``{input line: id}`` of the posts an output file already holds.

    Args:
        path: the output (or a rank's part); absent means nothing done.
        repair: cut a torn last line (no newline: a killed writer) off the file;
            otherwise it is just ignored.

    Raises:
        DataError: a complete line that is not a prediction (not this tool's file).
    """
    path = Path(path)
    if not path.exists():
        return {}
    data = path.read_bytes()
    cut = data.rfind(b"\n") + 1
    if cut < len(data) and repair:
        with path.open("r+b") as f:
            f.truncate(cut)
    done: dict[int, str] = {}
    for i, raw in enumerate(data[:cut].split(b"\n")[:-1], start=1):
        try:
            rec = json.loads(raw)
            done[int(rec["line"])] = str(rec["id"])
        except (ValueError, KeyError, TypeError):
            raise DataError(
                f"{path}:{i}: not a line of `mner predict --out`; the file is damaged or another file: "
                "remove it (or choose another --out) and run again"
            ) from None
    return done


def _dist() -> tuple[int, int]:
    """``(rank, world size)`` under torchrun (process group set up here), else ``(0, 1)``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        # Bulk prediction only synchronises once (before the merge): gloo, on any device.
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def predict_file(
    predictor: Predictor | Callable[[], Predictor],
    input_file: str | os.PathLike,
    out: str | os.PathLike,
    *,
    images: str | os.PathLike | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    strict_images: bool = False,
    progress: bool | None = None,
    echo: Callable[[str], None] | None = None,
) -> BulkResult:
    """Predict every post of ``input_file`` into the JSON-lines file ``out`` (see module doc).

    Args:
        predictor: a :class:`Predictor`, or a function making one (called only when there
            is something to predict).
        input_file: JSON lines (streamed) or CoNLL.
        out: the output file; an existing one is resumed.
        images: the folder ``image_id``s are looked up in (default: ``images/`` beside
            the input, if any).
        batch_size: posts per chunk.
        strict_images: stop (DataError) at the first post whose named image is not ok,
            before its chunk is tagged; what was written stays (a re-run resumes).
        progress: show a progress bar on stderr (None: when stderr is a terminal).
        echo: where warning/error lines go (default: stderr).

    Returns:
        A :class:`BulkResult`. The caller decides the exit status from its ``problems``.

    Raises:
        DataError: unreadable input, an output written for another input, or
            ``strict_images`` and a bad image.
    """
    from tqdm import tqdm

    echo = echo or (lambda m: print(m, file=sys.stderr, flush=True))
    input_file, out = Path(input_file), Path(out)
    if batch_size < 1:
        raise DataError(f"--batch-size {batch_size}: must be at least 1")
    if images is None and (input_file.parent / "images").is_dir():
        images = input_file.parent / "images"
    images = None if images is None else Path(images)
    if not input_file.is_file():
        raise DataError(f"{input_file}: no such file; pass a .conll/.txt or .jsonl file")
    rank, world = _dist()
    target = out if world == 1 else shard_path(out, rank, world)
    result = BulkResult(out=out)
    state = {"predictor": predictor if isinstance(predictor, Predictor) else None}
    kill_after = int(os.environ.get(KILL_ENV, "-1"))
    chunks_written = 0

    def get_predictor() -> Predictor:
        if state["predictor"] is None:
            state["predictor"] = predictor()
        return state["predictor"]

    out.parent.mkdir(parents=True, exist_ok=True)
    with locked(target, folder=False, what="predictions file"):
        done = read_done(target, repair=True)
        if world > 1:  # posts of an earlier (complete or one-process) output count too
            done.update(read_done(out, repair=False))
        bar = tqdm(total=count_lines(input_file), unit="line", desc="predict", file=sys.stderr,
                   disable=(not sys.stderr.isatty()) if progress is None else not progress or rank != 0,
                   dynamic_ncols=True, smoothing=0.1)

        def say(msg: str) -> None:
            # Through the bar when it is shown, so that lines and bar do not overprint.
            if bar.disable:
                echo(msg)
            else:
                bar.write(msg, file=sys.stderr)

        with target.open("a", encoding="utf-8", newline="\n") as f:

            def run_chunk(chunk: list[Item]) -> None:
                nonlocal chunks_written
                for it in chunk:
                    if it.line in done and done[it.line] != it.post.id:
                        raise DataError(
                            f"{target}: input line {it.line} was post {done[it.line]!r} there but is "
                            f"{it.post.id!r} in {input_file}; the output was written for another input: "
                            "remove it or choose another --out"
                        )
                todo = [it for it in chunk if it.line not in done]
                result.skipped += len(chunk) - len(todo)
                if not todo:
                    return
                pred = get_predictor()
                # The whole chunk is tagged even when part of it was written before: its
                # batches (and so its scores, to the last bit) stay those of the first run.
                posts = [it.post for it in chunk]
                checks, warnings = pred.check_posts(posts, strict=strict_images)
                for w in warnings:
                    say(w)
                results = pred.tag(posts, checks)
                lines = []
                for it, c, r in zip(chunk, checks, results, strict=True):
                    if c.ok and not r.image.ok:  # decoded, then failed in the extractors
                        say(f"warning: {image_line(it.post, r.image)}; tagged without it")
                    if it.line not in done:
                        lines.append(json.dumps(r.record(it.post.id, it.line), ensure_ascii=False) + "\n")
                if chunks_written == kill_after:
                    f.write(lines[0][: len(lines[0]) // 2])
                    f.flush()
                    os.kill(os.getpid(), signal.SIGKILL)
                f.write("".join(lines))
                f.flush()
                chunks_written += 1
                result.written += len(lines)

            chunk: list[Item] = []
            n_posts = 0
            for it in iter_items(input_file, images):
                bar.update(1)
                if it.problem is not None:
                    if rank == 0:
                        result.problems.append(it.problem)
                        say(f"error: {it.problem}")
                    continue
                if (n_posts // batch_size) % world == rank:
                    chunk.append(it)
                n_posts += 1
                if n_posts % batch_size == 0 and chunk:
                    run_chunk(chunk)
                    chunk = []
            if chunk:
                run_chunk(chunk)
        bar.close()
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        if rank == 0:
            _merge(out, [shard_path(out, r, world) for r in range(world)])
        dist.barrier()
    if rank == 0:
        _write_problems(out, result.problems)
    return result


def _merge(out: Path, shards: list[Path]) -> None:
    """Rank 0: every shard's lines (and those already in ``out``) into ``out``, by input line."""
    with locked(out, folder=False, what="predictions file"):
        lines: dict[int, bytes] = {}
        for p in [out, *shards]:
            if not p.exists():
                continue
            data = p.read_bytes()
            for raw in data[: data.rfind(b"\n") + 1].split(b"\n")[:-1]:
                lines.setdefault(int(json.loads(raw)["line"]), raw)
        tmp = out.with_name(out.name + ".partial")
        with tmp.open("wb") as f:
            for n in sorted(lines):
                f.write(lines[n] + b"\n")
        os.replace(tmp, out)
        for p in shards:
            p.unlink(missing_ok=True)


def _write_problems(out: Path, problems: list[str]) -> None:
    """``OUT.problems.txt`` with this run's malformed lines; removed when there are none."""
    path = problems_path(out)
    if not problems:
        path.unlink(missing_ok=True)
        return
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text("".join(p + "\n" for p in problems), encoding="utf-8")
    os.replace(tmp, path)
