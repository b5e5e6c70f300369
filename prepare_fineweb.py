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
the shards. Local parquet files are read by the workers themselves, each given row ranges
planned from the files' footers; other sources are read by the main process, which hands the
text on.
"""

import argparse
import ast
import contextlib
import functools
import glob
import itertools
import json
import logging
import math
import multiprocessing
import os
import platform
import signal
import sys
import sysconfig
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from multiprocessing.pool import Pool
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import tiktoken
from datasets import IterableDataset, load_dataset
from datasets.exceptions import DatasetNotFoundError
from tqdm import tqdm

if __package__:  # installed: these modules are the package gpt_moe
    from .command_line import ArgumentParser, write_failed
    from .fineweb_shards import MAGIC, SHARD_SUFFIXES, VERSION, ShardError, open_shard, write_shard
    from .gpt2_tokenizer import EOT_ID, VOCAB_SHA256, VOCAB_SIZE, get_encoding
else:  # a script or module of a clone, whose root is on sys.path
    from command_line import ArgumentParser, write_failed
    from fineweb_shards import MAGIC, SHARD_SUFFIXES, VERSION, ShardError, open_shard, write_shard
    from gpt2_tokenizer import EOT_ID, VOCAB_SHA256, VOCAB_SIZE, get_encoding

MANIFEST = "manifest.json"
DATA_FILE_FORMATS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".txt": "text", ".arrow": "arrow"}
TASK_CHARS = 250_000  # text per worker task: ~60k tokens, ~20 ms of tokenising, so IPC costs little
# parquet text per worker task, ~250k tokens: larger than TASK_CHARS so that more row groups fit in one task, and
# are decoded once (see parquet_tasks)
PARQUET_TASK_BYTES = 1_000_000
# The footer's size of a dictionary-encoded column counts repeated text once: 2,000 copies of a 100 KB document look
# like 100 KB. So a task takes at most this many rows, whatever the footer says. FineWeb-Edu's documents average
# ~1,000 tokens (~4.5 KB), ~220 in 1 MB: the cap binds only where rows average under 1 KB, and there it makes tasks
# smaller. It bounds rows, not bytes: a task can still hold 1,024 of the longest documents (x 100 KB = 100 MB).
PARQUET_TASK_ROWS = 1024
READ_ROWS = 256  # rows decoded or converted from Arrow at a time
TASKS_IN_FLIGHT = 4  # per worker; bounds memory however fast the source reads
# what datasets' readers raise for a malformed local file: bad JSON (pyarrow's reader for .jsonl, ujson's ValueError
# for a .json array), a lone surrogate escape, text that is not UTF-8 (UnicodeDecodeError, a ValueError)
UNREADABLE_FILE_ERRORS = (pa.ArrowException, ValueError)
PYTHON_DOCS_SEED = 0  # of the python_docs source's document order
SKIPPED_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests"}  # tests are code, not prose


class UsageError(Exception):
    """A mistake in the command or the input: reported as one line, without a traceback."""


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
# sources: each yields the documents' text, in a fixed order


def describe_source(args: argparse.Namespace) -> dict:
    """What the text comes from; a directory is only resumed from the same source."""
    if args.source == "python_docs":
        return {
            "kind": "python_docs",
            "python": platform.python_version(),
            "roots": python_roots(),
            "order": f"shuffled, seed {PYTHON_DOCS_SEED}",
        }
    if args.source == "files":
        return {"kind": "files", "data_files": resolve_data_files(args.data_files), "text_column": args.text_column}
    return {
        "kind": "hub",
        "dataset": args.dataset,
        "config": args.dataset_config,
        "split": args.dataset_split,
        "text_column": args.text_column,
    }


def resolve_data_files(patterns: list[str]) -> list[str]:
    """Absolute paths of the files each glob matches, sorted per pattern; all of one format."""
    files = []
    for pattern in patterns:
        matches = sorted(os.path.abspath(p) for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        if not matches:
            raise UsageError(f"no files match --data_files {pattern!r}")
        files = list(dict.fromkeys(files + matches))  # each file once, in the order given
    suffixes = sorted({Path(f).suffix.lower() for f in files})
    unknown = [s for s in suffixes if s not in DATA_FILE_FORMATS]
    if unknown:
        raise UsageError(f"cannot read {', '.join(unknown)} files; --data_files takes {', '.join(DATA_FILE_FORMATS)}")
    if len({DATA_FILE_FORMATS[s] for s in suffixes}) > 1:
        raise UsageError(f"--data_files mixes formats ({', '.join(suffixes)}); prepare one format at a time")
    return files


def tokenizing_tasks(source: dict, skip: int) -> tuple[Callable, Iterator]:
    """(function, its tasks) that tokenise the documents of `source` after the first `skip`, in order; fails here,
    before anything is written, if there are none or a parquet file's footer or schema is wrong."""
    if is_local_parquet(source):
        # the workers read the rows themselves: the main process neither decodes nor converts the text
        work = functools.partial(tokenize_rows, source["text_column"])
        tasks = parquet_tasks(source["data_files"], source["text_column"], skip)
    else:
        work, tasks = tokenize, batched(open_documents(source, skip), TASK_CHARS)
    first = next(tasks, None)
    if first is None and not skip:
        raise UsageError(f"the input has no documents ({describe(source)})")
    return work, itertools.chain([] if first is None else [first], tasks)


