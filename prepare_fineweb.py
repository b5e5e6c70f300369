"""Tokenise text into GPT-2 token shards for pretraining, in the llm.c / modded-nanogpt format.

    python prepare_fineweb.py                                      # FineWeb-Edu sample-10BT -> edu_fineweb10B/
    python prepare_fineweb.py --data_files 'corpus/*.parquet'      # local files (parquet, json/jsonl, txt, arrow)
    python prepare_fineweb.py --source python_docs --max_tokens 400000 --shard_size 100000 --output_dir demo_data

Every document becomes <|endoftext|> followed by its `encode_ordinary` tokens, in document
order, whatever --num_proc. The first --val_tokens tokens go to val_000000.bin, ... and the
rest to train_000000.bin, ... (see fineweb_shards.py for the format). manifest.json beside
the shards records the source, the tokenizer and every shard; a shard is written to a
temporary name and renamed when complete, so re-running the same command after a crash, a full disk or
Ctrl-C keeps the complete shards and carries on from the first missing one.

--num_proc worker processes tokenise; the main process puts their results in order and writes
the shards. Where the documents come from, and which process reads them, is text_sources.py's part.
"""

import argparse
import contextlib
import functools
import itertools
import json
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from multiprocessing.pool import Pool
from pathlib import Path
from typing import Any

import numpy as np
import tiktoken
from tqdm import tqdm

if __package__:  # installed: these modules are the package gpt_moe
    from .command_line import ArgumentParser, UsageError, replace_file, write_failed
    from .fineweb_shards import MAGIC, SHARD_SUFFIXES, VERSION, ShardError, open_shard, write_shard
    from .gpt2_tokenizer import EOT_ID, VOCAB_SHA256, VOCAB_SIZE, get_encoding
    from .text_sources import Source, close_parquet_files, source_from_args, source_from_record
else:  # a script or module of a clone, whose root is on sys.path
    from command_line import ArgumentParser, UsageError, replace_file, write_failed
    from fineweb_shards import MAGIC, SHARD_SUFFIXES, VERSION, ShardError, open_shard, write_shard
    from gpt2_tokenizer import EOT_ID, VOCAB_SHA256, VOCAB_SIZE, get_encoding
    from text_sources import Source, close_parquet_files, source_from_args, source_from_record

MANIFEST = "manifest.json"
TASKS_IN_FLIGHT = 4  # per worker; bounds memory however fast the source reads


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--source",
        choices=["hub", "files", "python_docs"],
        default=None,
        help="hub: --dataset; files: --data_files; python_docs: docstrings of the Python standard "
        "library and installed packages (offline). Default: files if --data_files is given, else hub",
    )
    parser.add_argument("--dataset", default="HuggingFaceFW/fineweb-edu", help="Hub dataset, streamed")
    parser.add_argument("--dataset_config", default="sample-10BT")
    parser.add_argument("--dataset_split", default="train")
    parser.add_argument("--data_files", nargs="+", metavar="GLOB", help="local files instead of the Hub")
    parser.add_argument("--text_column", default="text")
    parser.add_argument("--output_dir", default="edu_fineweb10B")
    parser.add_argument("--shard_size", type=int, default=100_000_000, help="tokens per shard")
    parser.add_argument(
        "--val_tokens", type=int, default=None, help="first tokens, for validation (default: one shard)"
    )
    parser.add_argument("--max_tokens", type=int, default=None, help="stop after this many tokens (default: all)")
    parser.add_argument("--num_proc", type=int, default=os.cpu_count() or 1, help="tokenising processes")
    parser.add_argument("--overwrite", action="store_true", help="replace shards prepared from another source")
    args = parser.parse_args(argv)
    args.source = args.source or ("files" if args.data_files else "hub")
    args.val_tokens = args.shard_size if args.val_tokens is None else args.val_tokens
    if args.source == "files" and not args.data_files:
        parser.error("--source files needs --data_files")
    if args.source != "files" and args.data_files:
        parser.error(f"--data_files cannot be combined with --source {args.source}")
    if not 0 < args.shard_size < 2**31:
        parser.error("--shard_size must be between 1 and 2**31 - 1 (the header stores it as int32)")
    if args.val_tokens < 0:
        parser.error("--val_tokens must be >= 0")
    if args.max_tokens is not None and args.max_tokens <= args.val_tokens:
        parser.error(f"--max_tokens {args.max_tokens} leaves no training tokens after --val_tokens {args.val_tokens}")
    if args.num_proc < 1:
        parser.error("--num_proc must be >= 1")
    return args


