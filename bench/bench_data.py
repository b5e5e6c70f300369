"""Throughput of the data pipeline, printed as markdown tables for BENCHMARKS.md.

    python bench/bench_data.py            # about 75 s on 2 cores
    python bench/bench_data.py --quick    # under a minute

1. Tokenising: prepare_fineweb.py end to end (parquet in, shards out, --num_proc 2) against
   a bare single-process tiktoken `encode_ordinary` loop over the same documents already in
   memory. Another row times the same loop with `encode_to_numpy`, the call the pipeline
   makes (same tokens, no Python int per token). The last encodes the two halves of the text
   in two processes with nothing else around them: the parallel speed-up the machine gives at
   that moment, the ceiling for the pipeline. The text is the offline python_docs corpus, in
   one parquet file written with pyarrow's defaults (a single row group).
2. Loading: ShardLoader batches/s (B=16, T=1024) against what a training step consumes.
The variants run interleaved (A B C A B C ...) and the medians are reported, because the
machine is shared and has slow phases lasting seconds.
"""

import contextlib
import datetime
import io
import itertools
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import prepare_fineweb  # noqa: E402
import text_sources  # noqa: E402
from command_line import ArgumentParser  # noqa: E402
from fineweb_shards import ShardLoader, write_shard  # noqa: E402
from gpt2_tokenizer import get_encoding  # noqa: E402

# llm.c trains GPT-2 124M at ~468k tokens/s per H100 (NOTES.md); an MoE model of the same
# active size is no faster, so this is an upper bound on what one rank consumes
TRAINING_TOKENS_PER_SECOND = 468_000
PARSED_CHARS = 1_500_000  # distinct text in the tokenising corpus: the standard library's docstrings


def corpus(chars: int) -> list[str]:
    """python_docs documents, repeated until they hold `chars` characters (parsing the whole
    installation would take minutes; tiktoken keeps no cache, so repeated text costs the same)."""
    docs, size = [], 0
    for doc in text_sources.python_docstrings():
        docs.append(doc)
        size += len(doc)
        if size >= PARSED_CHARS:
            break
    return list(itertools.islice(itertools.cycle(docs), int(len(docs) * chars / size) + 1))


def bare_loop(texts: list[str]) -> int:
    encoding = get_encoding()
    return sum(len(encoding.encode_ordinary(text)) + 1 for text in texts)  # + 1: the <|endoftext|>


def bare_numpy_loop(texts: list[str]) -> int:
    encoding = get_encoding()
    return sum(len(encoding.encode_to_numpy(text, disallowed_special=())) + 1 for text in texts)


def two_halves(texts: list[str]) -> int:
    half = len(texts) // 2
    with multiprocessing.get_context("fork").Pool(2) as pool:
        return sum(pool.map(bare_loop, [texts[:half], texts[half:]], chunksize=1))


