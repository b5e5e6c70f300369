"""Dense GPTMoE against transformers' GPT2LMHeadModel on CPU: training step, generation, peak memory.

    python bench/bench_model_cpu.py            # BENCHMARKS.md shapes, a few minutes on 2 cores
    python bench/bench_model_cpu.py --quick    # tiny shapes, under a minute

Both models hold the same weights (ours is converted from the peer), use sdpa attention, no dropout.
1. Training step (forward + backward + fused AdamW), fp32 and bf16 autocast.
2. Greedy generation with the KV cache, 128 new tokens, batch 1 and 8 (the tokens must agree).
3. Peak memory of a training step: the highest count of bytes held by torch's CPU allocator during the
   step above what it held when the step began (torch.profiler allocation events), i.e. activations,
   gradients and temporaries; parameters and AdamW state are the same for both and are left out.
Contenders run interleaved (A B, B A, ...); each figure is the median of per-round ratios ours / peer.
"""

import argparse
import sys
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
from timing import cpu_header, ratio_row, time_interleaved
from torch._C._profiler import _EventType
from transformers import GPT2Config, GPT2LMHeadModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from command_line import ArgumentParser  # noqa: E402
from convert_gpt2_to_gpt_moe import convert_gpt2  # noqa: E402
from cpu_memory import keep_freed_memory  # noqa: E402

FULL = dict(n_layer=4, n_head=6, n_embd=384, seq_len=256, batch_size=4, vocab_size=8192, prompt_len=64, repeats=7)
QUICK = dict(n_layer=2, n_head=4, n_embd=128, seq_len=64, batch_size=2, vocab_size=1024, prompt_len=16, repeats=5)
NEW_TOKENS = 128


def build_models(shape: dict) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    peer_config = GPT2Config(
        vocab_size=shape["vocab_size"],
        n_positions=max(shape["seq_len"], shape["prompt_len"] + NEW_TOKENS),
        n_layer=shape["n_layer"],
        n_head=shape["n_head"],
        n_embd=shape["n_embd"],
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=shape["vocab_size"] - 1,
        eos_token_id=shape["vocab_size"] - 1,
        attn_implementation="sdpa",
    )
    peer = GPT2LMHeadModel(peer_config)
    ours = convert_gpt2(peer)
    ours.set_attn_implementation("sdpa")
    return {"GPTMoE": ours, "GPT2LMHeadModel": peer}


def train_step_fn(model: torch.nn.Module, ids: torch.Tensor, bf16: bool) -> Callable[[], None]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext():
            loss = model(ids, labels=ids, use_cache=False).loss  # as train_accelerate.py calls it
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def bench_training(models: dict, shape: dict) -> list[str]:
    rows = []
    # bf16 matmuls are several times slower than fp32 on a CPU without AMX/AVX512-BF16: a smaller batch
    for dtype, batch_size in (("fp32", shape["batch_size"]), ("bf16 autocast", 1)):
        ids = torch.randint(0, shape["vocab_size"], (batch_size, shape["seq_len"]))
        steps = {name: train_step_fn(model, ids, bf16=dtype != "fp32") for name, model in models.items()}
        times = time_interleaved(steps, repeats=shape["repeats"], warmup=1)
        rows.append(ratio_row(f"train step, {dtype}, B={batch_size}", times["GPTMoE"], times["GPT2LMHeadModel"]))
    return rows


def generate_fn(model: torch.nn.Module, prompt: torch.Tensor, outputs: dict, name: str) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            outputs[name] = model.generate(
                prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0
            )

    return run


def bench_generation(models: dict, shape: dict) -> list[str]:
    rows = []
    for batch_size in (1, 8):
        prompt = torch.randint(0, shape["vocab_size"], (batch_size, shape["prompt_len"]))
        outputs = {}
        contenders = {name: generate_fn(model, prompt, outputs, name) for name, model in models.items()}
        times = time_interleaved(contenders, repeats=shape["repeats"], warmup=1)
        if not torch.equal(outputs["GPTMoE"], outputs["GPT2LMHeadModel"]):
            raise RuntimeError(f"greedy tokens differ at batch {batch_size}: the two models are not the same function")
        name = f"generate {NEW_TOKENS} tokens, B={batch_size}"
        rows.append(ratio_row(name, times["GPTMoE"], times["GPT2LMHeadModel"]))
    return rows


def peak_allocated_bytes(fn: Callable[[], None]) -> int:
    """Highest running total of bytes allocated minus freed by torch on the CPU while `fn` runs."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    peak, stack = 0, list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        if event.tag == _EventType.Allocation:
            peak = max(peak, event.extra_fields.total_allocated)
        stack.extend(event.children)
    return peak


def bench_memory(models: dict, shape: dict) -> list[str]:
    rows = []
    for dtype, bf16 in (("fp32", False), ("bf16 autocast", True)):
        ids = torch.randint(0, shape["vocab_size"], (shape["batch_size"], shape["seq_len"]))
        peaks = {}
        for name, model in models.items():
            step = train_step_fn(model, ids, bf16)
            step()  # AdamW state exists from here on, as in any later step
            peaks[name] = peak_allocated_bytes(step)
        ours, peer = peaks["GPTMoE"] / 2**20, peaks["GPT2LMHeadModel"] / 2**20
        name = f"peak memory of a train step, {dtype}, B={shape['batch_size']}"
        rows.append(f"| {name} | {ours:.1f} MiB | {peer:.1f} MiB | **{ours / peer:.2f}x** |")
    return rows


def main() -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few repetitions")
    parser.add_argument("--only", nargs="+", choices=("train", "generate", "memory"), default=None)
    args = parser.parse_args()
    shape = QUICK if args.quick else FULL
    only = args.only or ("train", "generate", "memory")
    kept = keep_freed_memory()  # as train_accelerate.py does on CPU, before anything large is allocated
    models = build_models(shape)
    print(cpu_header(shape, freed_memory_kept=kept))
    print("| measurement | GPTMoE | GPT2LMHeadModel | ours / peer (quartiles) |\n|---|---|---|---|")
    if "train" in only:
        print("\n".join(bench_training(models, shape)))
    if "generate" in only:
        print("\n".join(bench_generation(models, shape)))
    if "memory" in only:
        print("\n".join(bench_memory(models, shape)))


if __name__ == "__main__":
    main()
