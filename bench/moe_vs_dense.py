"""Does this MoE beat its dense twin? Train a dense model and MoE variants of the same active FLOPs per token with
train_accelerate.py itself, on the same data, seed, schedule and token budget, and compare their validation curves.

    python bench/moe_vs_dense.py                      # offline corpus, 4 layers x 128 wide, ~22 min on 2 CPU cores
    python bench/moe_vs_dense.py --variants dense,top2-global,dense+muon,top2-global+muon   # AdamW vs Muon
    python bench/moe_vs_dense.py --shape gpt2-124m --data_dir edu_fineweb10B --max_steps 4000 \
        --launch "accelerate launch --config_file accelerate_configs/multi_gpu.yaml"        # GPUs, FineWeb-Edu

Every MoE variant has k experts of width dense_width / k per token (or, with a shared expert, k - 1 routed plus
one shared), so its active FLOPs equal the dense model's. Batches are drawn from sequences all over the corpus
(the loader's --shuffle), and so is every evaluation's pass (the same sequences for every run and evaluation).
Writes, in --output_dir: one run folder per variant, moe_vs_dense.md (the table, with the command, machine and
date) and moe_vs_dense.png (validation loss against tokens and against training time).

Per variant: the final validation loss; the tokens and the training seconds at which it first reaches the dense
run's final validation loss (interpolated between evaluations), as fractions of the dense run's; the median step
time relative to dense; the expert load at the last evaluation (max/mean per layer, the worst layer) and dead
experts (under a tenth of the balanced share). The noise of a validation figure is measured on the final
checkpoints, over disjoint validation passes of the size each evaluation uses (the first is the one the runs
evaluate on): the spread of the reference model's loss, and for each variant the mean and spread of its difference
to the reference pass by pass, which is the noise of the differences the table reports.
"""

import datetime
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from command_line import ArgumentParser  # noqa: E402
from fineweb_shards import validation_loader  # noqa: E402
from modeling_gpt_moe import GPTMoEForCausalLM  # noqa: E402

# Model, batch and schedule of each shape; `data` is the offline corpus prepared when no --data_dir is given.
SHAPES = {
    # 4,096 tokens a step in 4 micro-batches of 8 sequences (so that the micro- and global-batch losses differ, as
    # on GPUs), 80 steps (0.33M tokens): the MoE curves end 0.18-0.34 below dense's, 12-23 times the noise of a
    # difference (0.46M tokens measured the same), and the six default variants take 22 minutes on 2 cores (bf16);
    # validation on 32,768 tokens every 10 steps
    "cpu": dict(
        train=dict(
            n_layer=4, n_head=4, n_embd=128, vocab_size=50304, block_size=128, seq_len=128, micro_batch_size=8,
            total_batch_size=4096, max_steps=80, warmup_steps=8, max_lr=3e-3, min_lr=3e-4, mixed_precision="bf16",
            eval_interval=10, val_steps=32,
        ),
        data=dict(max_tokens=2_000_000, val_tokens=262_144),
    ),
    # build-nanogpt's GPT-2 124M run, shortened with --max_steps
    "gpt2-124m": dict(
        train=dict(
            n_layer=12, n_head=12, n_embd=768, vocab_size=50304, block_size=1024, seq_len=1024, micro_batch_size=16,
            total_batch_size=524288, max_steps=4000, warmup_steps=715, max_lr=6e-4, min_lr=6e-5,
            mixed_precision="bf16", eval_interval=250, val_steps=20, compile=True,
        ),
        data=None,
    ),
    # the test suite's: seconds, not minutes
    "quick": dict(
        train=dict(
            n_layer=2, n_head=2, n_embd=32, vocab_size=50304, block_size=32, seq_len=32, micro_batch_size=4,
            total_batch_size=256, max_steps=4, warmup_steps=1, max_lr=1e-2, min_lr=1e-3, mixed_precision="no",
            eval_interval=2, val_steps=2,
        ),
        data=dict(max_tokens=40_000, val_tokens=8_192),
    ),
}  # fmt: skip
RUN_FLAGS = dict(shuffle=True, hellaswag_interval=0, sample_interval=0, save_interval=0)