# -----------------------------------------------------------------------------
# tokenisation, in order, across processes


def tokenizing_tasks(source: Source, skip: int) -> tuple[Callable, Iterator]:
    """(function, its tasks) that tokenise the documents of `source` after the first `skip`, in order; fails here,
    before anything is written, if there are none or the source's first read finds a mistake."""
    read, tasks = source.tasks(skip)
    first = next(tasks, None)
    if first is None and not skip:
        raise UsageError(f"the input has no documents ({source.describe()})")
    return functools.partial(tokenize_task, read), itertools.chain([] if first is None else [first], tasks)


def tokenize_task(read: Callable[[Any], list[str]], task: Any) -> tuple[np.ndarray, np.ndarray]:
    """tokenize() of the texts that read(task) gives in this process (a worker, or the main one)."""
    return tokenize(read(task))


def tokenize(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """<|endoftext|> + tokens of each text, concatenated (uint16), and each document's token count."""
    encoding = get_encoding()
    docs = [encode_ordinary_to_numpy(encoding, text) for text in texts]
    eot = np.array([EOT_ID], dtype=np.uint32)
    tokens = np.concatenate([part for doc in docs for part in (eot, doc)], dtype=np.uint16)
    return tokens, np.array([len(doc) + 1 for doc in docs], dtype=np.int64)


def encode_ordinary_to_numpy(encoding: tiktoken.Encoding, text: str) -> np.ndarray:
    """encode_ordinary(text) as uint32, without building a Python int per token."""
    try:
        # with no special tokens allowed or disallowed, encode() is encode_ordinary() for valid text (tiktoken)
        return encoding.encode_to_numpy(text, disallowed_special=())
    except UnicodeEncodeError:  # lone surrogates (docstrings may have "\udXXX"): encode_ordinary() replaces them
        return np.array(encoding.encode_ordinary(text), dtype=np.uint32)


def tokenized(
    work: Callable, tasks: Iterable, pool: Pool | None, num_proc: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """work(task) of each task, in input order, computed by the pool (None: in this process)."""
    if pool is None:
        yield from map(work, tasks)
        return
    pending = deque()
    for task in tasks:
        pending.append(pool.apply_async(work, (task,)))
        # hand results on as soon as they are ready, and wait once enough work is queued
        while pending and (pending[0].ready() or len(pending) >= TASKS_IN_FLIGHT * num_proc):
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def init_worker() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is handled by the main process, which ends the pool
    # Pool.terminate() ends workers with SIGTERM: keep its default action in a worker forked while the main process
    # had a handler for it (one the pool re-creates after sigterm_as_ctrl_c, or a caller's own)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    get_encoding()


def worker_pool(num_proc: int) -> contextlib.AbstractContextManager[Pool | None]:
    if num_proc == 1:
        return contextlib.nullcontext()
    # fork starts workers in milliseconds with the tokenizer loaded; spawn would re-import torch and datasets
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
    return context.Pool(num_proc, initializer=init_worker)


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C; the exit status still says which signal it was."""


def raise_terminated(signum: int, frame) -> None:
    raise Terminated


@contextlib.contextmanager
def sigterm_as_ctrl_c() -> Iterator[None]:
    """SIGTERM (from `kill` or a job scheduler) ends the run as Ctrl-C does: the pool is ended, complete shards
    are kept. Entered once the workers exist: a worker forked with this handler could swallow the SIGTERM with
    which Pool.terminate() ends it, and hang the pool."""
    if threading.current_thread() is not threading.main_thread():  # where Python can set signal handlers
        yield
        return
    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# -----------------------------------------------------------------------------
# the output directory: manifest, resume, shards


def new_manifest(source: dict, args: argparse.Namespace) -> dict:
    return {
        "source": source,
        "tokenizer": {"name": "gpt2", "vocab_sha256": VOCAB_SHA256, "vocab_size": VOCAB_SIZE, "eot_id": EOT_ID},
        "settings": {"shard_size": args.shard_size, "val_tokens": args.val_tokens, "max_tokens": args.max_tokens},
        "format": f"256 int32 header (magic {MAGIC}, version {VERSION}, token count), then uint16 tokens",
        "complete": False,
        "total_tokens": 0,
        "documents": 0,
        # per shard: the stream continues at token `end_offset` of document `end_document`
        "shards": [],
    }


def shard_files(output_dir: Path) -> list[Path]:
    """Files the loader would read as shards of either split."""
    return [
        p
        for p in sorted(output_dir.iterdir())
        if p.suffix in SHARD_SUFFIXES and ("train" in p.name or "val" in p.name)
    ]


def resume_point(output_dir: Path, manifest: dict, overwrite: bool) -> dict:
    """The manifest to continue from: the existing one up to its last intact shard, or `manifest` to start afresh."""
    path = output_dir / MANIFEST
    if overwrite or not output_dir.is_dir():
        return manifest
    if not path.is_file():
        if shard_files(output_dir):
            raise UsageError(
                f"{output_dir} holds shards not written by this script (no {MANIFEST}); "
                "pass --overwrite to replace them, or choose another --output_dir"
            )
        return manifest
    try:
        existing = json.loads(path.read_text())
        identity = {k: existing[k] for k in ("source", "tokenizer", "settings")}
    except (ValueError, KeyError) as e:
        raise UsageError(f"{path} is unreadable ({e}); pass --overwrite to start afresh") from e
    changed = [k for k, v in identity.items() if v != manifest[k]]
    if changed:
        prepared_from = source_from_record(existing["source"]).describe()
        raise UsageError(
            f"{output_dir} was prepared from {prepared_from} with other {' and '.join(changed)}; "
            "pass --overwrite to replace its shards, or choose another --output_dir"
        )
    intact = list(
        itertools.takewhile(lambda s: shard_is_intact(output_dir / s["name"], s["tokens"]), existing["shards"])
    )
    if len(intact) < len(existing["shards"]):
        existing["complete"] = False
    existing["shards"] = intact
    return existing


def shard_is_intact(path: Path, tokens: int) -> bool:
    try:
        return path.is_file() and len(open_shard(path)) == tokens
    except ShardError:
        return False


def reports_write_faults(write: Callable) -> Callable:
    """`write(output_dir, ...)` with an OSError (a full disk, a read-only folder) turned into a one-line UsageError
    that says how many complete shards are kept and that the same command resumes. The temporary files of the failed
    write are removed at once: they hold space the user is short of."""

    @functools.wraps(write)
    def reported(output_dir: Path, *args) -> None:
        try:
            write(output_dir, *args)
        except OSError as error:
            for temporary in output_dir.glob("*.tmp"):
                with contextlib.suppress(OSError):  # in a read-only folder there are none, and removing fails
                    temporary.unlink()
            kept = f"{recorded_shards(output_dir)} complete shard(s) kept"
            raise UsageError(write_failed(output_dir, error, kept, "rerun the same command to resume")) from None

    return reported


def recorded_shards(output_dir: Path) -> int:
    """How many shards the manifest on disk records: those a rerun keeps."""
    try:
        return len(json.loads((output_dir / MANIFEST).read_text())["shards"])
    except (OSError, ValueError, KeyError):
        return 0


@reports_write_faults
def clear_for_writing(output_dir: Path, manifest: dict, overwrite: bool) -> None:
    """Remove temporary files and every shard not kept by `manifest` (all of them with --overwrite)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    kept = {s["name"] for s in manifest["shards"]}
    for path in shard_files(output_dir) + sorted(output_dir.glob("*.tmp")):
        if overwrite or path.name not in kept:
            path.unlink()
    write_manifest(output_dir, manifest)


@reports_write_faults
def write_manifest(output_dir: Path, manifest: dict) -> None:
    manifest["total_tokens"] = sum(s["tokens"] for s in manifest["shards"])
    replace_file(output_dir / MANIFEST, json.dumps(manifest, indent=2) + "\n")


def next_shard(position: int, settings: dict) -> tuple[str, int]:
    """Name and size of the shard starting at token `position` of the stream."""
    shard_size, val_tokens, max_tokens = settings["shard_size"], settings["val_tokens"], settings["max_tokens"]
    if position < val_tokens:
        name, size = f"val_{position // shard_size:06d}.bin", min(shard_size, val_tokens - position)
    else:
        name, size = f"train_{(position - val_tokens) // shard_size:06d}.bin", shard_size
    return name, size if max_tokens is None else min(size, max_tokens - position)


@reports_write_faults
def save_shard(output_dir: Path, manifest: dict, name: str, tokens: np.ndarray, end: tuple[int, int]) -> None:
    """Write a shard under a temporary name, rename it, then record it (with where the stream goes on)."""
    temporary = output_dir / (name + ".tmp")
    write_shard(temporary, tokens)
    os.replace(temporary, output_dir / name)
    manifest["shards"].append({"name": name, "tokens": len(tokens), "end_document": end[0], "end_offset": end[1]})
    manifest["documents"] = end[0]
    write_manifest(output_dir, manifest)


def stream_position(manifest: dict) -> tuple[int, int]:
    """(document, token within it) where the shards of `manifest` end and the next one starts."""
    last = manifest["shards"][-1] if manifest["shards"] else {"end_document": 0, "end_offset": 0}
    return last["end_document"], last["end_offset"]


def write_shards(batches: Iterator[tuple[np.ndarray, np.ndarray]], manifest: dict, output_dir: Path) -> int:
    """Write `batches`, (tokens, token count per document) of the documents from stream_position(manifest) on, into
    the shards that follow the ones `manifest` already has; returns the number of tokens written."""
    settings = manifest["settings"]
    position = start = sum(s["tokens"] for s in manifest["shards"])
    document, skip = stream_position(manifest)
    name, size = next_shard(position, settings)
    buffer, filled = np.empty(size, dtype=np.uint16), 0
    progress = tqdm(total=settings["max_tokens"], initial=position, unit="tok", unit_scale=True, desc="tokenising")
    with progress:
        for tokens, lengths in batches:
            ends = np.cumsum(lengths)
            cursor, skip = skip, 0  # a resumed stream goes on mid-document
            while cursor < len(tokens) and size > 0:
                take = min(size - filled, len(tokens) - cursor)
                buffer[filled : filled + take] = tokens[cursor : cursor + take]
                filled, cursor = filled + take, cursor + take
                progress.update(take)
                if filled == size:
                    done = int(np.searchsorted(ends, cursor, side="right"))
                    offset = cursor - (int(ends[done - 1]) if done else 0)
                    save_shard(output_dir, manifest, name, buffer, (document + done, offset))
                    position += filled
                    name, size = next_shard(position, settings)
                    buffer, filled = np.empty(max(size, 0), dtype=np.uint16), 0
            document += len(lengths)
            if size <= 0:
                break
    if filled:
        save_shard(output_dir, manifest, name, buffer[:filled], (document, 0))
        position += filled
    return position - start


def summary(manifest: dict) -> str:
    val = sum(s["tokens"] for s in manifest["shards"] if s["name"].startswith("val"))
    total = manifest["total_tokens"]
    shards, documents = len(manifest["shards"]), manifest["documents"]
    return f"{val:,} val + {total - val:,} train tokens in {shards} shards, from {documents:,} documents"


def check_has_training_tokens(manifest: dict) -> None:
    if not any(s["name"].startswith("train") for s in manifest["shards"]):
        raise UsageError(
            f"the input gave only {manifest['total_tokens']:,} tokens, all of them validation "
            f"(--val_tokens {manifest['settings']['val_tokens']}); re-run with a lower --val_tokens and --overwrite"
        )


def prepare(args: argparse.Namespace) -> dict:
    """Everything the command does, for `parse_args` arguments; returns the final manifest."""
    started = time.perf_counter()
    get_encoding()  # checks the vocabulary file before any work; forked workers inherit it
    output_dir = Path(args.output_dir)
    source = source_from_args(args)
    manifest = resume_point(output_dir, new_manifest(source.record(), args), args.overwrite)
    if manifest["complete"]:
        print(f"{output_dir} is already complete: {summary(manifest)}")
        check_has_training_tokens(manifest)
        return manifest
    kept = len(manifest["shards"])
    try:
        with worker_pool(args.num_proc) as pool, sigterm_as_ctrl_c():
            work, tasks = tokenizing_tasks(source, skip=stream_position(manifest)[0])
            clear_for_writing(output_dir, manifest, args.overwrite)
            written = write_shards(tokenized(work, tasks, pool, args.num_proc), manifest, output_dir)
    finally:
        close_parquet_files()
    manifest["complete"] = True
    write_manifest(output_dir, manifest)
    seconds = time.perf_counter() - started
    resumed = f" (kept {kept} complete shards)" if kept else ""
    print(f"{output_dir}: {summary(manifest)}{resumed}")
    print(f"tokenised {written:,} tokens in {seconds:.1f} s: {written / seconds:,.0f} tokens/s")
    check_has_training_tokens(manifest)
    return manifest


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        prepare(args)
    except UsageError as e:
        sys.exit(f"prepare_fineweb.py: error: {e}")
    except KeyboardInterrupt as interrupt:
        print(
            "\nprepare_fineweb.py: interrupted; complete shards are kept: re-run the command to resume",
            file=sys.stderr,
        )
        sys.exit(128 + (signal.SIGTERM if isinstance(interrupt, Terminated) else signal.SIGINT))


if __name__ == "__main__":
    main()
