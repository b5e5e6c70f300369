"""Training throughput on one GPU: GPTMoE dense, MoE and fine-grained MoE against GPT2LMHeadModel, in one run.

    python bench/gpu_throughput.py                        # H100: GPT-2 124M shape, T=1024, micro-batch 16
    python bench/gpu_throughput.py --precision bf16       # bf16 weights throughout, no fp32 master copy
    python bench/gpu_throughput.py --max_batch            # the largest micro-batch that fits, per model
    python bench/gpu_throughput.py --quick --device cpu   # tiny shape: proves the script itself runs

A training step is what train_accelerate.py runs: forward with loss, backward, fused AdamW, bf16 autocast over
fp32 weights (--precision autocast) or bf16 weights throughout (--precision bf16). The variants run interleaved
(A B C ..., reversed every other round, after two warm-up rounds that hold the compilation) with all models
resident; each figure is a median over rounds.

FLOPs per token follow nanoGPT's estimate_mfu: 6 * N + 12 * n_layer * n_embd * T, N the parameters a token
passes through: every parameter but the position embedding (the token embedding counts once, as the output
layer), routed experts weighted by top_k / num_experts. MFU is against 989 TFLOP/s (H100 SXM dense bf16) and
against a bf16 matmul measured here. Peak memory is what one model alone would hold: its parameters and
optimizer state plus the step's own peak above them.
"""

import argparse
import datetime
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from timing import paired_ratio, synchronizer, time_interleaved
from transformers import GPT2Config, GPT2LMHeadModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from command_line import ArgumentParser  # noqa: E402
from configuration_gpt_moe import GPTMoEConfig  # noqa: E402
from modeling_gpt_moe import GPTMoEForCausalLM  # noqa: E402
from training_metrics import flops_per_token  # noqa: E402  (what train_accelerate.py reports MFU with)

H100_DENSE_BF16_FLOPS = 989e12
GPT2_124M = dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50304, seq_len=1024, batch_size=16, eos=50256)
TINY = dict(n_layer=1, n_head=2, n_embd=64, vocab_size=512, seq_len=64, batch_size=2, eos=0)
PEER = "GPT2LMHeadModel"
# one in each order: compiled models share code with each other, and a variant can recompile the first time it
# runs after another one
WARMUP_ROUNDS = 2
# name: GPTMoEConfig overrides; the fine-grained MoE splits each expert of the 8x top-2 one in four
# (DeepSeekMoE): same total and active parameters, four times the experts and the top-k
MODELS = {
    "dense": lambda n_embd: dict(use_moe=False),
    "MoE 8x top-2": lambda n_embd: dict(num_experts=8, num_experts_per_tok=2),
    "MoE 32x top-8": lambda n_embd: dict(num_experts=32, num_experts_per_tok=8, moe_intermediate_size=n_embd),
}


@dataclass
class Variant:
    model: str
    compiled: bool
    experts: str | None = None  # experts implementation of a MoE model

    @property
    def name(self) -> str:
        experts = f", experts {self.experts}" if self.experts else ""
        return f"{self.model}{experts}{', compiled' if self.compiled else ''}"


VARIANTS = [
    Variant(PEER, compiled=False),
    Variant(PEER, compiled=True),
    Variant("dense", compiled=False),
    Variant("dense", compiled=True),
    Variant("MoE 8x top-2", compiled=False, experts="eager"),
    Variant("MoE 8x top-2", compiled=False, experts="grouped_mm"),
    Variant("MoE 8x top-2", compiled=True, experts="grouped_mm"),
    Variant("MoE 32x top-8", compiled=False, experts="grouped_mm"),
    Variant("MoE 32x top-8", compiled=True, experts="grouped_mm"),
]


def build_model(name: str, shape: dict, device: str, precision: str) -> torch.nn.Module:
    torch.manual_seed(0)
    dims = dict(n_layer=shape["n_layer"], n_head=shape["n_head"], n_embd=shape["n_embd"])
    tokens = dict(vocab_size=shape["vocab_size"], bos_token_id=shape["eos"], eos_token_id=shape["eos"])
    with torch.device(device):
        if name == PEER:
            config = GPT2Config(
                n_positions=shape["seq_len"],
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
                attn_implementation="sdpa",
                **dims,
                **tokens,
            )
            model = GPT2LMHeadModel(config)
        else:
            overrides = MODELS[name](shape["n_embd"])
            config = GPTMoEConfig(block_size=shape["seq_len"], **dims, **tokens, **overrides)
            model = GPTMoEForCausalLM(config)
    return model.to(torch.bfloat16) if precision == "bf16" else model