def variant_flags(name: str, n_embd: int) -> dict:
    """train_accelerate.py flags of a variant; a name ending in +muon also trains with --optimizer muon."""
    base, _, optimizer = name.partition("+")
    width = 4 * n_embd  # the dense MLP's, GPT-2's
    top2 = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=width // 2)
    fine = dict(num_experts=32, num_experts_per_tok=8, moe_intermediate_size=width // 8)
    fine_shared = dict(fine, num_experts_per_tok=7, n_shared_experts=1)  # 7 routed + 1 always on
    variants = {
        "dense": dict(use_moe=False, n_inner=width),
        "top2-micro": dict(**top2, router_aux_loss_scope="micro_batch"),
        "top2-global": dict(**top2, router_aux_loss_scope="global_batch"),
        "top2-bias": dict(**top2, router_aux_loss_coef=0.0, router_bias_update_rate=1e-3),
        "fine32x8": dict(**fine, router_aux_loss_scope="global_batch"),
        "fine32x8-shared": dict(**fine_shared, router_aux_loss_scope="global_batch"),
    }  # fmt: skip
    if base not in variants or optimizer not in ("", "muon"):
        raise ValueError(f"unknown variant {name!r}: choose from {', '.join(variants)}, each optionally with +muon")
    flags = dict(variants[base])
    if base != "dense":  # renormalised top-k weights sum to 1: scaled by k, the routed experts add up like a dense MLP
        flags["routed_scaling_factor"] = flags["num_experts_per_tok"]
    if optimizer:
        flags["optimizer"] = optimizer
    return flags


DEFAULT_VARIANTS = "dense,top2-micro,top2-global,top2-bias,fine32x8,fine32x8-shared"


def parse_args(argv: list[str] | None = None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=SHAPES, default="cpu")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help="comma-separated; the first is the reference")
    parser.add_argument("--data_dir", type=Path, help="prepared shards (default: the offline corpus, prepared here)")
    parser.add_argument("--output_dir", type=Path, default=Path("bench/moe_vs_dense"))
    parser.add_argument("--max_steps", type=int, help="override the shape's token budget (steps of its batch)")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--launch", default=f"{shlex.quote(sys.executable)}", help="what runs train_accelerate.py")
    parser.add_argument("--train_flags", default="", help="more train_accelerate.py flags for every run")
    parser.add_argument(
        "--reuse_runs", action="store_true", help="keep the runs in --output_dir that reached their last step"
    )
    args = parser.parse_args(argv)
    args.variants = [name.strip() for name in args.variants.split(",") if name.strip()]
    try:
        for name in args.variants:
            variant_flags(name, 128)
    except ValueError as error:
        parser.error(f"--variants: {error}")
    if args.data_dir is None and SHAPES[args.shape]["data"] is None:
        parser.error(f"--shape {args.shape} needs --data_dir (shards of prepare_fineweb.py)")
    if args.data_dir is not None and not args.data_dir.is_dir():
        parser.error(f"--data_dir {args.data_dir}: no such folder; prepare it with prepare_fineweb.py")
    return args


def command_line(flags: dict) -> list[str]:
    return [part for key, value in flags.items() for part in (f"--{key}", str(value))]


def prepare_offline_corpus(output_dir: Path, sizes: dict) -> Path:
    """The built-in corpus (docstrings, documents shuffled), prepared once and reused by later runs."""
    data_dir = output_dir / "data"
    command = [sys.executable, str(REPO_ROOT / "prepare_fineweb.py"), "--source", "python_docs"]
    command += ["--max_tokens", str(sizes["max_tokens"]), "--val_tokens", str(sizes["val_tokens"])]
    command += ["--shard_size", str(sizes["max_tokens"]), "--output_dir", str(data_dir)]
    subprocess.run(command, check=True, stderr=subprocess.DEVNULL)
    return data_dir


