"""Interleaved timing shared by the model benchmarks: contenders run in turn (A B, B A, A B, ...), so a slow
phase of a shared machine hits all of them, and each figure is a ratio of runs made side by side; and the line
that heads the CPU benchmarks' tables."""

import datetime
import platform
import statistics
import time
from collections.abc import Callable

import torch


def time_interleaved(
    contenders: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
    synchronize: Callable[[], None] = lambda: None,
    after_round: Callable[[int, dict[str, list[float]]], None] = lambda round_index, times: None,
) -> dict[str, list[float]]:
    """Seconds per call of each contender over `repeats` rounds, after `warmup` untimed rounds.

    Odd rounds reverse the order, so no contender always runs right after the same other one.
    `after_round(round_index, times so far)` runs after every round, warm-up ones included (for progress).
    """
    times = {name: [] for name in contenders}
    for round_index in range(warmup + repeats):
        names = list(contenders) if round_index % 2 == 0 else list(reversed(contenders))
        for name in names:
            synchronize()
            start = time.perf_counter()
            contenders[name]()
            synchronize()
            if round_index >= warmup:
                times[name].append(time.perf_counter() - start)
        after_round(round_index, times)
    return times


def synchronizer(device: str | torch.device) -> Callable[[], None]:
    """What time_interleaved must call around each run on `device`: CUDA runs asynchronously, a CPU does not."""
    return torch.cuda.synchronize if torch.device(device).type == "cuda" else lambda: None


def paired_ratio(times: list[float], reference_times: list[float]) -> tuple[float, float, float]:
    """Median and quartiles of the per-round ratios time / reference time (runs of one round are adjacent)."""
    ratios = sorted(t / r for t, r in zip(times, reference_times, strict=True))
    if len(ratios) < 2:
        return ratios[0], ratios[0], ratios[0]
    low, median, high = statistics.quantiles(ratios, n=4, method="inclusive")
    return median, low, high


def ratio_row(name: str, times: list[float], reference_times: list[float]) -> str:
    """A markdown table row: median ms of both, and the paired ratio with its interquartile range."""
    median, low, high = paired_ratio(times, reference_times)
    ms, reference_ms = statistics.median(times) * 1e3, statistics.median(reference_times) * 1e3
    return f"| {name} | {ms:.1f} | {reference_ms:.1f} | **{median:.2f}x** ({low:.2f}-{high:.2f}) |"


def cpu_header(shape: dict, freed_memory_kept: bool) -> str:
    """The line above a CPU benchmark's table: date, machine, threads, torch version, malloc setting and shape."""
    malloc = "freed memory kept (cpu_memory.py)" if freed_memory_kept else "default malloc"
    return (
        f"{datetime.date.today()}, {platform.machine()} ({torch.backends.cpu.get_cpu_capability()}), "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, {malloc}; shape {shape}"
    )