class Trainer:
    """One model, its optimizer and one compiled or eager forward per variant, for timed training steps."""

    def __init__(self, model: torch.nn.Module, args: argparse.Namespace):
        self.model, self.args = model, args
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
        self.compiled = torch.compile(model)

    def step(self, variant: Variant, ids: torch.Tensor) -> None:
        if variant.experts:
            self.model.config._experts_implementation = variant.experts
        forward = self.compiled if variant.compiled else self.model
        with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=self.args.precision == "autocast"):
            loss = forward(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def steps(self, variant: Variant, ids: torch.Tensor) -> int | None:
        """`args.steps` training steps; returns the peak bytes of this model alone (None off CUDA)."""
        if not ids.is_cuda:
            for _ in range(self.args.steps):
                self.step(variant, ids)
            return None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before, resident = torch.cuda.memory_allocated(), self.resident_bytes()  # before: all models on the device
        for _ in range(self.args.steps):
            self.step(variant, ids)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before + resident

    def resident_bytes(self) -> int:
        """Parameters and optimizer state: what the model holds between steps."""
        tensors = list(self.model.parameters())
        tensors += [t for state in self.optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
        return sum(t.numel() * t.element_size() for t in tensors)


def matmul_flops(device: str, size: int) -> float:
    """Measured bf16 matmul rate on random (not zero) inputs: the practical ceiling."""
    a, b = (torch.randn(size, size, device=device, dtype=torch.bfloat16) for _ in range(2))
    times = time_interleaved({"mm": lambda: a @ b}, repeats=20, warmup=3, synchronize=synchronizer(device))
    return 2 * size**3 / statistics.median(times["mm"])


def random_ids(shape: dict, batch_size: int, device: str) -> torch.Tensor:
    return torch.randint(0, shape["vocab_size"], (batch_size, shape["seq_len"]), device=device)


def benchmark(
    variants: list[Variant], trainers: dict, ids: torch.Tensor, args, report: Callable[[dict], None]
) -> dict:
    """Seconds per `args.steps` steps and peak bytes of every variant, interleaved; a variant that fails
    reports its error instead of ending the run. Prints each variant's first call (compilation included) as it
    ends and a line per round, and calls `report(results so far)` after every timed round, so a run stopped
    early still leaves the rounds it finished."""
    results = {"times": {}, "peaks": {}, "errors": {}}
    called = set()  # the variants whose first call has worked
    started = time.perf_counter()

    def contender(variant: Variant) -> Callable[[], None]:
        trainer = trainers[variant.model]

        def run() -> None:
            if variant.name in results["errors"]:
                return
            start = time.perf_counter()
            try:
                peak = trainer.steps(variant, ids)
            except (RuntimeError, torch.OutOfMemoryError) as error:
                results["errors"][variant.name] = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
                print(f"{variant.name}: failed, {results['errors'][variant.name]}", flush=True)
                trainer.optimizer.zero_grad(set_to_none=True)
                return
            if variant.name not in called:  # compilation included
                called.add(variant.name)
                print(f"{variant.name}: first call {time.perf_counter() - start:.1f} s", flush=True)
            if peak is not None:
                results["peaks"][variant.name] = max(results["peaks"].get(variant.name, 0), peak)

        return run

    def after_round(round_index: int, times: dict) -> None:
        timed = round_index + 1 - WARMUP_ROUNDS
        done = (
            f"timed round {timed}/{args.repeats}" if timed > 0 else f"warm-up round {round_index + 1}/{WARMUP_ROUNDS}"
        )
        print(f"{done} done, {time.perf_counter() - started:.0f} s", flush=True)
        if timed > 0:
            report({**results, "times": times})

    contenders = {variant.name: contender(variant) for variant in variants}
    results["times"] = time_interleaved(
        contenders, args.repeats, warmup=WARMUP_ROUNDS, synchronize=synchronizer(args.device), after_round=after_round
    )
    return results


def table_header(args: argparse.Namespace) -> list[str]:
    return [
        f"| model | B | tokens/s | MFU (989 TF/s) | MFU (matmul {args.matmul_rate / 1e12:.3g} TF/s) | peak GiB "
        f"| speed vs {Variant(PEER, compiled=True).name} |",
        "|---|---|---|---|---|---|---|",
    ]


def table_rows(variants: list[Variant], trainers: dict, results: dict, shape: dict, args) -> list[str]:
    tokens = shape["batch_size"] * shape["seq_len"]
    peer = Variant(PEER, compiled=True).name
    rows = []
    for variant in variants:
        if variant.name in results["errors"]:
            rows.append(f"| {variant.name} | {shape['batch_size']} | failed: {results['errors'][variant.name]} |")
            continue
        times = [t / args.steps for t in results["times"][variant.name]]
        step_s = statistics.median(times)
        achieved = flops_per_token(trainers[variant.model].model, shape["seq_len"]) * tokens / step_s
        peak = results["peaks"].get(variant.name)
        peak_text = f"{peak / 2**30:.1f}" if peak else "n/a"
        versus = ""
        if peer in results["times"] and peer not in results["errors"]:
            speedup, low, high = paired_ratio(results["times"][peer], results["times"][variant.name])
            versus = f"{speedup:.2f}x ({low:.2f}-{high:.2f})"
        rows.append(
            f"| {variant.name} | {shape['batch_size']} | {tokens / step_s:,.0f} "
            f"| {achieved / H100_DENSE_BF16_FLOPS:.1%} | {achieved / args.matmul_rate:.1%} | {peak_text} | {versus} |"
        )
    return rows


def fits(trainer: Trainer, variant: Variant, ids: torch.Tensor) -> bool:
    try:
        trainer.step(variant, ids)
        return True
    except torch.OutOfMemoryError:
        trainer.optimizer.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        return False


def time_alone(trainer: Trainer, variant: Variant, shape: dict, args, write: Callable[[list[str]], None]) -> list[str]:
    """The table row of `variant` timed alone at `shape`; `write(row so far)` after every timed round."""
    trainers = {variant.model: trainer}

    def rows(results: dict) -> list[str]:
        return table_rows([variant], trainers, results, shape, args)

    ids = random_ids(shape, shape["batch_size"], args.device)
    return rows(benchmark([variant], trainers, ids, args, report=lambda results: write(rows(results))))


def max_batch(args: argparse.Namespace, shape: dict, write: Callable[[list[str]], None]) -> list[str]:
    """For each model alone on the device: the largest micro-batch an eager step fits (a compiled step needs no
    more memory), then its compiled variant timed at that batch. `write(rows)` gets the table so far."""
    candidates = (2, 4) if args.quick else (16, 24, 32, 48, 64, 96, 128)
    rows = []

    def write_after_finished_models(current: list[str]) -> None:
        write(rows + current)

    for name in (PEER, *MODELS):
        trainer = Trainer(build_model(name, shape, args.device, args.precision), args)
        experts = "grouped_mm" if name.startswith("MoE") else None
        largest = None
        eager = Variant(name, compiled=False, experts=experts)
        for batch_size in candidates:
            if not fits(trainer, eager, random_ids(shape, batch_size, args.device)):
                break
            largest = batch_size
        print(f"{name}: largest micro-batch {largest}", flush=True)
        if largest is None:
            rows.append(f"| {name} | < {candidates[0]} | does not fit |")
        else:
            variant = Variant(name, compiled=True, experts=experts)
            rows += time_alone(trainer, variant, {**shape, "batch_size": largest}, args, write_after_finished_models)
        write(rows)
        del trainer
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows


def table_writer(path: str | None, heading: list[str]) -> Callable[..., None]:
    """`write(rows, note)`: the heading, `rows` and a note into `path` (markdown), replaced whole so that it is
    never half written. The first call, before any compilation, checks that the path can be written."""

    def write(rows: list[str], note: str = "") -> None:
        if path:
            temporary = Path(f"{path}.tmp")
            temporary.write_text("\n".join([*heading, *rows, "", note]).rstrip() + "\n")
            temporary.replace(path)

    write([], "(no round timed yet)")
    return write


def rounds_note(results: dict, args: argparse.Namespace) -> str:
    rounds = max(map(len, results["times"].values()), default=0)  # every variant has one time per round
    return f"{rounds} of {args.repeats} timed rounds of {args.steps} steps"


def main() -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny shape, few steps")
    parser.add_argument("--precision", choices=("autocast", "bf16"), default="autocast")
    parser.add_argument("--max_batch", action="store_true", help="find the largest micro-batch per model instead")
    parser.add_argument("--only", nargs="+", default=None, help="variants whose name contains one of these")
    parser.add_argument(
        "--output", default=None, help="also write the table to this markdown file, updated after every timed round"
    )
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("error: no CUDA device here; run with --device cpu --quick to check the script itself.")
    shape = TINY if args.quick else GPT2_124M
    args.steps, args.repeats = (1, 2) if args.quick else (5, 5)
    torch.set_float32_matmul_precision("high")  # as train_accelerate.py: TF32 for fp32 matmuls outside autocast
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    args.matmul_rate = matmul_flops(args.device, 256 if args.quick else 8192)
    heading = [
        f"{datetime.date.today()}, {device_name}, torch {torch.__version__}, precision {args.precision}; "
        f"shape {shape}; measured bf16 matmul {args.matmul_rate / 1e12:.3g} TFLOP/s",
        "",
        *table_header(args),
    ]
    print(heading[0], flush=True)
    try:
        write = table_writer(args.output, heading)
    except OSError as error:
        sys.exit(f"error: cannot write --output {args.output}: {error.strerror}; name a file in an existing folder")
    if args.max_batch:
        rows = max_batch(args, shape, write)
    else:
        variants = [v for v in VARIANTS if not args.only or any(word in v.name for word in args.only)]
        models = dict.fromkeys(variant.model for variant in variants)
        trainers = {name: Trainer(build_model(name, shape, args.device, args.precision), args) for name in models}

        def report(results: dict) -> None:
            write(table_rows(variants, trainers, results, shape, args), rounds_note(results, args))

        ids = random_ids(shape, shape["batch_size"], args.device)
        rows = table_rows(variants, trainers, benchmark(variants, trainers, ids, args, report), shape, args)
    print("\n".join(heading[1:] + rows))


if __name__ == "__main__":
    main()
