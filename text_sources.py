"""Where prepare_fineweb.py's documents come from: a Hub dataset, local files, or the offline python_docs corpus.

Each source is a small dataclass: `describe()` names it in messages, `record()` is what manifest.json keeps of it (a
folder is resumed only from an equal record), and `tasks(skip)` hands its documents after the first `skip`, in a fixed
order, to the tokenising workers. Most sources are read by the main process, which puts the text in the tasks; local
parquet files are read by the workers themselves, from row ranges planned here from the files' footers.
"""

import ast
import dataclasses
import functools
import glob
import itertools
import logging
import math
import os
import platform
import sys
import sysconfig
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from datasets import IterableDataset, load_dataset
from datasets.exceptions import DatasetNotFoundError

if __package__:  # installed: these modules are the package gpt_moe
    from .command_line import UsageError
else:  # a script or module of a clone, whose root is on sys.path
    from command_line import UsageError

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
# what datasets' readers raise for a malformed local file: bad JSON (pyarrow's reader for .jsonl, ujson's ValueError
# for a .json array), a lone surrogate escape, text that is not UTF-8 (UnicodeDecodeError, a ValueError)
UNREADABLE_FILE_ERRORS = (pa.ArrowException, ValueError)
PYTHON_DOCS_SEED = 0  # of the python_docs source's document order
SKIPPED_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests"}  # tests are code, not prose


class Source:
    """What every source shares; a subclass is a dataclass whose fields, after `kind`, are its record."""

    kind: ClassVar[str]

    def record(self) -> dict:
        return {"kind": self.kind, **dataclasses.asdict(self)}

    def tasks(self, skip: int) -> tuple[Callable[[Any], list[str]], Iterator]:
        """(read, tasks) for the documents after the first `skip`, where read(task), called in a worker, gives the
        task's texts. Here the main process reads self.documents(skip) and hands on lists of about TASK_CHARS."""
        return as_given, batched(self.documents(skip), TASK_CHARS)


def as_given(texts: list[str]) -> list[str]:
    return texts


@dataclasses.dataclass(frozen=True)
class HubDataset(Source):
    """A dataset of the Hugging Face Hub, streamed: only what --max_tokens needs is fetched (megabytes for a quick
    run, not sample-10BT's tens of GB), and no second copy of the corpus is kept beside the shards. Downloading its
    parquet files (`hf download`) and passing them as --data_files instead lets the workers read them in parallel."""

    dataset: str
    config: str
    split: str
    text_column: str
    kind: ClassVar[str] = "hub"

    def describe(self) -> str:
        return f"Hub dataset {self.dataset} ({self.config}, split {self.split})"

    def documents(self, skip: int) -> Iterator[str]:
        try:
            streamed = load_dataset(self.dataset, name=self.config, split=self.split, streaming=True)
            yield from dataset_texts(streamed, self.text_column, skip, self.dataset)
        except ConnectionError as e:
            raise UsageError(
                f"cannot reach the Hugging Face Hub to stream {self.dataset} ({e}). Without network, point "
                "--data_files at local copies of its files, or use --source python_docs for an offline demo."
            ) from e
        except (DatasetNotFoundError, ValueError) as e:
            raise UsageError(f"cannot load {self.dataset} (config {self.config}, split {self.split}): {e}") from e


@dataclasses.dataclass(frozen=True)
class LocalFiles(Source):
    """Local files of one format (see DATA_FILE_FORMATS), in the order given. Parquet files are read by the workers;
    the other formats by the main process, through datasets' readers."""

    data_files: list[str]
    text_column: str
    kind: ClassVar[str] = "files"

    @property
    def format(self) -> str:
        """The datasets builder that reads the files (all of one format: see resolve_data_files)."""
        return DATA_FILE_FORMATS[Path(self.data_files[0]).suffix.lower()]

    def describe(self) -> str:
        files = self.data_files
        return f"{len(files)} local file(s): {', '.join(files[:3])}{', ...' if len(files) > 3 else ''}"

    def tasks(self, skip: int) -> tuple[Callable[[Any], list[str]], Iterator]:
        if self.format != "parquet":
            return super().tasks(skip)
        # the workers read the rows themselves: the main process neither decodes nor converts the text
        return functools.partial(read_rows, self.text_column), parquet_tasks(self.data_files, self.text_column, skip)

    def documents(self, skip: int) -> Iterator[str]:
        try:
            dataset = streamed_files(self.format, self.data_files)
        except StopIteration:  # datasets' json reader, when every file is empty
            return
        try:
            yield from dataset_texts(dataset, self.text_column, skip, self.describe())
        except UNREADABLE_FILE_ERRORS as e:
            raise UsageError(f"{self.unreadable_file()}: cannot read it as {self.format} ({one_line(e)})") from e

    def unreadable_file(self) -> str:
        """The first file that fails to read on its own. Called once reading all of them failed: datasets' error
        (a JSON syntax error, text that is not UTF-8) does not say which file it was in."""
        files = self.data_files
        if len(files) == 1:
            return files[0]
        message = f"prepare_fineweb.py: reading the {len(files)} files one by one to find the unreadable one"
        print(message, file=sys.stderr)
        datasets_logger = logging.getLogger("datasets")
        level = datasets_logger.level
        datasets_logger.setLevel(logging.CRITICAL)  # it already logged the failure once
        try:
            for path in files:
                if not is_readable(self.format, path):
                    return path
        finally:
            datasets_logger.setLevel(level)
        return self.describe()