def train(name: str, args, data_dir: Path) -> Path:
    """One variant through train_accelerate.py; its console output goes to <run>/console.txt."""
    run_dir = args.output_dir / name
    shape = SHAPES[args.shape]["train"]
    flags = {**shape, **RUN_FLAGS, **variant_flags(name, shape["n_embd"]), "seed": args.seed}
    if args.max_steps:
        flags["max_steps"] = args.max_steps
    command = [*shlex.split(args.launch), str(REPO_ROOT / "train_accelerate.py"), *command_line(flags)]
    command += ["--data_dir", str(data_dir), "--output_dir", str(run_dir), *shlex.split(args.train_flags)]
    if args.reuse_runs and finished(run_dir, flags["max_steps"]):
        print(f"  {name}: reusing {run_dir}", flush=True)
        return run_dir
    if run_dir.exists():
        subprocess.run(["rm", "-rf", str(run_dir)], check=True)  # every comparison starts afresh
    run_dir.mkdir(parents=True)
    started = time.perf_counter()
    with open(run_dir / "console.txt", "w") as console:
        # unbuffered: each evaluation shows here as it happens, not when the run's output buffer fills
        environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment
        )
        for line in process.stdout:
            console.write(line)
            if re.match(r"step +\d+ \| val ", line):
                print(f"  {name}: {line.strip()} ({time.perf_counter() - started:.0f} s)", flush=True)
    if process.wait() != 0:
        sys.exit(f"error: the {name} run failed; its output: {run_dir / 'console.txt'}")
    return run_dir


def finished(run_dir: Path, max_steps: int) -> bool:
    """Whether a run folder holds a run that evaluated at its last step."""
    log = run_dir / "log.txt"
    return log.exists() and re.search(rf"^{max_steps} val ", log.read_text(), re.MULTILINE) is not None


def read_run(run_dir: Path, tokens_per_step: int) -> dict:
    """The validation curve against tokens and training seconds, step times and the last expert load of a run."""
    console = (run_dir / "console.txt").read_text()
    step_times = [float(ms) / 1000 for ms in re.findall(r"^step +\d+ \| loss .*\| dt ([\d.]+)ms", console, re.M)]
    elapsed = np.concatenate([[0.0], np.cumsum(step_times)])  # training seconds before each step
    val = [line.split() for line in (run_dir / "log.txt").read_text().splitlines() if line.split()[1] == "val"]
    steps = np.array([int(step) for step, _, _ in val])
    load_file = run_dir / "expert_load.jsonl"
    loads = [json.loads(line) for line in load_file.read_text().splitlines()] if load_file.exists() else []
    return {
        "steps": steps,
        "tokens": steps * tokens_per_step,
        "seconds": elapsed[steps],
        "val": np.array([float(value) for _, _, value in val]),
        "step_time": statistics.median(step_times[5:] or step_times),  # the first steps warm up
        "load": loads[-1]["layers"] if loads else [],
    }


def first_reaching(run: dict, target: float, key: str) -> float | None:
    """Tokens or seconds (`key`) at which the validation curve first reaches `target`, linearly interpolated."""
    below = np.flatnonzero(run["val"] <= target)
    if len(below) == 0:
        return None
    i = below[0]
    if i == 0:
        return float(run[key][0])
    fraction = (run["val"][i - 1] - target) / (run["val"][i - 1] - run["val"][i])
    return float(run[key][i - 1] + fraction * (run[key][i] - run[key][i - 1]))