def is_local_parquet(source: dict) -> bool:
    return source["kind"] == "files" and file_format(source["data_files"]) == "parquet"


def file_format(files: list[str]) -> str:
    """The datasets builder that reads `files` (all of one format: see resolve_data_files)."""
    return DATA_FILE_FORMATS[Path(files[0]).suffix.lower()]


def open_documents(source: dict, skip: int) -> Iterator[str]:
    """The text of the documents of `source` after the first `skip`."""
    if source["kind"] == "python_docs":
        return itertools.islice(python_docstrings(), skip, None)
    if source["kind"] == "files":
        return file_documents(source["data_files"], source["text_column"], skip)
    return hub_documents(source["dataset"], source["config"], source["split"], source["text_column"], skip)


def describe(source: dict) -> str:
    if source["kind"] == "python_docs":
        return f"docstrings of Python {source['python']} ({', '.join(source['roots'])})"
    if source["kind"] == "files":
        files = source["data_files"]
        return f"{len(files)} local file(s): {', '.join(files[:3])}{', ...' if len(files) > 3 else ''}"
    return f"Hub dataset {source['dataset']} ({source['config']}, split {source['split']})"


def file_documents(files: list[str], text_column: str, skip: int) -> Iterator[str]:
    builder = file_format(files)
    try:
        dataset = streamed_files(builder, files)
    except StopIteration:  # datasets' json reader, when every file is empty
        return
    try:
        yield from dataset_texts(dataset, text_column, skip, describe({"kind": "files", "data_files": files}))
    except UNREADABLE_FILE_ERRORS as e:
        raise UsageError(f"{unreadable_file(builder, files)}: cannot read it as {builder} ({one_line(e)})") from e


def streamed_files(builder: str, files: list[str]) -> IterableDataset:
    # a .txt file is one document, not one per line
    options = {"sample_by": "document"} if builder == "text" else {}
    return load_dataset(builder, data_files=files, split="train", streaming=True, **options)


def unreadable_file(builder: str, files: list[str]) -> str:
    """The first of `files` that fails to read on its own. Called once reading all of them failed: datasets' error
    (a JSON syntax error, text that is not UTF-8) does not say which file it was in."""
    if len(files) == 1:
        return files[0]
    print(f"prepare_fineweb.py: reading the {len(files)} files one by one to find the unreadable one", file=sys.stderr)
    datasets_logger = logging.getLogger("datasets")
    level = datasets_logger.level
    datasets_logger.setLevel(logging.CRITICAL)  # it already logged the failure once
    try:
        for path in files:
            if not is_readable(builder, path):
                return path
    finally:
        datasets_logger.setLevel(level)
    return describe({"kind": "files", "data_files": files})


def is_readable(builder: str, path: str) -> bool:
    try:
        for table in streamed_files(builder, [path]).with_format("arrow").iter(batch_size=READ_ROWS):
            table.validate(full=True)  # checks the UTF-8 that pyarrow's JSON reader lets through
    except StopIteration:  # an empty json file
        return True
    except UNREADABLE_FILE_ERRORS:
        return False
    return True


def hub_documents(dataset: str, config: str, split: str, text_column: str, skip: int) -> Iterator[str]:
    try:
        streamed = load_dataset(dataset, name=config, split=split, streaming=True)
        yield from dataset_texts(streamed, text_column, skip, dataset)
    except ConnectionError as e:
        raise UsageError(
            f"cannot reach the Hugging Face Hub to stream {dataset} ({e}). Without network, point --data_files at "
            "local copies of its files, or use --source python_docs for an offline demo."
        ) from e
    except (DatasetNotFoundError, ValueError) as e:
        raise UsageError(f"cannot load {dataset} (config {config}, split {split}): {e}") from e


def dataset_texts(dataset: IterableDataset, text_column: str, skip: int, name: str) -> Iterator[str]:
    """The text column, read as Arrow tables; the `skip` documents already in shards are counted, never decoded."""
    for table in dataset.with_format("arrow").iter(batch_size=READ_ROWS):
        check_text_column(table.schema, text_column, name)
        column = table[text_column]
        check_no_nulls(column, text_column, name)
        if skip >= len(column):
            skip -= len(column)
            continue
        yield from column.slice(skip).to_pylist()
        skip = 0


