"""Cost of the MoE layers on CPU: routing and dispatch overhead, and our block against OLMoE's.

    python bench/bench_moe_cpu.py            # BENCHMARKS.md shapes, a few minutes on 2 cores
    python bench/bench_moe_cpu.py --quick    # tiny shapes, under a minute

1. Overhead: a MoE layer of 8 experts, top-1, against the dense MLP of the same active FLOPs (width
   4 * n_embd), and top-2 against a dense MLP of twice that width; forward + backward of the layer
   alone, then a whole-model training step (forward + backward + fused AdamW, router losses included).
   The layer is also split in two: its experts alone on pre-routed tokens against the dense MLP (the cost
   of small per-expert matmuls), and the layer against its experts alone (the cost of routing and dispatch).
   One matmul of the experts is timed alone too, against the dense one, at 1 thread and at the default count.
2. Our sparse block against transformers' OlmoeSparseMoeBlock at the same hidden size, experts, top-k
   and router weights (so the same tokens go to the same experts). OLMoE experts are SwiGLU (three
   matrices), so its intermediate size is 2/3 of ours for the same active FLOPs. Every experts
   implementation of both is timed; the ratio compares the fastest of each. A second row runs our block
   with the exact GELU instead of GPT-2's tanh one, which is several times slower on CPUs without fast tanh.
Everything is fp32 (the fast dtype on a CPU without AMX). Contenders run interleaved (A B, B A, ...);
each figure is the median of per-round ratios.
"""

import argparse
import itertools
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from bench_model_cpu import train_step_fn
from timing import cpu_header, ratio_row, time_interleaved
from transformers import OlmoeConfig
from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from command_line import ArgumentParser  # noqa: E402
from configuration_gpt_moe import GPTMoEConfig  # noqa: E402
from cpu_memory import keep_freed_memory  # noqa: E402
from modeling_gpt_moe import GPTMoEForCausalLM, GPTMoEMLP, GPTMoESparseMoeBlock  # noqa: E402

FULL = dict(
    n_layer=4, n_head=6, n_embd=384, seq_len=256, batch_size=4, vocab_size=8192, repeats=7, layer_batch_sizes=(4, 16)
)
QUICK = dict(
    n_layer=2, n_head=4, n_embd=192, seq_len=128, batch_size=4, vocab_size=2048, repeats=5, layer_batch_sizes=(4,)
)
NUM_EXPERTS = 8
# batched_mm gathers one weight matrix per (token, expert) pair: 2 * S * I * H floats, 9.7 GB at the full
# shape with top-2, ~20 s per block on 2 cores (50x the others), so it is left out on CPU
EXPERTS_IMPLEMENTATIONS = ("eager", "grouped_mm")


def gpt_moe_config(shape: dict, **overrides) -> GPTMoEConfig:
    config = GPTMoEConfig(
        vocab_size=shape["vocab_size"],
        block_size=shape["seq_len"],
        n_layer=shape["n_layer"],
        n_head=shape["n_head"],
        n_embd=shape["n_embd"],
        num_experts=NUM_EXPERTS,
        bos_token_id=0,
        eos_token_id=0,
        **overrides,
    )
    config._experts_implementation = "eager"
    return config


def with_experts_implementation(module: torch.nn.Module, implementation: str, fn: Callable) -> Callable[[], None]:
    """`fn` run with the experts of `module` (a sparse block or a whole model) set to `implementation`."""

    config = getattr(module, "experts", module).config  # a block's experts hold the config, a model holds it

    def run() -> None:
        config._experts_implementation = implementation
        fn()

    return run