@torch.no_grad()
def validation_passes(run_dir: Path, data_dir: Path, shape: dict, passes: int = 4) -> list[float]:
    """The final checkpoint's validation loss over disjoint passes of `val_steps` batches each, read as the
    training loop reads them (the first pass is the logged final figure)."""
    model = GPTMoEForCausalLM.from_pretrained(next(run_dir.glob("model_*"))).eval()
    layout = dict(batch_size=shape["micro_batch_size"], seq_len=shape["seq_len"], vocab_size=shape["vocab_size"])
    loader = validation_loader(data_dir, RUN_FLAGS["shuffle"], **layout)
    passes = min(passes, loader.num_batches // shape["val_steps"])
    bf16 = shape["mixed_precision"] == "bf16"
    losses = []
    with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext():
        for _ in range(passes):
            batches = [loader.next_batch() for _ in range(shape["val_steps"])]
            per_batch = [F.cross_entropy(model(x).logits.flatten(0, 1).float(), y.flatten()) for x, y in batches]
            losses.append(torch.stack(per_batch).mean().item())
    return losses


def balance(load: list[dict]) -> tuple[str, int]:
    """('max/mean per layer (worst layer)', dead experts over all layers) of the last evaluation."""
    if not load:
        return "-", 0
    ratios = [layer["max_over_mean"] for layer in load]
    worst = int(np.argmax(ratios))
    dead = sum(fraction < 0.1 / len(layer["fractions"]) for layer in load for fraction in layer["fractions"])
    return f"{' / '.join(f'{r:.2f}' for r in ratios)} (layer {load[worst]['layer']})", dead


def fraction(value: float | None, reference: float | None) -> str:
    return "not reached" if value is None or not reference else f"{value / reference:.2f}"


def difference(passes: list[float], reference: list[float]) -> str:
    """Mean and spread of the pass-by-pass difference of two models' validation losses, on the same passes."""
    differences = np.subtract(passes, reference)
    spread = f" ± {np.std(differences, ddof=1):.4f}" if len(differences) > 1 else ""
    return f"{differences.mean():+.4f}{spread}"


def table(names: list[str], runs: dict[str, dict]) -> list[str]:
    reference = runs[names[0]]
    target = reference["val"][-1]
    tokens_ref, seconds_ref = (first_reaching(reference, target, key) for key in ("tokens", "seconds"))
    rows = [
        f"| variant | final val loss | difference to {names[0]} (std over passes) | tokens to {names[0]}'s final | "
        "time to it | step time | expert max/mean per layer (worst) | dead experts |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        run = runs[name]
        loads, dead = balance(run["load"])
        versus = "-" if run is reference else difference(run["passes"], reference["passes"])
        rows.append(
            f"| {name} | {run['val'][-1]:.4f} | {versus} | "
            f"{fraction(first_reaching(run, target, 'tokens'), tokens_ref)} | "
            f"{fraction(first_reaching(run, target, 'seconds'), seconds_ref)} | "
            f"{run['step_time'] / reference['step_time']:.2f}x | {loads} | {dead} |"
        )
    return rows


def optimizer_table(names: list[str], runs: dict[str, dict]) -> list[str]:
    """Each +muon variant against its AdamW twin (the same name without +muon), when both ran."""
    pairs = [(name, name.removesuffix("+muon")) for name in names if name.endswith("+muon")]
    pairs = [(muon, adamw) for muon, adamw in pairs if adamw in runs]
    if not pairs:
        return []
    rows = [
        "| variant | final val loss | AdamW twin's | tokens to the twin's final | time to it | step time |",
        "|---|---|---|---|---|---|",
    ]
    for muon, adamw in pairs:
        target = runs[adamw]["val"][-1]
        tokens, seconds = (
            fraction(first_reaching(runs[muon], target, key), first_reaching(runs[adamw], target, key))
            for key in ("tokens", "seconds")
        )
        rows.append(
            f"| {muon} | {runs[muon]['val'][-1]:.4f} | {target:.4f} | {tokens} | {seconds} | "
            f"{runs[muon]['step_time'] / runs[adamw]['step_time']:.2f}x |"
        )
    return ["", "Muon against AdamW, each +muon variant against its twin:", "", *rows]


def plot(names: list[str], runs: dict[str, dict], out_file: Path) -> None:
    fig, (by_tokens, by_time) = plt.subplots(1, 2, figsize=(14, 5), sharey=True)
    for name in names:
        run = runs[name]
        by_tokens.plot(run["tokens"] / 1e6, run["val"], marker=".", label=name)
        by_time.plot(run["seconds"] / 60, run["val"], marker=".", label=name)
    floor = min(run["val"].min() for run in runs.values())
    by_tokens.set(xlabel="tokens (millions)", ylabel="validation loss (nats/token)", title="Against tokens")
    by_time.set(xlabel="training time (minutes)", title="Against training time")
    by_tokens.set_ylim(floor - 0.05, floor + 1.5)
    for ax in (by_tokens, by_time):
        ax.axhline(runs[names[0]]["val"][-1], color="grey", linestyle="--", linewidth=0.8)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_file, dpi=100)
    plt.close(fig)


def report(args, data_dir: Path, runs: dict[str, dict], seconds: float) -> str:
    shape = SHAPES[args.shape]["train"]
    losses = runs[args.variants[0]]["passes"]
    pass_tokens = shape["val_steps"] * shape["micro_batch_size"] * shape["seq_len"]
    spread = f"{statistics.stdev(losses):.4f}" if len(losses) > 1 else "n/a (one pass)"
    duration = f"{seconds / 60:.1f} minutes for this command" + (", finished runs reused" if args.reuse_runs else "")
    lines = [
        f"python bench/moe_vs_dense.py {' '.join(shlex.quote(a) for a in sys.argv[1:])}".rstrip(),
        "",
        f"{datetime.date.today()}, {platform.node()}, {platform.machine()}, {os.cpu_count()} cores, torch "
        f"{torch.__version__}; {duration}. Data: {data_dir}. Shape {args.shape}: "
        f"{shape['n_layer']} layers x {shape['n_embd']}, {shape['total_batch_size']:,} tokens a step, "
        f"{runs[args.variants[0]]['steps'][-1]} steps, seed {args.seed}.",
        "",
        *table(args.variants, runs),
        *optimizer_table(args.variants, runs),
        "",
        f"Validation noise: the final {args.variants[0]} model's loss over {len(losses)} disjoint validation passes "
        f"of {pass_tokens:,} tokens (one evaluation's) has a standard deviation of {spread} "
        f"(values {', '.join(f'{loss:.4f}' for loss in losses)}; the first pass is the one the runs evaluate on, "
        f"logged as {runs[args.variants[0]]['val'][-1]:.4f}). The difference column is each variant's loss minus "
        f"{args.variants[0]}'s on the same pass, mean ± standard deviation over the passes: the noise of the "
        "differences the table reports, as every run evaluates on the same sequences.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    args.output_dir.mkdir(parents=True, exist_ok=True)
    data_dir = args.data_dir or prepare_offline_corpus(args.output_dir, SHAPES[args.shape]["data"])
    shape = SHAPES[args.shape]["train"]
    runs = {}
    for name in args.variants:
        print(f"training {name}", flush=True)
        runs[name] = read_run(train(name, args, data_dir), shape["total_batch_size"])
    print("validation noise: every final checkpoint on disjoint validation passes", flush=True)
    for name in args.variants:
        runs[name]["passes"] = validation_passes(args.output_dir / name, data_dir, shape)
    text = report(args, data_dir, runs, time.perf_counter() - started)
    (args.output_dir / "moe_vs_dense.md").write_text(text)
    plot(args.variants, runs, args.output_dir / "moe_vs_dense.png")
    print(text)
    print(f"wrote {args.output_dir / 'moe_vs_dense.md'} and {args.output_dir / 'moe_vs_dense.png'}")


if __name__ == "__main__":
    main()