def check_text_column(schema: pa.Schema, text_column: str, name: str) -> None:
    if text_column not in schema.names:
        columns = ", ".join(schema.names)
        raise UsageError(f"{name} has no column {text_column!r}; its columns: {columns} (pick one: --text_column)")
    column_type = schema.field(text_column).type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
        raise UsageError(f"{name}: column {text_column!r} holds {column_type}, not text (pick one: --text_column)")


def check_no_nulls(column: pa.Array | pa.ChunkedArray, text_column: str, name: str) -> None:
    if column.null_count:
        raise UsageError(f"{name}: column {text_column!r} has missing (null) values; drop or fill those rows")


class RowRange(NamedTuple):
    """Rows start to stop - 1 of one row group of a parquet file."""

    path: str
    group: int
    start: int
    stop: int


def parquet_tasks(files: list[str], text_column: str, skip: int) -> Iterator[list[RowRange]]:
    """Row ranges in lists of about PARQUET_TASK_BYTES of text and at most PARQUET_TASK_ROWS rows, from document
    `skip` on, planned from the files' footers alone: tokenize_rows() reads them in the worker. Every footer is read
    at the first task, so a mistake in any file is found before anything is written.

    A row group that fits in a task is never split: small ones share a task, and one that does not fit what is left
    of the current task starts the next, so each is decoded once. A larger one is split, and pyarrow decodes a row
    group only from its start: each worker that gets slices of it decodes it up to its last slice (once: see
    RowGroupReader), about 2% of the CPU time of tokenising it. With one large row group (pyarrow's default for files
    of up to ~1M rows) every worker does so, and this overhead grows with --num_proc: about 2% of the tokenising CPU
    per extra worker.
    """
    row_groups = list(parquet_row_groups(files, text_column))
    task, room = [], PARQUET_TASK_BYTES
    for path, group, rows, size in row_groups:
        if skip >= rows:
            skip -= rows
            continue
        row, skip = skip, 0
        # an estimate, as the footer has no sizes of single rows; counting each row as at least a PARQUET_TASK_ROWS-th
        # of a task caps the rows per task
        row_bytes = max(size / rows, PARQUET_TASK_BYTES / PARQUET_TASK_ROWS)
        while row < rows:
            fit, rest = math.floor(room / row_bytes), rows - row
            # the next task starts when this one is full, or when the rest of this row group fits in a task of its own
            # but not in this one: only row groups larger than a task are split
            if task and (fit == 0 or (fit < rest and rest * row_bytes <= PARQUET_TASK_BYTES)):
                yield task
                task, room = [], PARQUET_TASK_BYTES
                continue
            take = min(rest, max(fit, 1))  # a row larger than a task is a task of its own
            task.append(RowRange(path, group, row, row + take))
            row += take
            room -= take * row_bytes
    if task:
        yield task


def parquet_row_groups(files: list[str], text_column: str) -> Iterator[tuple[str, int, int, int]]:
    """(file, row group, rows, bytes of the text column before compression) of each row group that has rows."""
    for path in files:
        with open_parquet(path) as parquet:
            check_text_column(parquet.schema_arrow, text_column, path)
            # the footer describes leaf columns: a struct column has one per field
            leaves = [parquet.schema.column(i).path for i in range(len(parquet.schema))]
            column = leaves.index(text_column)
            for group in range(parquet.metadata.num_row_groups):
                metadata = parquet.metadata.row_group(group)
                if metadata.num_rows:
                    size = max(metadata.column(column).total_uncompressed_size, 1)
                    yield path, group, metadata.num_rows, size


def open_parquet(path: str, **options) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path, **options)
    except (pa.ArrowException, OSError) as e:
        raise UsageError(f"{path} is not a readable parquet file ({one_line(e)})") from e


def one_line(error: Exception) -> str:
    return " ".join(str(error).split())  # some of pyarrow's messages span several lines


def python_roots() -> list[str]:
    paths = sysconfig.get_paths()
    return list(dict.fromkeys([paths["stdlib"], paths["purelib"], paths["platlib"]]))


def python_docstrings() -> Iterator[str]:
    """English text found on every machine: the docstrings of the standard library and installed packages.

    One document per source file: its module, class and function docstrings in source
    order. Files are parsed with `ast`, never imported (importing runs arbitrary code and is
    slow). They are listed in sorted order and then shuffled with a fixed seed, so one Python
    installation always gives the same text, and the validation split (the first tokens) is a
    sample of the same mixture as the training split rather than the first package's docstrings.
    """
    paths = [path for root in python_roots() for path in python_files(Path(root))]
    for index in np.random.default_rng(PYTHON_DOCS_SEED).permutation(len(paths)):
        text = docstrings(paths[index])
        if text:
            yield text