def pipeline(parquet: Path, workdir: Path) -> int:
    output_dir = tempfile.mkdtemp(dir=workdir)  # a fresh directory: no time spent deleting the last run's shards
    argv = ["--data_files", str(parquet), "--output_dir", output_dir, "--num_proc", "2", "--shard_size", "2000000"]
    with contextlib.redirect_stdout(io.StringIO()):  # its summary lines would break up the tables
        manifest = prepare_fineweb.prepare(prepare_fineweb.parse_args(argv))
    return manifest["total_tokens"]


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the pool workers, once joined)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def measure(run) -> tuple[float, float, int]:
    """(tokens per wall second, CPU seconds per million tokens, tokens) of one run."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    tokens = run()
    return tokens / (time.perf_counter() - wall), (cpu_seconds() - cpu) / tokens * 1e6, tokens


def bench_tokenising(workdir: Path, chars: int, reps: int) -> None:
    texts = corpus(chars)
    parquet = workdir / "corpus.parquet"
    pq.write_table(pa.table({"text": texts}), parquet)
    bare, pipe = "bare tiktoken loop, 1 process", "prepare_fineweb.py, --num_proc 2"
    variants = {
        bare: lambda: bare_loop(texts),
        "bare loop with encode_to_numpy, 1 process": lambda: bare_numpy_loop(texts),
        pipe: lambda: pipeline(parquet, workdir),
        "bare loop on two halves, 2 processes (ceiling)": lambda: two_halves(texts),
    }
    results = {name: [] for name in variants}
    for _ in range(reps):
        for name, run in variants.items():
            results[name].append(measure(run))
    rates = {name: [rate for rate, _, _ in values] for name, values in results.items()}
    costs = {name: statistics.median(cost for _, cost, _ in values) for name, values in results.items()}
    tokens = results[bare][0][2]  # counted by the timed runs: no extra pass over the corpus
    size = f"{len(texts):,} documents, {sum(map(len, texts)) / 1e6:.1f} MB, {tokens:,} tokens"
    print(f"\nTokenising {size}; median of {reps}, interleaved\n")
    print("| variant | tokens/s (median) | min | max | vs bare loop | CPU s per M tokens |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, values in rates.items():
        median = statistics.median(values)
        speedup = median / statistics.median(rates[bare])
        cells = [name, f"{median:,.0f}", f"{min(values):,.0f}", f"{max(values):,.0f}", f"{speedup:.2f}x"]
        print("| " + " | ".join(cells) + f" | {costs[name]:.3f} |")
    # CPU time depends much less than wall time on what else runs on the machine
    cost_ratio = costs[pipe] / costs[bare]
    print(f"\nThe pipeline spends {cost_ratio:.2f}x the bare loop's CPU time per token; on two otherwise idle cores")
    print(f"that allows at most {2 / cost_ratio:.2f}x the bare loop's speed (a projection, not a measurement).")


def bench_loading(workdir: Path, shard_tokens: int, batches: int, reps: int) -> None:
    data = workdir / "loader"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        write_shard(data / f"train_{i:06d}.bin", rng.integers(0, 50257, shard_tokens, dtype=np.uint16))
    B, T = 16, 1024
    rates = {False: [], True: []}
    for _ in range(reps):
        for shuffle in rates:
            loader = ShardLoader(data, "train", B, T, shuffle=shuffle)
            started = time.perf_counter()
            for _ in range(batches):
                loader.next_batch()
            rates[shuffle].append(batches / (time.perf_counter() - started))
    needed = TRAINING_TOKENS_PER_SECOND / (B * T)
    print(f"\nLoading B={B}, T={T} from 4 shards of {shard_tokens:,} tokens (page cache warm); ", end="")
    print(f"{batches} batches, median of {reps}, interleaved\n")
    print("| variant | batches/s (median) | tokens/s | vs one rank's training step |")
    print("|---|---:|---:|---:|")
    for shuffle, values in rates.items():
        median = statistics.median(values)
        print(f"| shuffle={shuffle} | {median:,.0f} | {median * B * T / 1e6:,.0f}M | {median / needed:,.0f}x |")
    print(f"\nA training step at {TRAINING_TOKENS_PER_SECOND:,} tokens/s per rank needs {needed:.1f} batches/s.")


def main() -> None:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller inputs and fewer repetitions: under a minute")
    args = parser.parse_args()
    print(f"{datetime.date.today()}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, ", end="")
    print(f"Python {platform.python_version()}, numpy {np.__version__}")
    with tempfile.TemporaryDirectory() as workdir:
        if args.quick:
            bench_tokenising(Path(workdir), chars=10_000_000, reps=3)
            bench_loading(Path(workdir), shard_tokens=2_000_000, batches=200, reps=3)
        else:
            bench_tokenising(Path(workdir), chars=50_000_000, reps=5)
            bench_loading(Path(workdir), shard_tokens=25_000_000, batches=1000, reps=5)


if __name__ == "__main__":
    main()
