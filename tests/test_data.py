"""Tests of text_sources.py and prepare_fineweb.py (text -> shards) and fineweb_shards.py (shards -> batches)."""

import hashlib
import io
import itertools
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import prepare_fineweb
import text_sources
from command_line import UsageError
from fineweb_shards import ShardError, ShardLoader, find_shards, open_shard, validation_loader, write_shard
from gpt2_tokenizer import EOT_ID, VOCAB_SHA256, get_encoding

REPO = Path(__file__).resolve().parents[1]
WORDS = (
    "the of and to in is was that for it with as on by learning students energy water cells history "
    "teachers reading climate ocean café naïve 東京 🙂 1984 3.14 don't   spaces\ttabs\nnewlines"
).split(" ")


def make_documents(count: int = 200, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60))) for _ in range(count)]
    docs[5] = "a literal <|endoftext|> in a document is ordinary text"
    return docs


def token_stream(docs: list[str]) -> np.ndarray:
    encoding = get_encoding()
    return np.array([t for d in docs for t in [EOT_ID, *encoding.encode_ordinary(d)]], dtype=np.uint16)


def write_jsonl(path: Path, docs: list[str], column: str = "text") -> Path:
    path.write_text("".join(json.dumps({column: d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path


def write_parquet_files(directory: Path, docs: list[str], layout: list[list[int]]) -> list[Path]:
    """`docs`, in order, in parquet files: file i has row groups of layout[i] rows."""
    schema = pa.schema([("text", pa.string())])
    files, start = [], 0
    for i, group_sizes in enumerate(layout):
        files.append(directory / f"part_{i}.parquet")
        with pq.ParquetWriter(files[-1], schema) as writer:
            for rows in group_sizes:
                writer.write_table(pa.table({"text": docs[start : start + rows]}, schema=schema))
                start += rows
    assert start == len(docs)
    return files


# small and large row groups, an empty one and a file with none; 200 rows, as make_documents()
PARQUET_LAYOUT = [[3, 50, 1], [], [0, 120, 7, 19]]
GROUP_BOUNDARIES = {0, 3, 53, 54, 174, 181, 200}  # first rows of the row groups above, and the end


@pytest.fixture
def parquet_files(tmp_path, docs, monkeypatch) -> list[Path]:
    monkeypatch.setattr(text_sources, "PARQUET_TASK_BYTES", 2000)  # several tasks per large row group
    monkeypatch.setattr(text_sources, "READ_ROWS", 7)  # tasks start and end inside the decoded batches
    return write_parquet_files(tmp_path, docs, PARQUET_LAYOUT)


def prepare(data_files: list[Path], output_dir: Path, *options: str) -> dict:
    argv = ["--data_files", *map(str, data_files), "--output_dir", str(output_dir), "--num_proc", "1"]
    return prepare_fineweb.prepare(prepare_fineweb.parse_args(argv + ["--shard_size", "1500", *options]))


def read_split(output_dir: Path, split: str) -> np.ndarray:
    return np.concatenate([open_shard(p) for p in find_shards(output_dir, split)])


def read_stream(output_dir: Path) -> np.ndarray:
    """Every token written, in stream order: validation first, then training."""
    return np.concatenate([read_split(output_dir, "val"), read_split(output_dir, "train")])


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return make_documents()


@pytest.fixture
def jsonl(tmp_path, docs) -> Path:
    return write_jsonl(tmp_path / "corpus.jsonl", docs)


# -----------------------------------------------------------------------------
# prepare_fineweb.py


def test_round_trip_text_to_shards_to_batches(tmp_path, docs, jsonl):
    manifest = prepare([jsonl], tmp_path / "out", "--val_tokens", "1000")
    expected = token_stream(docs)
    names = [s["name"] for s in manifest["shards"]]
    assert names[:3] == ["val_000000.bin", "train_000000.bin", "train_000001.bin"]
    assert [s["tokens"] for s in manifest["shards"][:-1]] == [1000] + [1500] * (len(names) - 2)
    assert manifest["total_tokens"] == len(expected) and manifest["documents"] == len(docs)
    assert manifest["tokenizer"]["vocab_sha256"] == VOCAB_SHA256
    np.testing.assert_array_equal(read_split(tmp_path / "out", "val"), expected[:1000])
    np.testing.assert_array_equal(read_split(tmp_path / "out", "train"), expected[1000:])

    # the loader gives every B*T window of each train shard in order, then starts again
    B, T = 2, 16
    loader = ShardLoader(tmp_path / "out", "train", B, T)
    windows = []
    start = 1000
    for shard in manifest["shards"][1:]:
        windows += [expected[s : s + B * T + 1] for s in range(start, start + shard["tokens"] - B * T, B * T)]
        start += shard["tokens"]
    assert loader.num_batches == len(windows)
    for window in windows + windows[:1]:
        x, y = loader.next_batch()
        assert x.dtype == torch.int64 and x.shape == (B, T)
        assert torch.equal(x.flatten(), torch.from_numpy(window[:-1].astype(np.int64)))
        assert torch.equal(y.flatten(), torch.from_numpy(window[1:].astype(np.int64)))


@pytest.mark.parametrize("suffix", [".parquet", ".arrow", ".txt"])
def test_file_formats_give_the_same_tokens(tmp_path, docs, suffix):
    table = pa.table({"text": docs})
    if suffix == ".parquet":
        files = [tmp_path / "corpus.parquet"]
        pq.write_table(table, files[0])
    elif suffix == ".arrow":
        files = [tmp_path / "corpus.arrow"]
        with pa.OSFile(str(files[0]), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    else:  # one document per file; names sort in document order
        files = [tmp_path / f"doc_{i:04d}.txt" for i in range(len(docs))]
        for path, doc in zip(files, docs, strict=True):
            path.write_text(doc, encoding="utf-8")
        files = [tmp_path / "doc_*.txt"]
    prepare(files, tmp_path / "out")
    stream = read_stream(tmp_path / "out")
    np.testing.assert_array_equal(stream, token_stream(docs))


def rows_of(task: list[text_sources.RowRange]) -> list[tuple[str, int, int]]:
    return [(r.path, r.group, row) for r in task for row in range(r.start, r.stop)]


def groups_of(task: list[text_sources.RowRange]) -> set[tuple[str, int]]:
    return {(r.path, r.group) for r in task}


def test_parquet_tasks_cover_every_row_once_packing_and_splitting_row_groups(parquet_files):
    tasks = list(text_sources.parquet_tasks([str(f) for f in parquet_files], "text", skip=0))
    layout = zip(parquet_files, PARQUET_LAYOUT, strict=True)
    expected = [(str(f), group, row) for f, sizes in layout for group, n in enumerate(sizes) for row in range(n)]
    assert [row for task in tasks for row in rows_of(task)] == expected
    groups_per_task = list(map(groups_of, tasks))
    assert max(map(len, groups_per_task)) > 1  # small row groups share a task
    assert max(Counter(g for task in groups_per_task for g in task).values()) > 2  # a large one is split

    resumed = list(text_sources.parquet_tasks([str(f) for f in parquet_files], "text", skip=60))
    first = resumed[0][0]  # 3 + 50 + 1 rows before, 0 in row group 0
    assert (first.path, first.group, first.start) == (str(parquet_files[2]), 1, 6)


def test_parquet_row_groups_that_fit_in_a_task_are_not_split(tmp_path):
    rng = random.Random(0)
    docs = [rng.randbytes(1500).hex() for _ in range(1000)]  # 3 KB each, all different
    (path,) = write_parquet_files(tmp_path, docs, [[100] * 10])  # ~0.3 MB of text per row group, ~3 per task
    tasks = list(text_sources.parquet_tasks([str(path)], "text", skip=0))
    expected = [(str(path), group, row) for group in range(10) for row in range(100)]
    assert [row for task in tasks for row in rows_of(task)] == expected
    groups_per_task = list(map(groups_of, tasks))
    assert len(tasks) < 5 and max(map(len, groups_per_task)) > 1
    assert sum(map(len, groups_per_task)) == 10  # each row group in one task only


def test_parquet_tasks_cap_rows_when_the_footer_underestimates_duplicated_text(tmp_path):
    path = tmp_path / "duplicates.parquet"
    pq.write_table(pa.table({"text": ["a long document " * 625] * 2000}), path)  # 2,000 copies of 10 KB
    # dictionary encoding stores the text once, and the footer's size says so: ~10 KB for 20 MB of text
    assert pq.read_metadata(path).row_group(0).column(0).total_uncompressed_size < 20_000
    tasks = list(text_sources.parquet_tasks([str(path)], "text", skip=0))
    rows_per_task = [sum(r.stop - r.start for r in task) for task in tasks]
    assert sum(rows_per_task) == 2000 and max(rows_per_task) <= text_sources.PARQUET_TASK_ROWS


def test_parquet_text_column_after_a_struct_column(tmp_path, docs):
    # the footer has a column per struct field: the text is its third column, the table's second
    meta = [{"url": f"https://example.com/{'x' * 500}/{i}", "score": i / 7} for i in range(len(docs))]
    path = tmp_path / "with_struct.parquet"
    pq.write_table(pa.table({"meta": meta, "text": docs}), path)
    ((_, _, rows, size),) = text_sources.parquet_row_groups([str(path)], "text")
    text = pq.read_metadata(path).row_group(0).column(2)
    assert text.path_in_schema == "text" and (rows, size) == (len(docs), text.total_uncompressed_size)
    prepare([path], tmp_path / "out")
    stream = read_stream(tmp_path / "out")
    np.testing.assert_array_equal(stream, token_stream(docs))


@pytest.mark.parametrize("num_proc", ["1", "2"])
def test_parquet_files_give_the_same_shards_as_one_jsonl(tmp_path, docs, jsonl, parquet_files, num_proc):
    prepare([jsonl], tmp_path / "jsonl")
    manifest = prepare(parquet_files, tmp_path / "parquet", "--num_proc", num_proc)
    assert manifest["documents"] == len(docs)
    shards, reference = files_of(tmp_path / "parquet"), files_of(tmp_path / "jsonl")
    assert shards.pop("manifest.json") != reference.pop("manifest.json")  # the source differs, the shards do not
    assert len(shards) > 5 and shards == reference


def test_parquet_max_tokens_stops_in_the_middle_of_a_file(tmp_path, docs, parquet_files):
    manifest = prepare(parquet_files, tmp_path / "out", "--max_tokens", "4000", "--num_proc", "2")
    assert [s["tokens"] for s in manifest["shards"]] == [1500, 1500, 1000] and manifest["complete"]
    assert 54 < manifest["documents"] < 174  # inside the large row group of the third file
    stream = read_stream(tmp_path / "out")
    np.testing.assert_array_equal(stream, token_stream(docs)[:4000])


def test_parquet_resume_in_the_middle_of_a_row_group(tmp_path, parquet_files, monkeypatch):
    prepare(parquet_files, tmp_path / "reference")

    def crash_at_third_shard(path, tokens):
        if Path(path).name.startswith("train_000001"):
            raise KeyboardInterrupt
        write_shard(path, tokens)

    monkeypatch.setattr(prepare_fineweb, "write_shard", crash_at_third_shard)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        prepare(parquet_files, out, "--num_proc", "2")
    kept = json.loads((out / "manifest.json").read_text())["shards"]
    assert len(kept) == 2 and kept[-1]["end_document"] not in GROUP_BOUNDARIES and kept[-1]["end_offset"] > 0

    monkeypatch.setattr(prepare_fineweb, "write_shard", write_shard)
    prepare(parquet_files, out, "--num_proc", "2")
    assert files_of(out) == files_of(tmp_path / "reference")


def test_parquet_file_rewritten_in_place_between_two_runs_gives_the_new_text(tmp_path, docs, monkeypatch):
    # as if prepare() no longer emptied its reader cache at the end: the cache must still notice the new file
    monkeypatch.setattr(text_sources.row_group_reader, "cache_clear", lambda: None)
    (path,) = write_parquet_files(tmp_path, docs, [[len(docs)]])  # fewer rows than READ_ROWS: one batch holds all
    prepare([path], tmp_path / "old")
    new = [doc.upper() + "!" for doc in docs]
    write_parquet_files(tmp_path, new, [[len(docs)]])
    prepare([path], tmp_path / "new")
    stream = read_stream(tmp_path / "new")
    np.testing.assert_array_equal(stream, token_stream(new))
    monkeypatch.undo()
    text_sources.row_group_reader.cache_clear()  # closes the file


def test_tokenize_repairs_lone_surrogates_as_encode_ordinary_does():
    # docstrings may hold "\udXXX" escapes; encode_to_numpy() raises on them, encode_ordinary() replaces them
    texts = ["x\ud800y", "plain text"]
    tokens, lengths = prepare_fineweb.tokenize(texts)
    assert tokens.tolist() == token_stream(texts).tolist() and lengths.tolist() == [4, 3]


def test_row_group_reader_reads_any_rows_and_notices_a_shortened_file(tmp_path, docs, monkeypatch):
    monkeypatch.setattr(text_sources, "READ_ROWS", 7)
    (path,) = write_parquet_files(tmp_path, docs[:30], [[30]])
    reader = text_sources.RowGroupReader(str(path), "text", 0)
    assert reader.read(10, 20) == docs[10:20] and reader.read(20, 23) == docs[20:23]
    assert reader.read(5, 12) == docs[5:12]  # backwards: decodes from the start again
    with pytest.raises(UsageError, match="shorter than its footer"):
        reader.read(25, 31)


def test_num_proc_gives_byte_identical_shards(tmp_path, monkeypatch):
    # small tasks, so each worker gets several and their results interleave
    monkeypatch.setattr(text_sources, "TASK_CHARS", 2000)
    corpus = write_jsonl(tmp_path / "corpus.jsonl", make_documents(600, seed=1))
    prepare([corpus], tmp_path / "one", "--num_proc", "1")
    prepare([corpus], tmp_path / "two", "--num_proc", "2")
    one, two = files_of(tmp_path / "one"), files_of(tmp_path / "two")
    assert len(one) > 5 and one == two


# Two fixed corpora, and what prepare_fineweb.py made of them before text_sources.py was split out of it (commit
# 3d750dc): a sha256 of the manifest's shard records, then of every shard. Nothing in them depends on the machine: the
# text is written here and the vocabulary is the repository's own (python_docs shuffles its files with numpy's
# default_rng, whose stream numpy keeps stable in practice though it does not promise to).
PINNED_SHARDS = {
    "parquet": "faaab5ff4d8c45a09d157c259dbb82c758a46e91b2ad2fedefa7c9edb13a9cbf",
    "python_docs": "f119603c27b3c68e1b106a5f9c222fc6b0c5b85fff502eaccefdf0c4b8f0d779",
}
PYTHON_FILES = {  # a Python installation of nine files, six of them with docstrings
    "pkg/__init__.py": '"""A package of examples.\n\nIt holds modules with docstrings."""\n',
    "pkg/shapes.py": (
        '"""Shapes and their areas."""\n\nclass Square:\n    """A square with equal sides."""\n\n'
        '    def area(self):\n        """The side, squared."""\n        return self.side ** 2\n'
    ),
    "pkg/none.py": "x = 1\n",
    "pkg/broken.py": "def (:\n",
    "pkg/tests/test_shapes.py": '"""Tests are skipped."""\n',
    "notes.py": (
        '"""Notes on caf\u00e9s in \u6771\u4eac.\n\n    Indented second paragraph."""\n\n'
        'if True:\n    def inner():\n        """Found inside an if block."""\n'
    ),
    "a.py": '"""' + "Docstring number one of file a, long enough. " * 30 + '"""\n',
    "b.py": "async def fetch():\n    '''Fetch something, asynchronously.'''\n",
    "c.py": '"""' + "\n".join(f"Line {i} of c." for i in range(60)) + '"""\n',
}


def fixed_documents(count: int) -> list[str]:
    """Documents made by arithmetic alone: no random generator whose stream could change between Python versions."""
    return [
        f"Document {i}: " + " ".join(WORDS[i * j % len(WORDS)] for j in range(1, 5 + i % 40)) for i in range(count)
    ]


def shards_digest(output_dir: Path) -> str:
    shards = json.loads((output_dir / "manifest.json").read_text())["shards"]
    digest = hashlib.sha256(json.dumps(shards).encode())
    for shard in shards:
        digest.update((output_dir / shard["name"]).read_bytes())
    return digest.hexdigest()


@pytest.mark.parametrize("num_proc", ["1", "2"])
def test_parquet_shards_are_the_pinned_bytes(tmp_path, monkeypatch, num_proc):
    monkeypatch.setattr(text_sources, "PARQUET_TASK_BYTES", 2000)  # tasks split row groups, as in parquet_files
    monkeypatch.setattr(text_sources, "READ_ROWS", 7)
    files = write_parquet_files(tmp_path, fixed_documents(200), PARQUET_LAYOUT)
    manifest = prepare(files, tmp_path / "out", "--num_proc", num_proc)
    assert [s["tokens"] for s in manifest["shards"]] == [1500, 1500, 1500, 1500, 1004]
    assert shards_digest(tmp_path / "out") == PINNED_SHARDS["parquet"]


@pytest.mark.parametrize("num_proc", ["1", "2"])
def test_python_docs_shards_are_the_pinned_bytes(tmp_path, monkeypatch, num_proc):
    for name, text in PYTHON_FILES.items():
        (tmp_path / "python" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "python" / name).write_text(text, encoding="utf-8")
    monkeypatch.setattr(text_sources, "python_roots", lambda: [str(tmp_path / "python")])
    argv = ["--source", "python_docs", "--output_dir", str(tmp_path / "out"), "--num_proc", num_proc]
    manifest = prepare_fineweb.prepare(
        prepare_fineweb.parse_args(argv + ["--shard_size", "200", "--val_tokens", "100"])
    )
    assert manifest["documents"] == 6 and manifest["source"]["roots"] == [str(tmp_path / "python")]
    assert shards_digest(tmp_path / "out") == PINNED_SHARDS["python_docs"]


def test_resume_after_crash_keeps_complete_shards(tmp_path, jsonl, monkeypatch):
    monkeypatch.setattr(text_sources, "READ_ROWS", 16)  # resuming then skips whole Arrow batches, then rows
    reference = prepare([jsonl], tmp_path / "reference")
    assert reference["shards"][0]["end_offset"] > 0  # shards end mid-document, so resuming must too

    written = []

    def write_and_count(path, tokens, crash_at=None):
        written.append(Path(path).name)
        if len(written) == crash_at:
            Path(path).write_bytes(b"half a shard")
            raise KeyboardInterrupt
        write_shard(path, tokens)

    monkeypatch.setattr(prepare_fineweb, "write_shard", lambda path, tokens: write_and_count(path, tokens, 3))
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        prepare([jsonl], out)
    assert (out / "train_000001.bin.tmp").exists()
    assert json.loads((out / "manifest.json").read_text())["complete"] is False
    # a kept shard damaged after the crash is redone, with everything after it
    (out / "train_000000.bin").write_bytes((out / "train_000000.bin").read_bytes()[:-2])
    kept = (out / "val_000000.bin").stat().st_mtime_ns

    written.clear()
    monkeypatch.setattr(prepare_fineweb, "write_shard", write_and_count)
    manifest = prepare([jsonl], out)
    assert len(written) == len(manifest["shards"]) - 1
    assert (out / "val_000000.bin").stat().st_mtime_ns == kept
    assert files_of(out) == files_of(tmp_path / "reference")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_the_main_process_keeps_complete_shards_and_the_rerun_resumes(tmp_path, signum, capsys):
    rng = random.Random(0)
    long_docs = [" ".join(rng.choices(WORDS, k=1000)) for _ in range(1000)] * 10  # ~13M tokens: 2 s of work here
    (corpus,) = write_parquet_files(tmp_path, long_docs, [[500] * 20])  # read and tokenised by the workers
    out = tmp_path / "out"
    argv = ["--data_files", str(corpus), "--shard_size", "100000", "--num_proc", "2", "--output_dir", str(out)]
    command = [sys.executable, str(REPO / "prepare_fineweb.py"), *argv]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (out / "train_000000.bin").exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert process.poll() is None, "the run ended before the signal: give it more documents"
        process.send_signal(signum)  # to the main process alone, as `kill` or a scheduler's first signal sends it
        _, stderr = process.communicate(timeout=60)  # returns once every worker has closed its end of the pipe too
    finally:
        process.kill()
    assert process.returncode == 128 + signum, stderr
    assert "interrupted; complete shards are kept" in stderr and "Traceback" not in stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["complete"] and manifest["shards"]
    assert all(len(open_shard(out / shard["name"])) == shard["tokens"] for shard in manifest["shards"])

    prepare_fineweb.main(argv)
    assert f"(kept {len(manifest['shards'])} complete shards)" in capsys.readouterr().out


def test_refuses_to_mix_sources_unless_overwrite(tmp_path, docs, jsonl):
    out = tmp_path / "out"
    prepare([jsonl], out)
    other = write_jsonl(tmp_path / "other.jsonl", docs[:50])
    with pytest.raises(UsageError, match="--overwrite"):
        prepare([other], out)
    (out / "train_000099.bin.tmp").write_bytes(b"left by an interrupted run")
    manifest = prepare([other], out, "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == sorted(["manifest.json"] + [s["name"] for s in manifest["shards"]])

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    write_shard(foreign / "fineweb_train_000001.bin", np.zeros(10, dtype=np.uint16))
    with pytest.raises(UsageError, match="not written by this script"):
        prepare([jsonl], foreign)


def test_python_docs_source_is_offline_english_and_stops_at_max_tokens(tmp_path):
    # English prose, in the same order every time (one short document may lack " the ": which file comes first
    # depends on the installed packages)
    opening = list(itertools.islice(text_sources.python_docstrings(), 10))
    assert opening == list(itertools.islice(text_sources.python_docstrings(), 10))
    assert sum(" the " in document for document in opening) >= 5
    first = opening[0]
    argv = ["--source", "python_docs", "--output_dir", str(tmp_path), "--num_proc", "2"]
    manifest = prepare_fineweb.prepare(
        prepare_fineweb.parse_args(argv + ["--max_tokens", "3000", "--shard_size", "1000", "--val_tokens", "500"])
    )
    assert [s["tokens"] for s in manifest["shards"]] == [500, 1000, 1000, 500]
    tokens = read_split(tmp_path, "val")
    assert tokens[0] == EOT_ID and get_encoding().decode(tokens[1:].tolist()).startswith(first[:100])


def run_cli(*argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "prepare_fineweb.py"), *argv],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=120,
    )


def test_cli_hub_without_network_suggests_data_files(tmp_path):
    # offline mode fails the way a machine without network does, minus the retries
    result = run_cli("--output_dir", str(tmp_path / "out"), env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode != 0
    assert "cannot reach the Hugging Face Hub" in result.stderr and "--data_files" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_cli_missing_text_column_lists_columns(tmp_path, docs):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", docs, column="body")
    result = run_cli("--data_files", str(corpus), "--output_dir", str(tmp_path / "out"))
    assert result.returncode != 0
    assert "no column 'text'" in result.stderr and "body, id" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "data_file, contents, message",
    [
        ("missing/*.parquet", None, "no files match"),
        ("empty.jsonl", "", "no documents"),
        ("numbers.jsonl", '{"text": 1}\n', "holds int64, not text"),
        ("null.jsonl", '{"text": "a"}\n{"text": null}\n', "missing (null) values"),
        ("small.jsonl", '{"text": "too short for a training shard"}\n', "all of them validation"),
        ("syntax.jsonl", '{"text": "a"\n', "syntax.jsonl: cannot read it as json (JSON parse error"),
        ("surrogate.jsonl", '{"text": "a \\ud800 b"}\n', "surrogate.jsonl: cannot read it as json (JSON parse error"),
    ],
)
def test_main_reports_input_mistakes_in_one_line(tmp_path, data_file, contents, message):
    if contents is not None:
        (tmp_path / data_file).write_text(contents)
    with pytest.raises(SystemExit) as exit_info:
        prepare_fineweb.main(["--data_files", str(tmp_path / data_file), "--output_dir", str(tmp_path / "out")])
    assert exit_info.value.code not in (0, None)
    assert message in str(exit_info.value.code) and "\n" not in str(exit_info.value.code)


@pytest.mark.parametrize(
    "suffix, good, bad, message",
    [
        (".jsonl", '{"text": "fine"}\n', b'{"text": "a"} {"text"\n', "cannot read it as json (JSON parse error"),
        (".jsonl", '{"text": "fine"}\n', b'{"text": "caf\xe9"}\n', "cannot read it as json ('utf-8' codec can't"),
        (".json", '[{"text": "fine"}]', b'[{"text": "a"}, {"text": ', "cannot read it as json ("),
        (".txt", "fine", b"caf\xe9 in latin-1", "cannot read it as text ('utf-8' codec can't decode byte 0xe9"),
    ],
    ids=["jsonl syntax", "jsonl latin-1", "json array syntax", "txt latin-1"],
)
def test_main_names_the_unreadable_file_among_several(tmp_path, suffix, good, bad, message):
    files = [tmp_path / f"part_{i}{suffix}" for i in range(3)]
    files[0].write_text(good)
    files[1].write_bytes(bad)
    files[2].write_text(good)
    with pytest.raises(SystemExit) as exit_info:
        prepare_fineweb.main(["--data_files", *map(str, files), "--output_dir", str(tmp_path / "out")])
    error = str(exit_info.value.code)
    assert error.startswith(f"prepare_fineweb.py: error: {files[1]}: {message}") and "\n" not in error


def corrupt_second_row_group(path: Path) -> None:
    pq.write_table(pa.table({"text": [f"document {i}" for i in range(90)]}), path, row_group_size=30)
    column = pq.read_metadata(path).row_group(1).column(0)
    with open(path, "r+b") as f:
        f.seek(column.dictionary_page_offset or column.data_page_offset)
        f.write(b"\xff" * 16)  # the first page header


PARQUET_MISTAKES = {
    "not parquet": (lambda path: path.write_bytes(b"not a parquet file"), "is not a readable parquet file"),
    "corrupt page": (corrupt_second_row_group, "cannot read row group 1 (Couldn't deserialize thrift"),
    "null": (lambda path: pq.write_table(pa.table({"text": ["a"] * 40 + [None]}), path), "missing (null) values"),
    "numbers": (lambda path: pq.write_table(pa.table({"text": [1, 2]}), path), "holds int64, not text"),
    "other column": (
        lambda path: pq.write_table(pa.table({"body": ["a"]}), path),
        "no column 'text'; its columns: body",
    ),
}


@pytest.mark.parametrize("case", sorted(PARQUET_MISTAKES))
def test_main_names_the_parquet_file_with_a_mistake_in_one_line(tmp_path, docs, case):
    (good,) = write_parquet_files(tmp_path, docs, [[200]])
    bad = tmp_path / "part_1.parquet"
    make, message = PARQUET_MISTAKES[case]
    make(bad)
    argv = ["--data_files", str(good), str(bad), "--output_dir", str(tmp_path / "out"), "--shard_size", "1500"]
    with pytest.raises(SystemExit) as exit_info:
        prepare_fineweb.main(argv + ["--num_proc", "2"])  # row groups are read, and found corrupt, in the workers
    error = str(exit_info.value.code)
    assert error.startswith(f"prepare_fineweb.py: error: {bad}") and message in error and "\n" not in error


@pytest.mark.parametrize("case", ["not parquet", "numbers", "other column"])
def test_a_later_parquet_files_mistake_in_its_footer_fails_before_any_shard_is_written(
    tmp_path, docs, case, monkeypatch
):
    monkeypatch.setattr(text_sources, "PARQUET_TASK_BYTES", 2000)  # the good file alone fills several shards
    good = write_parquet_files(tmp_path, docs, [[50] * 4])
    bad = tmp_path / "part_1.parquet"
    make, message = PARQUET_MISTAKES[case]
    make(bad)
    with pytest.raises(UsageError, match=re.escape(message)):
        prepare([*good, bad], tmp_path / "out", "--val_tokens", "100", "--shard_size", "100")
    assert not (tmp_path / "out").exists()


def test_cli_corrupt_parquet_is_one_line_without_traceback(tmp_path):
    corrupt = tmp_path / "corrupt.parquet"
    corrupt_second_row_group(corrupt)
    result = run_cli("--data_files", str(corrupt), "--output_dir", str(tmp_path / "out"), "--num_proc", "2")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"prepare_fineweb.py: error: {corrupt}: cannot read")


# prepare_fineweb.py in a child that limits the size of any file it writes once two shards are written
# (RLIMIT_FSIZE): the next shard's write fails with EFBIG, as one fails with ENOSPC on a full disk. SIGXFSZ is
# ignored, or the kernel would kill the process instead. Arguments: the repository, then the command's flags.
LIMITED_AFTER_TWO_SHARDS = """
import resource, signal, sys
sys.path.insert(0, sys.argv.pop(1))
import prepare_fineweb

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
write_shard, written = prepare_fineweb.write_shard, []

def write_then_limit(path, tokens):
    write_shard(path, tokens)
    written.append(path)
    if len(written) == 2:  # shards are 4,024 bytes; the manifest stays under the limit
        resource.setrlimit(resource.RLIMIT_FSIZE, (2048, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

prepare_fineweb.write_shard = write_then_limit
prepare_fineweb.main()
"""


def test_a_shard_that_cannot_be_written_is_one_line_and_the_rerun_resumes(tmp_path, jsonl):
    reference = tmp_path / "reference"
    prepare([jsonl], reference)
    out = tmp_path / "out"
    argv = ["--data_files", str(jsonl), "--output_dir", str(out), "--shard_size", "1500", "--num_proc", "2"]
    result = subprocess.run(
        [sys.executable, "-c", LIMITED_AFTER_TWO_SHARDS, str(REPO), *argv], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (  # after the progress bar
        f"prepare_fineweb.py: error: cannot write {out}: File too large; 2 complete shard(s) kept: lift the file size "
        "limit (ulimit -f, or the filesystem's own) and rerun the same command to resume"
    )
    kept = {name: data for name, data in files_of(out).items() if name != "manifest.json"}  # no .tmp file among them
    assert sorted(shard["name"] for shard in json.loads((out / "manifest.json").read_text())["shards"]) == list(kept)
    assert kept == {name: files_of(reference)[name] for name in ("train_000000.bin", "val_000000.bin")}

    prepare_fineweb.main(argv)
    assert files_of(out) == files_of(reference)


# -----------------------------------------------------------------------------
# fineweb_shards.py: formats


def write_llmc_by_spec(path: Path, tokens: np.ndarray, magic=20240520, version=1, count=None) -> Path:
    """An llm.c shard written from the format description, independently of write_shard."""
    header = np.zeros(256, dtype="<i4")
    header[0], header[1], header[2] = magic, version, len(tokens) if count is None else count
    path.write_bytes(header.tobytes() + tokens.astype("<u2").tobytes())
    return path


def positions(n: int, start: int = 0) -> np.ndarray:
    return (np.arange(start, start + n) % 50000).astype(np.uint16)


@pytest.mark.parametrize("fmt", ["llmc", "npy", "headerless"])
def test_reads_llmc_npy_and_headerless_shards(tmp_path, fmt):
    for i, name in enumerate(["fineweb_val_000000", "fineweb_train_000001", "fineweb_train_000002"]):
        tokens = positions(300, start=300 * i)
        if fmt == "llmc":
            write_llmc_by_spec(tmp_path / f"{name}.bin", tokens)
        elif fmt == "npy":
            np.save(tmp_path / f"{name}.npy", tokens)
        else:
            tokens.tofile(tmp_path / f"{name}.bin")
    assert [p.stem for p in find_shards(tmp_path, "train")] == ["fineweb_train_000001", "fineweb_train_000002"]
    loader = ShardLoader(tmp_path, "train", batch_size=2, seq_len=10)
    batches = [loader.next_batch() for _ in range(loader.num_batches)]
    assert loader.num_batches == 2 * (299 // 20)
    x, y = batches[0]
    assert x[0].tolist() == list(range(300, 310)) and y[1].tolist() == list(range(311, 321))
    assert batches[299 // 20][0][0, 0].item() == 600  # the second shard starts at its own first token


CORRUPTIONS = {
    "bad magic": lambda p: write_llmc_by_spec(p, positions(100), magic=12345),
    "bad version": lambda p: write_llmc_by_spec(p, positions(100), version=2),
    "size mismatch": lambda p: write_llmc_by_spec(p, positions(100), count=150),
    "odd headerless size": lambda p: p.write_bytes(b"\x01\x00\x02"),
    "truncated header": lambda p: p.write_bytes(np.array([20240520, 1], dtype="<i4").tobytes()),
    "npy not uint16": lambda p: np.save(p.with_suffix(".npy"), np.arange(100, dtype=np.int32)),
    "npy garbage": lambda p: p.with_suffix(".npy").write_bytes(b"not an array at all"),
    "npy truncated": lambda p: p.with_suffix(".npy").write_bytes(npy_bytes(positions(100))[:-50]),
}
FOUND = {
    "bad magic": "magic 12345",
    "bad version": "version 2",
    "size mismatch": "header says 150 tokens",
    "odd headerless size": "3 bytes",
    "truncated header": "shorter than the 1024-byte",
    "npy not uint16": "int32",
    "npy garbage": "not a .npy file",
    "npy truncated": "truncated or corrupt",
}


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupt_shard_is_named_with_what_was_found(tmp_path, case):
    data = tmp_path / "data"
    data.mkdir()
    CORRUPTIONS[case](data / "train_000000.bin")
    (bad,) = data.iterdir()
    with pytest.raises(ShardError) as error:
        ShardLoader(data, "train", batch_size=1, seq_len=8)
    assert bad.name in str(error.value) and FOUND[case] in str(error.value)


def test_token_id_beyond_vocab_is_an_error_naming_the_shard(tmp_path):
    tokens = positions(100)
    tokens[50] = 50257
    write_shard(tmp_path / "train_000000.bin", tokens)
    loader = ShardLoader(tmp_path, "train", batch_size=2, seq_len=10)
    loader.next_batch()
    loader.next_batch()
    with pytest.raises(ShardError, match=r"train_000000.bin: token id 50257 at token 50 is >= vocab_size 50257"):
        loader.next_batch()
    assert ShardLoader(tmp_path, "train", batch_size=2, seq_len=10, vocab_size=65536).num_batches == 4


def test_missing_dir_no_shards_and_short_shard_errors(tmp_path):
    with pytest.raises(ShardError, match="no such directory"):
        ShardLoader(tmp_path / "nope", "train", 1, 8)
    (tmp_path / "notes.txt").write_text("")
    write_shard(tmp_path / "val_000000.bin", positions(100))
    with pytest.raises(ShardError, match=r"no train shards .* it contains: notes.txt, val_000000.bin"):
        find_shards(tmp_path, "train")
    with pytest.raises(
        ShardError, match=r"val_000000.bin: 100 tokens, shorter than one batch window of B\*T\+1 = 129"
    ):
        ShardLoader(tmp_path, "val", batch_size=2, seq_len=64)


# -----------------------------------------------------------------------------
# fineweb_shards.py: ranks, shuffling, state


@pytest.fixture
def three_shards(tmp_path) -> Path:
    # token value = position in the stream, so a batch's first token says which window it is
    for i, n in enumerate([170, 200, 130]):
        write_shard(tmp_path / f"train_{i:06d}.bin", positions(n, start=1000 * i))
    return tmp_path


def window_starts(loader: ShardLoader, batches: int) -> list[int]:
    return [loader.next_batch()[0][0, 0].item() for _ in range(batches)]


def row_starts(loader: ShardLoader, batches: int) -> list[list[int]]:
    """Where each row of the next `batches` batches starts in the stream."""
    return [loader.next_batch()[0][:, 0].tolist() for _ in range(batches)]


@pytest.mark.parametrize("shuffle", [False, True])
def test_ranks_read_disjoint_sequences_that_cover_the_stream(three_shards, shuffle):
    B, T, world = 2, 8, 3
    lengths = [170, 200, 130]
    windows = [1000 * i + s for i, n in enumerate(lengths) for s in range(0, n - B * T, B * T)]
    sequences = [1000 * i + s for i, n in enumerate(lengths) for s in range(0, n - T, T)]
    per_rank = []
    for rank in range(world):
        loader = ShardLoader(three_shards, "train", B, T, rank=rank, world_size=world, seed=7, shuffle=shuffle)
        assert loader.num_batches == len(windows) // world
        per_rank.append(row_starts(loader, loader.num_batches))
    seen = [start for batches in per_rank for rows in batches for start in rows]
    assert len(set(seen)) == len(seen) == loader.num_batches * world * B
    assert set(seen) <= set(sequences)
    rows_are_neighbours = all(rows == list(range(rows[0], rows[0] + B * T, T)) for rows in per_rank[0])
    assert rows_are_neighbours != shuffle
    if not shuffle:  # every window but the few left over by the world size
        assert len(windows) - len(seen) // B < world and {rows[0] for rows in per_rank[0]} <= set(windows)


def test_shuffle_permutes_shards_and_sequences_every_epoch_from_the_seed(three_shards):
    def epochs(seed, count=4):
        loader = ShardLoader(three_shards, "train", 2, 8, seed=seed, shuffle=True)
        return [[start for rows in row_starts(loader, loader.num_batches) for start in rows] for _ in range(count)]

    runs = epochs(seed=1)
    assert runs == epochs(seed=1) and runs[0] != epochs(seed=2)[0]
    # a shard is read whole before the next, in an order that changes between epochs
    assert len({tuple(dict.fromkeys(start // 1000 for start in epoch)) for epoch in runs}) > 1
    in_shard_1 = [[start for start in epoch if start // 1000 == 1] for epoch in runs]
    assert in_shard_1[0] != sorted(in_shard_1[0]) and in_shard_1[0] != in_shard_1[1]
    assert len(set(in_shard_1[0])) == len(in_shard_1[0]) == 24  # 12 windows of 2 rows out of 24 sequences


def test_a_shuffled_validation_pass_samples_the_whole_split_and_repeats(tmp_path):
    write_shard(tmp_path / "val_000000.bin", positions(800))
    B, T, batches = 2, 8, 4  # a pass of 8 of the split's 99 sequences
    first = validation_loader(tmp_path, shuffle=True, batch_size=B, seq_len=T)
    rows = [start for batch in row_starts(first, batches) for start in batch]
    assert max(rows) - min(rows) > 400  # from all over the split, not its first 64 tokens
    first.reset()  # every evaluation reads the same sequences, whatever the run's seed
    assert [start for batch in row_starts(first, batches) for start in batch] == rows
    assert row_starts(validation_loader(tmp_path, shuffle=True, batch_size=B, seq_len=T), batches)[0] == rows[:B]
    in_order = validation_loader(tmp_path, shuffle=False, batch_size=B, seq_len=T)
    assert [start for batch in row_starts(in_order, batches) for start in batch] == list(range(0, B * T * batches, T))


@pytest.mark.parametrize("shuffle", [False, True])
def test_state_dict_resumes_at_the_exact_next_batch(three_shards, shuffle):
    loader = ShardLoader(three_shards, "train", 2, 8, rank=1, world_size=2, seed=3, shuffle=shuffle)
    for _ in range(loader.num_batches + 3):  # into the second epoch
        loader.next_batch()
    state = json.loads(json.dumps(loader.state_dict()))
    expected = [loader.next_batch() for _ in range(loader.num_batches)]
    resumed = ShardLoader(three_shards, "train", 2, 8, rank=1, world_size=2, seed=3, shuffle=shuffle)
    resumed.load_state_dict(state)
    for (x, y), (rx, ry) in zip(expected, iter(resumed), strict=False):
        assert torch.equal(x, rx) and torch.equal(y, ry)


def test_load_state_dict_refuses_another_layout(three_shards):
    state = ShardLoader(three_shards, "train", 2, 8).state_dict()
    with pytest.raises(ValueError, match="batch_size: saved 2, now 4"):
        ShardLoader(three_shards, "train", 4, 8).load_state_dict(state)


def test_reset_starts_a_fresh_pass(three_shards):
    loader = ShardLoader(three_shards, "train", 2, 8)
    first = window_starts(loader, 3)
    loader.reset()
    assert window_starts(loader, 3) == first == [0, 16, 32]