@dataclasses.dataclass(frozen=True)
class PythonDocs(Source):
    """English text found on every machine, offline: see python_docstrings()."""

    python: str
    roots: list[str]
    order: str = f"shuffled, seed {PYTHON_DOCS_SEED}"
    kind: ClassVar[str] = "python_docs"

    def describe(self) -> str:
        return f"docstrings of Python {self.python} ({', '.join(self.roots)})"

    def documents(self, skip: int) -> Iterator[str]:
        return itertools.islice(python_docstrings(), skip, None)


SOURCES = {source.kind: source for source in (HubDataset, LocalFiles, PythonDocs)}


def source_from_args(args) -> Source:
    """The source that prepare_fineweb.parse_args' arguments name."""
    if args.source == "python_docs":
        return PythonDocs(platform.python_version(), python_roots())
    if args.source == "files":
        return LocalFiles(resolve_data_files(args.data_files), args.text_column)
    return HubDataset(args.dataset, args.dataset_config, args.dataset_split, args.text_column)


def source_from_record(record: dict) -> Source:
    """The source a manifest recorded."""
    return SOURCES[record["kind"]](**{field: value for field, value in record.items() if field != "kind"})


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


def one_line(error: Exception) -> str:
    return " ".join(str(error).split())  # some of pyarrow's messages span several lines


# -----------------------------------------------------------------------------
# datasets' readers: the Hub, and local json/jsonl, txt and arrow files


def streamed_files(builder: str, files: list[str]) -> IterableDataset:
    # a .txt file is one document, not one per line
    options = {"sample_by": "document"} if builder == "text" else {}
    return load_dataset(builder, data_files=files, split="train", streaming=True, **options)


def is_readable(builder: str, path: str) -> bool:
    try:
        for table in streamed_files(builder, [path]).with_format("arrow").iter(batch_size=READ_ROWS):
            table.validate(full=True)  # checks the UTF-8 that pyarrow's JSON reader lets through
    except StopIteration:  # an empty json file
        return True
    except UNREADABLE_FILE_ERRORS:
        return False
    return True


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


# -----------------------------------------------------------------------------
# local parquet files: row ranges planned from the footers, read in the workers


class RowRange(NamedTuple):
    """Rows start to stop - 1 of one row group of a parquet file."""

    path: str
    group: int
    start: int
    stop: int


def parquet_tasks(files: list[str], text_column: str, skip: int) -> Iterator[list[RowRange]]:
    """Row ranges in lists of about PARQUET_TASK_BYTES of text and at most PARQUET_TASK_ROWS rows, from document
    `skip` on, planned from the files' footers alone: read_rows() reads them in the worker. Every footer is read
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


def read_rows(text_column: str, row_ranges: list[RowRange]) -> list[str]:
    """The text of parquet row ranges (a task of parquet_tasks), read in this process."""
    texts = []
    for path, group, start, stop in row_ranges:
        texts += row_group_reader(path, text_column, group, file_version(path)).read(start, stop)
    return texts


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


def close_parquet_files() -> None:
    """Close the file this process's last reader holds open (read here, not in workers, when --num_proc is 1)."""
    row_group_reader.cache_clear()


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


# -----------------------------------------------------------------------------
# python_docs: docstrings of the installed Python


def python_roots() -> list[str]:
    paths = sysconfig.get_paths()
    return list(dict.fromkeys([paths["stdlib"], paths["purelib"], paths["platlib"]]))


def python_docstrings() -> Iterator[str]:
    """English text found on every machine: the docstrings of the standard library and installed packages.

    One document per source file: its module, class and function docstrings in source order. Files are parsed with
    `ast`, never imported (importing runs arbitrary code and is slow). They are listed in sorted order and then
    shuffled with a fixed seed, so one Python installation always gives the same text, and the validation split (the
    first tokens) is a sample of the same mixture as the training split rather than the first package's docstrings.
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
    """Classes and functions in source order, also inside if/try/with/match blocks; walking statements only, not
    every expression node, is what keeps this fast."""
    for node in body:
        if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            yield node
        for field in ("body", "orelse", "finalbody", "handlers", "cases"):
            yield from definitions(getattr(node, field, []))