def python_files(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        # site-packages lies inside the stdlib folder and is walked as a root of its own
        dirnames[:] = sorted(d for d in dirnames if d not in SKIPPED_DIRS)
        yield from (Path(dirpath, name) for name in sorted(filenames) if name.endswith(".py"))


def docstrings(path: Path) -> str:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escape sequences in old files
            tree = ast.parse(path.read_bytes())
    except (SyntaxError, ValueError, OSError):  # Python 2 files, bad encodings, unreadable files
        return ""
    nodes = [tree, *definitions(tree.body)]
    return "\n\n".join(filter(None, (ast.get_docstring(n) for n in nodes)))


def definitions(body: list[ast.stmt]) -> Iterator[ast.AST]:
    """Classes and functions in source order, also inside if/try/with/match blocks; walking
    statements only, not every expression node, is what keeps this fast."""
    for node in body:
        if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            yield node
        for field in ("body", "orelse", "finalbody", "handlers", "cases"):
            yield from definitions(getattr(node, field, []))


# -----------------------------------------------------------------------------
# tokenisation, in order, across processes


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


def tokenize_rows(text_column: str, row_ranges: list[RowRange]) -> tuple[np.ndarray, np.ndarray]:
    """tokenize() of the documents in parquet row ranges (see parquet_tasks), read in this process."""
    texts = []
    for path, group, start, stop in row_ranges:
        texts += row_group_reader(path, text_column, group, file_version(path)).read(start, stop)
    return tokenize(texts)


def file_version(path: str) -> tuple[int, int, int]:
    """Changes when the file is rewritten in place or replaced (unless within one tick of the clock, at equal size)."""
    try:
        stat = os.stat(path)
    except OSError as e:
        raise UsageError(f"{path} is not a readable parquet file ({one_line(e)})") from e
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


@functools.lru_cache(maxsize=1)
def row_group_reader(path: str, text_column: str, group: int, version: tuple[int, int, int]) -> "RowGroupReader":
    """The reader of the row group this process read last, kept because the next task often goes on with it. The
    file's `version` is part of the key, so a file rewritten since (in a later run in this process) is read anew."""
    return RowGroupReader(path, text_column, group)


class RowGroupReader:
    """The text of one parquet row group, decoded READ_ROWS rows at a time. pyarrow decodes a row group only from its
    start, so each read() carries on from where the last one ended: the slices of a row group that one worker gets
    come in order. Decoding in small batches keeps memory small and reused, however large the row group."""

    def __init__(self, path: str, text_column: str, group: int):
        self.path, self.text_column, self.group = path, text_column, group
        self.rewind()

    def rewind(self) -> None:
        # read the file in 1 MB pieces rather than a row group's whole column at once: memory stays small
        parquet = open_parquet(self.path, buffer_size=1 << 20, pre_buffer=False)
        # one thread: every process of the pool keeps a core busy already
        columns, row_groups = [self.text_column], [self.group]
        self.batches = parquet.iter_batches(READ_ROWS, row_groups=row_groups, columns=columns, use_threads=False)
        self.batch, self.first = pa.array([], pa.string()), 0  # self.batch holds rows first, first + 1, ...

    def read(self, start: int, stop: int) -> list[str]:
        """The text of rows start to stop - 1; fastest when each call starts where the last one stopped."""
        if start < self.first:
            self.rewind()
        texts = []
        while start < stop:
            end = self.first + len(self.batch)
            if start >= end:
                self.first, self.batch = end, self.next_batch()
                continue
            take = min(stop, end) - start
            texts += self.batch.slice(start - self.first, take).to_pylist()
            start += take
        return texts

    def next_batch(self) -> pa.Array:
        try:
            batch = next(self.batches, None)
        except (pa.ArrowException, OSError) as e:
            raise UsageError(f"{self.path}: cannot read row group {self.group} ({one_line(e)})") from e
        if batch is None:
            raise UsageError(f"{self.path}: row group {self.group} is shorter than its footer says (changed since?)")
        column = batch.column(0)
        check_no_nulls(column, self.text_column, self.path)
        return column


def batched(texts: Iterable[str], max_chars: int) -> Iterator[list[str]]:
    """Consecutive texts in lists of about `max_chars` characters, so every task is about as much work."""
    batch, chars = [], 0
    for text in texts:
        batch.append(text)
        chars += len(text)
        if chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


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
        raise UsageError(
            f"{output_dir} was prepared from {describe(existing['source'])} with other {' and '.join(changed)}; "
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
    temporary = output_dir / (MANIFEST + ".tmp")
    temporary.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(temporary, output_dir / MANIFEST)


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
    source = describe_source(args)
    manifest = resume_point(output_dir, new_manifest(source, args), args.overwrite)
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
        row_group_reader.cache_clear()  # --num_proc 1 reads here: close the file the last reader holds open
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
