"""GPU checks of the model: experts implementations agree and their speed, sdpa's kernel, torch.compile.

    python bench/gpu_model_check.py                 # on a CUDA machine: GPT-2 124M shape, 8 experts top-2, bf16
    python bench/gpu_model_check.py --quick --device cpu   # tiny shape, proves the script itself runs

Prints one table; every timing is a median over interleaved repetitions (A B C A B C ...).
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from timing import synchronizer, time_interleaved

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from command_line import ArgumentParser  # noqa: E402
from configuration_gpt_moe import GPTMoEConfig  # noqa: E402
from modeling_gpt_moe import GPTMoEForCausalLM  # noqa: E402

EXPERTS_IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")


def build_model(args: argparse.Namespace) -> GPTMoEForCausalLM:
    shape = dict(n_layer=2, n_head=4, n_embd=128, block_size=256) if args.quick else {}
    config = GPTMoEConfig(vocab_size=50304, num_experts=8, num_experts_per_tok=2, **shape)
    torch.manual_seed(0)
    return GPTMoEForCausalLM(config).to(args.device, torch.bfloat16)


def train_step(model: GPTMoEForCausalLM, ids: torch.Tensor, implementation: str):
    def step() -> None:
        model.set_experts_implementation(implementation)
        model(ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)

    return step


def compare_experts_implementations(model: GPTMoEForCausalLM, ids: torch.Tensor, reps: int) -> list[str]:
    logits = {}
    for implementation in EXPERTS_IMPLEMENTATIONS:
        model.set_experts_implementation(implementation)
        with torch.no_grad():
            logits[implementation] = model(ids).logits.float()
    steps = {name: train_step(model, ids, name) for name in EXPERTS_IMPLEMENTATIONS}
    times = time_interleaved(steps, reps, synchronize=synchronizer(ids.device))
    eager_ms = statistics.median(times["eager"]) * 1e3
    rows = []
    for implementation in EXPERTS_IMPLEMENTATIONS:
        diff = (logits[implementation] - logits["eager"]).abs().max().item()
        ms = statistics.median(times[implementation]) * 1e3
        rows.append(
            f"experts={implementation:<11} max|logits-eager| {diff:.2e}  fwd+bwd {ms:8.1f} ms  x{ms / eager_ms:.2f}"
        )
    return rows


def sdpa_kernels(model: GPTMoEForCausalLM, ids: torch.Tensor) -> str:
    """Names of the attention kernels sdpa dispatched to, read from the profiler."""
    model.set_attn_implementation("sdpa")
    with torch.no_grad(), torch.profiler.profile() as profiler:
        model(ids)
    names = {event.name for event in profiler.events()}
    attention = sorted(
        n for n in names if any(k in n.lower() for k in ("flash", "efficient", "cudnn", "fmha", "sdpa"))
    )
    return ", ".join(attention) or "no attention kernel recognised"


def compiled_forward_check(model: GPTMoEForCausalLM, ids: torch.Tensor, reps: int) -> str:
    model.set_experts_implementation("grouped_mm")
    with torch.no_grad():
        reference = model(ids).logits.float()
        compiled = torch.compile(model)
        start = time.perf_counter()
        logits = compiled(ids).logits.float()
        compile_s = time.perf_counter() - start
        contenders = {"eager": lambda: model(ids), "compiled": lambda: compiled(ids)}
        times = time_interleaved(contenders, reps, synchronize=synchronizer(ids.device))
    speedup = statistics.median(times["eager"]) / statistics.median(times["compiled"])
    # bf16 near-ties can flip a token's expert choice, so report the typical (median) difference too
    diff = (logits - reference).abs()
    scale = reference.abs().max().item()
    return (
        f"torch.compile forward: ok, |diff| median {diff.median().item():.1e} max {diff.max().item():.1e} "
        f"(max|logit| {scale:.1f}), first call {compile_s:.0f} s, speed-up x{speedup:.2f}"
    )


def main() -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny model, few repetitions")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=1024)
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("error: no CUDA device here; run with --device cpu --quick to check the script itself.")
    if args.quick:
        args.batch_size, args.seq_len = 2, 128
    reps = 3 if args.quick else 10
    model = build_model(args)
    ids = torch.randint(0, model.config.vocab_size, (args.batch_size, args.seq_len), device=args.device)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"device {device_name}, torch {torch.__version__}, batch {args.batch_size} x {args.seq_len}, bf16")
    for row in compare_experts_implementations(model, ids, reps):
        print(row)
    print(f"sdpa kernels: {sdpa_kernels(model, ids)}")
    print(compiled_forward_check(model, ids, reps))


if __name__ == "__main__":
    main()