def fwd_bwd_fn(layer: torch.nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """Forward and backward of one layer, gradients dropped after (as zero_grad does in training)."""
    grad_output = torch.randn_like(x)

    def run() -> None:
        layer(x).backward(grad_output)
        layer.zero_grad(set_to_none=True)
        x.grad = None

    return run


def pre_routed_experts_fn(moe: GPTMoESparseMoeBlock, x: torch.Tensor) -> Callable[[], None]:
    """Forward and backward of the block's experts alone, on tokens already grouped by expert in the numbers
    its router sends them: the eager experts' own expert_mlps, without the router, the sort, the gather and
    the weighted scatter. What the MoE layer costs above this is routing and dispatch;
    what this costs above the dense MLP is that of small per-expert matmuls over 3D weights."""
    experts = moe.experts
    with torch.no_grad():
        _, _, top_k_index = moe.router(x.view(-1, x.shape[-1]))
    tokens_per_expert = torch.bincount(top_k_index.reshape(-1), minlength=experts.num_experts).tolist()
    routed = torch.randn(sum(tokens_per_expert), x.shape[-1], requires_grad=True)
    grad_output = torch.randn_like(routed)

    def run() -> None:
        torch.cat(experts.expert_mlps(routed.split(tokens_per_expert))).backward(grad_output)
        moe.zero_grad(set_to_none=True)
        routed.grad = None

    return run


def bench_overhead_layers(shape: dict) -> list[str]:
    rows = []
    for batch_size, top_k in itertools.product(shape["layer_batch_sizes"], (1, 2)):
        torch.manual_seed(0)
        x = torch.randn(batch_size, shape["seq_len"], shape["n_embd"], requires_grad=True)
        config = gpt_moe_config(shape, num_experts_per_tok=top_k)
        moe, dense = GPTMoESparseMoeBlock(config), GPTMoEMLP(config, top_k * config.moe_intermediate_size)
        for layer in (moe, dense):
            for param in layer.parameters():
                torch.nn.init.normal_(param, std=0.02)
        contenders = {i: with_experts_implementation(moe, i, fwd_bwd_fn(moe, x)) for i in EXPERTS_IMPLEMENTATIONS}
        contenders |= {"pre-routed": pre_routed_experts_fn(moe, x), "dense": fwd_bwd_fn(dense, x)}
        times = time_interleaved(contenders, repeats=shape["repeats"], warmup=1)
        layer = f"layer fwd+bwd, B={batch_size}: top-{top_k} of {NUM_EXPERTS}"
        for implementation in EXPERTS_IMPLEMENTATIONS:
            name = f"{layer} (experts={implementation}) / dense MLP {top_k * 4}H"
            rows.append(ratio_row(name, times[implementation], times["dense"]))
        name = f"{layer}: experts alone, pre-routed / dense MLP {top_k * 4}H"
        rows.append(ratio_row(name, times["pre-routed"], times["dense"]))
        rows.append(ratio_row(f"{layer} (experts=eager) / experts alone", times["eager"], times["pre-routed"]))
    return rows


def expert_matmuls(tokens: int, hidden: int) -> dict[str, Callable[[], object]]:
    """Freshly allocated inputs and weights, and the three ways to multiply them that bench_expert_matmuls times."""
    weights, inputs = torch.randn(NUM_EXPERTS, 4 * hidden, hidden), torch.randn(tokens, hidden)
    routed = inputs.split(tokens // NUM_EXPERTS)
    return {
        "experts": lambda: [x @ w.t() for x, w in zip(routed, weights.unbind(), strict=True)],
        "one weight": lambda: [x @ weights[0].t() for x in routed],
        "dense": lambda: inputs @ weights[0].t(),
    }


def bench_expert_matmuls(shape: dict) -> list[str]:
    """The first matmul of a top-1 layer with B x T tokens evenly split over the experts, against the dense MLP's:
    with the experts' own weights, then with one weight for all (what reading E weights instead of one costs),
    at 1 thread and at the default thread count. A dense matmul's speed here depends on where its tensors were
    allocated (12.6 or 15.6 ms in two processes), so every round allocates them afresh."""
    hidden, tokens = shape["n_embd"], shape["layer_batch_sizes"][0] * shape["seq_len"]
    rows, threads = [], torch.get_num_threads()
    for num_threads in sorted({1, threads}):
        torch.set_num_threads(num_threads)
        times = {"experts": [], "one weight": [], "dense": []}
        for _ in range(5 * shape["repeats"]):
            contenders = expert_matmuls(tokens, hidden)
            for name, round_times in time_interleaved(contenders, repeats=1, warmup=1).items():
                times[name] += round_times
        for name in ("experts", "one weight"):
            label = f"{NUM_EXPERTS} matmuls of {tokens // NUM_EXPERTS} rows ({name}) / one of {tokens}"
            rows.append(ratio_row(f"{label}, {num_threads} thread(s)", times[name], times["dense"]))
    torch.set_num_threads(threads)
    return rows


def bench_overhead_models(shape: dict) -> list[str]:
    ids = torch.randint(0, shape["vocab_size"], (shape["batch_size"], shape["seq_len"]))
    rows = []
    for top_k in (1, 2):
        torch.manual_seed(0)
        moe = GPTMoEForCausalLM(gpt_moe_config(shape, num_experts_per_tok=top_k))
        dense = GPTMoEForCausalLM(gpt_moe_config(shape, use_moe=False, n_inner=top_k * 4 * shape["n_embd"]))
        step = train_step_fn(moe, ids, bf16=False)
        contenders = {i: with_experts_implementation(moe, i, step) for i in EXPERTS_IMPLEMENTATIONS}
        contenders["dense"] = train_step_fn(dense, ids, bf16=False)
        times = time_interleaved(contenders, repeats=shape["repeats"])
        for implementation in EXPERTS_IMPLEMENTATIONS:
            name = f"model train step: top-{top_k} of {NUM_EXPERTS} (experts={implementation}) / dense {top_k * 4}H"
            rows.append(ratio_row(name, times[implementation], times["dense"]))
    return rows


def matched_blocks(shape: dict, top_k: int) -> tuple[GPTMoESparseMoeBlock, OlmoeSparseMoeBlock]:
    """Our block and OLMoE's with the same router weights and the same active FLOPs per token."""
    ours_config = gpt_moe_config(shape, num_experts_per_tok=top_k)
    olmoe_config = OlmoeConfig(
        hidden_size=shape["n_embd"],
        intermediate_size=ours_config.moe_intermediate_size * 2 // 3,
        num_experts=NUM_EXPERTS,
        num_experts_per_tok=top_k,
        norm_topk_prob=True,
    )
    torch.manual_seed(0)
    ours, olmoe = GPTMoESparseMoeBlock(ours_config), OlmoeSparseMoeBlock(olmoe_config)
    for block in (ours, olmoe):
        for name, param in block.named_parameters():
            if name.endswith("bias"):
                torch.nn.init.zeros_(param)
            else:
                torch.nn.init.normal_(param, std=0.02)
    with torch.no_grad():
        olmoe.gate.weight.copy_(ours.router.weight)
    return ours, olmoe


def with_exact_gelu(block: GPTMoESparseMoeBlock) -> GPTMoESparseMoeBlock:
    """The same block and weights with the exact GELU: on CPUs without fast tanh, GPT-2's tanh GELU costs
    several times OLMoE's SiLU, and this separates that from the routing and dispatch."""
    config = GPTMoEConfig(**{**block.experts.config.to_dict(), "activation_function": "gelu"})
    config._experts_implementation = "eager"
    exact = GPTMoESparseMoeBlock(config)
    exact.load_state_dict(block.state_dict())
    return exact


def bench_vs_olmoe(shape: dict) -> list[str]:
    x = torch.randn(shape["batch_size"], shape["seq_len"], shape["n_embd"], requires_grad=True)
    rows = []
    for top_k in (1, 2):
        ours, olmoe = matched_blocks(shape, top_k)
        contenders = {("ours, exact GELU", "eager"): fwd_bwd_fn(with_exact_gelu(ours), x)}
        for i in EXPERTS_IMPLEMENTATIONS:
            for key, block in (("ours", ours), ("olmoe", olmoe)):
                contenders[(key, i)] = with_experts_implementation(block, i, fwd_bwd_fn(block, x))
        times = time_interleaved(contenders, repeats=shape["repeats"], warmup=1)
        medians = {key: statistics.median(t) * 1e3 for key, t in times.items()}
        best_ours = min(EXPERTS_IMPLEMENTATIONS, key=lambda i: medians[("ours", i)])
        best_olmoe = min(EXPERTS_IMPLEMENTATIONS, key=lambda i: medians[("olmoe", i)])
        all_ms = ", ".join(
            f"{i} {medians[('ours', i)]:.0f} / {medians[('olmoe', i)]:.0f} ms" for i in EXPERTS_IMPLEMENTATIONS
        )
        print(f"top-{top_k} block fwd+bwd, ours / OLMoE: {all_ms}")
        name = f"block fwd+bwd, top-{top_k} of {NUM_EXPERTS}: ours ({best_ours}) / OLMoE ({best_olmoe})"
        rows.append(ratio_row(name, times[("ours", best_ours)], times[("olmoe", best_olmoe)]))
        name = f"block fwd+bwd, top-{top_k} of {NUM_EXPERTS}: ours with exact GELU (eager) / OLMoE ({best_olmoe})"
        rows.append(ratio_row(name, times[("ours, exact GELU", "eager")], times[("olmoe", best_olmoe)]))
    return rows


def main() -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few repetitions")
    parser.add_argument("--only", nargs="+", choices=("layers", "matmuls", "models", "olmoe"), default=None)
    args = parser.parse_args()
    shape = QUICK if args.quick else FULL
    only = args.only or ("layers", "matmuls", "models", "olmoe")
    kept = keep_freed_memory()  # as train_accelerate.py does on CPU
    print(cpu_header(shape, freed_memory_kept=kept))
    rows = []
    if "layers" in only:
        rows += bench_overhead_layers(shape)
    if "matmuls" in only:
        rows += bench_expert_matmuls(shape)
    if "models" in only:
        rows += bench_overhead_models(shape)
    if "olmoe" in only:
        rows += bench_vs_olmoe(shape)
    print("| measurement | ms | reference ms | ratio (quartiles) |\n|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
