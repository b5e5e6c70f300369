"""Pretrain a GPT-2-style Mixture-of-Experts language model with Hugging Face Accelerate.

    accelerate launch --config_file accelerate_configs/multi_gpu.yaml \
        train_accelerate.py --config configs/gpt2_moe_124m.yaml
    python train_accelerate.py --config configs/tiny_cpu.yaml --max_steps 20     # one process, no launcher

It reads like build-nanogpt's train_gpt2.py: set-up, data, model, optimizer, then one loop whose
body evaluates, samples, runs HellaSwag, checkpoints, takes a training step and logs. Every
setting is a field of the two dataclasses below; `--config recipe.yaml` sets any of them and
command-line flags override the recipe.
"""

import difflib
import json
import math
import os
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, make_dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
import yaml
from accelerate import Accelerator
from accelerate.tracking import get_available_trackers
from accelerate.utils import DistributedType, LoggerType, set_seed
from torch import nn
from transformers import HfArgumentParser, PreTrainedTokenizerBase
from transformers.utils.logging import disable_progress_bar

if __package__:  # installed: these modules are the package gpt_moe
    from . import hellaswag
    from .checkpointing import (
        Checkpointer,
        CheckpointError,
        WriteError,
        list_checkpoints,
        resolve_checkpoint,
        what_was_kept,
        write_together,
    )
    from .command_line import replace_file
    from .configuration_gpt_moe import GPTMoEConfig
    from .cpu_memory import keep_freed_memory
    from .fineweb_shards import ShardError, ShardLoader, validation_loader
    from .gpt2_tokenizer import EOT_ID, get_tokenizer
    from .modeling_gpt_moe import GPTMoEForCausalLM, assignment_counts
    from .muon import muon_with_adamw
    from .training_metrics import (
        ExpertLoad,
        active_parameters,
        expert_load,
        flops_per_token,
        peak_flops,
        router_statistics,
    )
    from .training_plots import plot_expert_load, plot_losses
else:  # a script or module of a clone, whose root is on sys.path
    import hellaswag
    from checkpointing import (
        Checkpointer,
        CheckpointError,
        WriteError,
        list_checkpoints,
        resolve_checkpoint,
        what_was_kept,
        write_together,
    )
    from command_line import replace_file
    from configuration_gpt_moe import GPTMoEConfig
    from cpu_memory import keep_freed_memory
    from fineweb_shards import ShardError, ShardLoader, validation_loader
    from gpt2_tokenizer import EOT_ID, get_tokenizer
    from modeling_gpt_moe import GPTMoEForCausalLM, assignment_counts
    from muon import muon_with_adamw
    from training_metrics import (
        ExpertLoad,
        active_parameters,
        expert_load,
        flops_per_token,
        peak_flops,
        router_statistics,
    )
    from training_plots import plot_expert_load, plot_losses

SAMPLE_PROMPT = "Hello, I'm a language model,"
SAMPLE_TOKENS = 32
USAGE = "accelerate launch [launcher flags] train_accelerate.py [--config RECIPE.yaml] [--flag value ...]"

# -----------------------------------------------------------------------------
# arguments

ModelArguments = make_dataclass(
    "ModelArguments",
    [
        (name, annotation, field(default=getattr(GPTMoEConfig, name), metadata={"help": f"GPTMoEConfig.{name}"}))
        for name, annotation in GPTMoEConfig.__annotations__.items()
    ],
)
ModelArguments.__doc__ = "Every field of GPTMoEConfig, with the config's own default (GPT-2 small, 8 experts, top-2)."
ModelArguments._argument_group_name = "model: the fields of GPTMoEConfig (see configuration_gpt_moe.py)"


def arg(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainArguments:
    """How to train. The defaults are build-nanogpt's GPT-2 124M run (configs/gpt2_moe_124m.yaml)."""

    _argument_group_name = "training"

    config: str | None = arg(None, "YAML recipe of argument values; command-line flags override it")
    data_dir: str = arg("edu_fineweb10B", "folder of train/val token shards (prepare_fineweb.py)")
    output_dir: str = arg("log", "log.txt, plots and model_<step> checkpoints go here")
    total_batch_size: int = arg(524288, "tokens per optimizer step, over all processes")
    micro_batch_size: int = arg(16, "sequences per forward pass and process")
    seq_len: int = arg(1024, "tokens per sequence")
    max_steps: int = arg(19073, "optimizer steps")
    warmup_steps: int = arg(715, "linear LR warmup steps")
    max_lr: float = arg(6e-4, "peak learning rate")
    min_lr: float = arg(6e-5, "learning rate at the end of the cosine decay")
    weight_decay: float = arg(0.1, "decoupled weight decay of the weight matrices (AdamW's and Muon's)")
    optimizer: Literal["adamw", "muon"] = arg(
        "adamw", "muon: Muon for the blocks' weight matrices and experts, AdamW for the rest, same lr (muon.py)"
    )
    grad_clip: float = arg(1.0, "clip the global gradient norm to this")
    mixed_precision: Literal["bf16", "no"] = arg("bf16", "bf16 autocast, or no for float32 throughout")
    eval_interval: int = arg(250, "validation loss and expert load every N steps (0: only at the end)")
    val_steps: int = arg(20, "validation batches per process")
    hellaswag_interval: int = arg(250, "HellaSwag every N steps (0: never)")
    hellaswag_file: str | None = arg(None, "HellaSwag jsonl (default: the cached validation split, if present)")
    sample_interval: int = arg(250, "print samples every N steps (0: only at the end)")
    save_interval: int = arg(5000, "checkpoint every N steps (0: only at the end)")
    save_total_limit: int | None = arg(None, "keep only the newest N checkpoints")
    resume_from_checkpoint: str | None = arg(None, "a model_<step> folder, or 'latest' in output_dir")
    compile: bool = arg(False, "torch.compile the training forward (evaluation and sampling stay eager)")
    experts_implementation: Literal["auto", "eager", "grouped_mm", "batched_mm"] = arg(
        "auto", "MoE expert kernels; auto: grouped_mm on GPU, eager on CPU"
    )
    shuffle: bool = arg(
        False, "shuffle shard and batch order every epoch; validation then reads sequences from all over its split"
    )
    seed: int = arg(1337, "seed of the initialisation, the data order and the samples")
    max_nonfinite_steps: int = arg(3, "stop (with a checkpoint) after this many non-finite steps in a row")
    peak_tflops: float | None = arg(None, "peak TFLOP/s of one device for MFU (default: known GPUs, n/a on CPU)")
    report_to: str = arg("none", "comma-separated trackers: tensorboard, wandb, trackio, ... or none")
    push_to_hub: bool = arg(False, "upload each checkpoint to --hub_model_id in the background")
    hub_model_id: str | None = arg(None, "Hub repo (user/name) for --push_to_hub")

    @property
    def trackers(self) -> list[str]:
        return [name.strip() for name in self.report_to.split(",") if name.strip() not in ("", "none")]


class TrainingError(Exception):
    """A problem the user can fix; reported as one line, without a traceback."""


class ArgumentParser(HfArgumentParser):
    """HfArgumentParser whose mistakes are TrainingErrors, one line like every other (argparse prints a usage block
    and exits 2; HfArgumentParser raises a ValueError, a traceback, for an unknown flag)."""

    def error(self, message: str):
        raise TrainingError(message)

    def parse(self, argv: list[str]) -> tuple:
        """(ModelArguments, TrainArguments); an unknown flag is an error naming it, and the closest known one."""
        *dataclasses, unknown = self.parse_args_into_dataclasses(
            argv, return_remaining_strings=True, look_for_args_file=False
        )
        if unknown:
            flags = [action.option_strings[0] for action in self._actions if action.option_strings]
            flag = next((word for word in unknown if word.startswith("-")), unknown[0])
            self.error(f"unknown flag {flag}{did_you_mean(flag, flags)}; run with --help for the list")
        return tuple(dataclasses)


def did_you_mean(name: str, known) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def parse_arguments(argv: list[str] | None = None) -> tuple:
    """(ModelArguments, TrainArguments) from a YAML recipe (--config) overridden by command-line flags."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = ArgumentParser((ModelArguments, TrainArguments), usage=USAGE, description=__doc__.split("\n\n")[0])
    recipe = parser.parse_known_args(argv)[0].config
    if recipe:
        known = {f.name for dataclass_type in (ModelArguments, TrainArguments) for f in fields(dataclass_type)}
        recipe_argv = recipe_flags(read_recipe(recipe, known - {"config"}))
        try:  # the recipe's values alone, so that a wrong one is reported with the file's name
            parser.parse(recipe_argv)
        except TrainingError as error:
            raise TrainingError(f"{recipe}: {error}") from None
        argv = recipe_argv + argv  # later flags win
    model_args, args = parser.parse(argv)
    check_arguments(model_args, args)
    return model_args, args


def read_recipe(path: str, known: set[str]) -> dict:
    try:
        values = yaml.safe_load(Path(path).read_text())
    except OSError as error:
        raise TrainingError(f"cannot read config file {path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise TrainingError(f"{path} is not valid YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise TrainingError(f"{path} must be a mapping of argument names to values")
    for key in values:
        if key not in known:
            hint = did_you_mean(str(key), known)
            raise TrainingError(f"{path}: unknown key '{key}'{hint}; run with --help for the list")
    return values


def recipe_flags(values: dict) -> list[str]:
    """A recipe as command-line flags, so the parser checks its types exactly as it checks the command line."""
    flags = []
    for key, value in values.items():
        if value is None or value == []:
            continue  # the default (None, no layers) already means unset
        flags += [f"--{key}", *map(str, value)] if isinstance(value, list) else [f"--{key}", str(value)]
    return flags


def check_arguments(model_args, args: TrainArguments) -> None:
    if args.seq_len > model_args.block_size:
        raise TrainingError(f"seq_len {args.seq_len} exceeds the model's block_size {model_args.block_size}")
    if args.push_to_hub and not args.hub_model_id:
        raise TrainingError("--push_to_hub needs --hub_model_id user/name")
    known = set(LoggerType.list()) - {"all"}
    for name in args.trackers:
        if name not in known:
            raise TrainingError(f"--report_to: unknown tracker '{name}'; choose from {', '.join(sorted(known))}")
        if name not in get_available_trackers():
            raise TrainingError(f"--report_to {name}: the package is not installed (pip install {name})")
    if min(args.max_steps, args.val_steps, args.micro_batch_size, args.seq_len, args.max_nonfinite_steps) < 1:
        raise TrainingError("max_steps, val_steps, micro_batch_size, seq_len and max_nonfinite_steps must be >= 1")


def gradient_accumulation_steps(args: TrainArguments, world_size: int) -> int:
    """Micro-steps per optimizer step, so that each step sees total_batch_size tokens."""
    per_micro_step = args.micro_batch_size * args.seq_len * world_size
    if args.total_batch_size % per_micro_step:
        nearest = max(1, round(args.total_batch_size / per_micro_step)) * per_micro_step
        raise TrainingError(
            f"total_batch_size {args.total_batch_size} is not a multiple of micro_batch_size * seq_len * processes "
            f"= {args.micro_batch_size} * {args.seq_len} * {world_size} = {per_micro_step}: "
            f"set --total_batch_size to a multiple of it (e.g. {nearest}) or change --micro_batch_size or --seq_len"
        )
    return args.total_batch_size // per_micro_step


def get_lr(step: int, args: TrainArguments) -> float:
    """Linear warmup to max_lr, then cosine decay to min_lr at max_steps (build-nanogpt)."""
    if step < args.warmup_steps:
        return args.max_lr * (step + 1) / args.warmup_steps
    if step >= args.max_steps:
        return args.min_lr
    progress = (step - args.warmup_steps) / (args.max_steps - args.warmup_steps)
    return args.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (args.max_lr - args.min_lr)


def is_due(step: int, interval: int, last_step: bool) -> bool:
    return last_step or (interval > 0 and step % interval == 0)


# -----------------------------------------------------------------------------
# set-up


def build_accelerator(args: TrainArguments) -> Accelerator:
    accelerator = Accelerator(
        # without cpu=True, `accelerate launch --multi_gpu` on a CPU machine starts N unsynchronised rank-0 runs
        cpu=not torch.cuda.is_available(),
        mixed_precision=args.mixed_precision,
        dynamo_backend="no",  # --compile alone decides what is compiled: the training forward
        log_with=args.trackers or None,
        project_dir=args.output_dir,
    )
    launched = int(os.environ.get("WORLD_SIZE", 1))
    if accelerator.num_processes != launched:
        raise TrainingError(
            f"{launched} processes were launched but Accelerate sees {accelerator.num_processes}: on CPU launch with "
            "`accelerate launch --multi_gpu --num_processes N` (accelerate_configs/cpu_2proc.yaml) or torchrun"
        )
    # Newton-Schulz orthogonalises whole matrices; FSDP2 holds a shard of rows of each (a DTensor) and ZeRO flat
    # slices of all. Gathering each matrix in the step would serve FSDP2, but nothing here can test it: refused.
    kind = accelerator.distributed_type
    if args.optimizer == "muon" and kind in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise TrainingError(
            f"--optimizer muon needs every weight matrix whole on each process, and {kind.value} shards them: "
            "launch with DDP (accelerate_configs/multi_gpu.yaml) or use --optimizer adamw"
        )
    return accelerator


def build_model(model_args, args: TrainArguments, device: torch.device) -> GPTMoEForCausalLM:
    try:
        config = GPTMoEConfig(**asdict(model_args))
    except ValueError as error:
        raise TrainingError(str(error)) from None
    model = GPTMoEForCausalLM(config)
    implementation = args.experts_implementation
    if implementation == "auto":
        # grouped GEMMs are the fast path on GPUs; on CPU the per-expert loop is faster
        implementation = "grouped_mm" if device.type == "cuda" else "eager"
    model.set_experts_implementation(implementation)
    return model


def configure_optimizer(model: nn.Module, args: TrainArguments, device: torch.device) -> torch.optim.Optimizer:
    """AdamW, decaying the weight matrices only (nanoGPT: tensors of 2+ dims). With --optimizer muon,
    the blocks' hidden matrices (is_hidden_matrix) go to Muon instead, at the same lr and weight decay.

    The experts' 3D weights (E, out, in) are a stack of matrices and decay like the dense MLP
    they replace. Biases and LayerNorm parameters do not decay, including the experts' stacked
    biases, which are 2-D (E, out) but biases all the same.
    """
    matrices, decay, no_decay = [], [], []
    for name, param in model.named_parameters():
        if args.optimizer == "muon" and is_hidden_matrix(name, param):
            matrices.append(param)
        else:
            (decay if param.dim() >= 2 and not name.endswith("bias") else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused kernels exist for CUDA and CPU (9x faster than the default loop on CPU)
    fused = device.type in ("cuda", "cpu")
    adamw = torch.optim.AdamW(groups, lr=args.max_lr, betas=(0.9, 0.95), eps=1e-8, fused=fused)
    return muon_with_adamw(matrices, adamw, lr=args.max_lr, weight_decay=args.weight_decay) if matrices else adamw


def is_hidden_matrix(name: str, param: nn.Parameter) -> bool:
    """What Muon updates: the weight matrices inside the blocks (attention, MLP, shared experts) and the experts'
    (E, out, in) stacks. Not the embeddings nor the tied output layer (modded-nanogpt, Moonlight), nor the router:
    like the output layer it maps hidden states to logits, here over a handful of experts."""
    in_block = name.startswith("transformer.h.")
    return in_block and param.dim() >= 2 and not name.endswith("bias") and ".router." not in name


def load_hellaswag(
    args: TrainArguments, tokenizer: PreTrainedTokenizerBase, block_size: int, log
) -> list[hellaswag.RenderedExample] | None:
    """HellaSwag examples rendered once, or None (with one line saying why) when it is off or has no data."""
    if args.hellaswag_interval == 0:
        return None
    path = Path(args.hellaswag_file) if args.hellaswag_file else hellaswag.val_file_path()
    if not path.is_file() and not args.hellaswag_file:
        log(f"HellaSwag skipped: no data at {path} (`python -c 'import hellaswag; hellaswag.load_examples()'`)")
        return None
    # the cached split is checked to be whole (a file given by flag may be any subset)
    examples = hellaswag.render_examples(hellaswag.load_examples(args.hellaswag_file), tokenizer)
    longest = max(len(sequence) for example in examples for sequence in example.sequences)
    if longest > block_size:
        log(f"HellaSwag skipped: its examples need {longest} positions, the model has block_size {block_size}")
        return None
    return examples


def install_stop_handlers(accelerator: Accelerator, log) -> None:
    """SIGTERM (preemption) and a first Ctrl-C make the loop save a checkpoint and stop after the
    current step; a second Ctrl-C interrupts at once."""
    requested = False

    def request_stop(signum: int, frame) -> None:
        nonlocal requested
        if requested:
            if signum == signal.SIGINT:  # a second Ctrl-C: stop now
                raise KeyboardInterrupt
            return  # e.g. the launcher passing a Ctrl-C on as SIGTERM
        requested = True
        accelerator.set_trigger()
        log(f"{signal.Signals(signum).name}: saving a checkpoint and stopping after this step")

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)


class RunLog:
    """Where results go: the console, log.txt (build-nanogpt's `<step> <stream> <value>` lines),
    expert_load.jsonl, the trackers and the plots. Only the main process writes.

    An output_dir that cannot be written stops the run at the start. Later, a record or plot that cannot be written
    is a warning and the run goes on to the checkpoint due at that step, which is saved, or fails in turn and stops
    the run naming the last complete one. A checkpoint is the run's state, and losing one costs the steps since the
    one before; the reports lose nothing that matters: plots are redrawn from the logs at every evaluation, and the
    console and the trackers hold every record.
    """

    def __init__(self, accelerator: Accelerator, output_dir: str):
        self.accelerator = accelerator
        self.dir = Path(output_dir)
        self.log_file, self.load_file = self.dir / "log.txt", self.dir / "expert_load.jsonl"
        self.metrics: dict[str, float] = {}  # the latest value of each stream, for the model card

    def start(self, step: int, config: dict) -> None:
        """Drop the records of `step` and later left by an earlier run (all of them when starting afresh), so a
        resumed run continues the files where its checkpoint was taken, and open the trackers."""
        write_together(self.accelerator, lambda: self.keep_records_before(step), self.dir, self.dir)
        # trackers take int, float, str and bool values only
        self.accelerator.init_trackers(
            "gpt-moe", {k: v if type(v) in (bool, int, float, str) else str(v) for k, v in config.items()}
        )

    def keep_records_before(self, step: int) -> None:
        if not self.accelerator.is_main_process:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        # log.txt is written even when new: an output_dir that cannot be written stops the run now, not at its first
        # checkpoint hours later
        replace_file(self.log_file, records_before(self.log_file, step))
        if self.load_file.exists():
            replace_file(self.load_file, records_before(self.load_file, step))

    def print(self, message: str) -> None:
        self.accelerator.print(message, flush=True)

    def record(self, step: int, stream: str, value: float, fmt: str = ".6f", echo: bool = True) -> None:
        if echo:
            self.print(f"step {step:5d} | {stream} {value:{fmt}}")
        self.metrics[stream] = value
        self.accelerator.log({stream: value}, step=step)
        if self.accelerator.is_main_process:
            self.append(self.log_file, step, f"{step} {stream} {value:{fmt}}\n")

    def record_expert_load(self, step: int, layers: list[int], loads: list[ExpertLoad]) -> None:
        if not loads:
            return  # a dense model
        records = [{"layer": layer, **asdict(load)} for layer, load in zip(layers, loads, strict=True)]
        for record in records:
            self.print(
                f"  layer {record['layer']:2d} expert load: max/mean {record['max_over_mean']:.3f} | "
                f"router entropy {record['router_entropy']:.3f} nats | "
                + " ".join(f"{fraction:.3f}" for fraction in record["fractions"])
            )
            self.accelerator.log(
                {
                    f"moe/layer{record['layer']}_max_over_mean": record["max_over_mean"],
                    f"moe/layer{record['layer']}_router_entropy": record["router_entropy"],
                },
                step=step,
            )
        if self.accelerator.is_main_process:
            self.append(self.load_file, step, json.dumps({"step": step, "layers": records}) + "\n")

    def append(self, path: Path, step: int, line: str) -> None:
        try:
            append_whole(path, line)
        except OSError as error:
            self.print(f"warning: cannot write {path}: {error.strerror}; its record of step {step} is only printed")

    def plot(self) -> None:
        if self.accelerator.is_main_process:
            self.draw(plot_losses, self.log_file, self.dir / "loss.png")
            if self.load_file.exists() and self.load_file.stat().st_size:
                self.draw(plot_expert_load, self.load_file, self.dir / "expert_load.png")

    def draw(self, plot, source: Path, image: Path) -> None:
        try:
            plot(source, image)
        except OSError as error:
            self.print(f"warning: cannot write {image}: {error.strerror}; it is drawn again at the next evaluation")


def records_before(path: Path, step: int) -> str:
    """The lines of log.txt or expert_load.jsonl that record steps before `step` ("" when it does not exist)."""
    lines = path.read_text().splitlines(True) if path.exists() else []
    return "".join(line for line in lines if record_step(line) < step)


def append_whole(path: Path, line: str) -> None:
    """Append `line` whole or not at all: a line cut short by a full disk would make the file unreadable."""
    with open(path, "ab", buffering=0) as f:
        end = f.tell()
        data = memoryview(line.encode())
        try:
            while data:  # a write may take part of the data; the next one then raises the cause
                data = data[f.write(data) :]
        except OSError:
            f.truncate(end)
            raise


def record_step(line: str) -> int:
    """The step of a log.txt or expert_load.jsonl line."""
    return int(line.split()[0]) if line[0].isdigit() else json.loads(line)["step"]


# -----------------------------------------------------------------------------
# the stages of the loop


@contextmanager
def eval_mode(model: nn.Module):
    model.eval()
    try:
        yield
    finally:
        model.train()


@torch.no_grad()
def evaluate(model: nn.Module, val_loader: ShardLoader, args: TrainArguments, accelerator: Accelerator):
    """Validation cross-entropy over a fresh pass of val_steps batches per process (mean over processes),
    and the expert load of each MoE layer on those tokens."""
    unwrapped = accelerator.unwrap_model(model)
    top_k, routers = unwrapped.config.num_experts_per_tok, unwrapped.routers()
    val_loader.reset()
    loss_sum, router_sums = torch.zeros((), device=accelerator.device), 0
    with eval_mode(model):
        for _ in range(args.val_steps):
            x, y = (t.to(accelerator.device) for t in val_loader.next_batch())
            out = model(input_ids=x, output_router_logits=True, use_cache=False)
            loss_sum += F.cross_entropy(out.logits.flatten(0, 1).float(), y.flatten())
            if out.router_logits is not None:
                assignments = assignment_counts(out.router_logits, routers, token_mask=None)
                router_sums = router_sums + router_statistics(out.router_logits, assignments)
    val_loss = accelerator.reduce(loss_sum / args.val_steps, "mean").item()
    loads = expert_load(accelerator.reduce(router_sums, "sum"), top_k) if torch.is_tensor(router_sums) else []
    return val_loss, loads


@torch.no_grad()
def generate_samples(model: nn.Module, tokenizer: PreTrainedTokenizerBase, seed: int) -> list[str]:
    """Four 32-token continuations of a fixed prompt (top-k 50) from a fixed seed, comparable across steps
    (fewer tokens when the model's block_size is smaller). The global RNG is restored afterwards, so
    sampling does not change the training run."""
    device = next(model.parameters()).device
    prompt = tokenizer(SAMPLE_PROMPT, return_tensors="pt").to(device)
    max_new_tokens = min(SAMPLE_TOKENS, model.config.block_size - prompt["input_ids"].shape[1])
    with eval_mode(model), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        tokens = model.generate(
            **prompt,
            max_new_tokens=max_new_tokens,
            do_sample=True,
            top_k=50,
            num_return_sequences=4,
            pad_token_id=EOT_ID,
        )
    return tokenizer.batch_decode(tokens)


def run_hellaswag(model: nn.Module, examples: list, batch_size: int, accelerator: Accelerator) -> float:
    """HellaSwag acc_norm, each process scoring every world_size-th example."""
    result = hellaswag.evaluate(
        model,
        examples,
        batch_size=batch_size,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        reduce=lambda counts: accelerator.reduce(counts, "sum"),
    )
    return result.acc_norm


@dataclass
class StepResult:
    loss: float  # cross-entropy, what log.txt records (comparable with dense models and val loss)
    aux_loss: float  # load-balancing loss, unweighted (1.0 at perfect balance; 0 for dense models)
    grad_norm: float
    finite: bool  # False: the update was skipped


def loss_parts(out, config: GPTMoEConfig) -> torch.Tensor:
    """(optimised loss, cross-entropy, aux loss) of one forward pass, detached."""
    total = out.loss.detach()
    if out.aux_loss is None:
        return torch.stack([total, total, torch.zeros_like(total)])
    aux_loss, z_loss = out.aux_loss.detach(), out.z_loss.detach()
    router_terms = config.router_aux_loss_coef * aux_loss + config.router_z_loss_coef * z_loss
    return torch.stack([total, total - router_terms, aux_loss])


def train_step(
    model: nn.Module,
    forward: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_loader: ShardLoader,
    lr: float,
    args: TrainArguments,
    accelerator: Accelerator,
) -> StepResult:
    """One optimizer step over gradient_accumulation_steps micro-batches per process. A non-finite
    loss or gradient norm (the same on every process after the all-reduce) skips the update."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    config = accelerator.unwrap_model(model).config
    sums = torch.zeros(3, device=accelerator.device)
    for _ in range(accelerator.gradient_accumulation_steps):
        x, y = (t.to(accelerator.device, non_blocking=True) for t in train_loader.next_batch())
        # accumulate() skips the gradient all-reduce on all but the last micro-step, and backward()
        # divides the loss by the number of micro-steps
        with accelerator.accumulate(model):
            out = forward(input_ids=x, shift_labels=y, use_cache=False)
            accelerator.backward(out.loss)
        sums += loss_parts(out, config)
    total, loss, aux_loss = accelerator.reduce(sums / accelerator.gradient_accumulation_steps, "mean").tolist()
    grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), args.grad_clip))
    finite = math.isfinite(total) and math.isfinite(grad_norm)
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    # the aux-loss-free bias moves with this step's expert load over all processes; the next step counts afresh
    accelerator.unwrap_model(model).finish_step(update_bias=finite)
    return StepResult(loss=loss, aux_loss=aux_loss, grad_norm=grad_norm, finite=finite)


def log_step(
    run_log: RunLog,
    step: int,
    result: StepResult,
    lr: float,
    dt: float,
    tokens_per_step: int,
    ideal_step_time: float | None,
) -> None:
    """The step's console line, its log.txt record and its tracker values.

    ideal_step_time: the step's FLOPs over the peak FLOP/s of all devices (None: peak unknown), so MFU = it / dt.
    """
    tokens_per_sec = tokens_per_step / dt
    mfu = f"{ideal_step_time / dt:.1%}" if ideal_step_time else "n/a"
    memory = f" | mem {torch.cuda.max_memory_allocated() / 2**30:.1f}GiB" if torch.cuda.is_available() else ""
    run_log.print(
        f"step {step:5d} | loss {result.loss:.6f} | aux {result.aux_loss:.4f} | lr {lr:.4e} | "
        f"norm {result.grad_norm:.4f} | dt {dt * 1000:.2f}ms | tok/sec {tokens_per_sec:,.0f} | mfu {mfu}{memory}"
    )
    if result.finite:
        run_log.record(step, "train", result.loss, echo=False)  # the line above has it
    else:
        run_log.print(f"step {step}: non-finite loss or gradient norm, update skipped")
    stats = {"train/aux_loss": result.aux_loss, "train/lr": lr, "train/grad_norm": result.grad_norm}
    run_log.accelerator.log({**stats, "perf/tokens_per_sec": tokens_per_sec}, step=step)


def resume(checkpointer: Checkpointer, args: TrainArguments, log) -> int:
    """The step to start from: 0, or the step of the checkpoint --resume_from_checkpoint names."""
    if args.resume_from_checkpoint is None:
        if list_checkpoints(args.output_dir):
            raise TrainingError(
                f"{args.output_dir} holds checkpoints of an earlier run: continue it with "
                "--resume_from_checkpoint latest, or choose another --output_dir"
            )
        return 0
    path = resolve_checkpoint(args.output_dir, args.resume_from_checkpoint)
    if path is None:
        log(f"no checkpoint in {args.output_dir} yet: starting from step 0")
        return 0
    return checkpointer.restore(path)


# -----------------------------------------------------------------------------
# the run


def train(model_args, args: TrainArguments, accelerator: Accelerator) -> None:
    # set-up
    accelerator.gradient_accumulation_steps = gradient_accumulation_steps(args, accelerator.num_processes)
    device, world_size = accelerator.device, accelerator.num_processes
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for the float32 matmuls outside autocast
    run_log = RunLog(accelerator, args.output_dir)
    if device.type == "cpu" and keep_freed_memory():
        run_log.print("CPU: glibc keeps freed memory for reuse (cpu_memory.py) instead of unmapping it every step")
    run_log.print(
        f"total batch {args.total_batch_size:,} tokens = {args.micro_batch_size} sequences x {args.seq_len} tokens "
        f"x {world_size} processes x {accelerator.gradient_accumulation_steps} accumulation steps"
    )

    # data
    shards = dict(batch_size=args.micro_batch_size, seq_len=args.seq_len, rank=accelerator.process_index)
    shards.update(world_size=world_size, vocab_size=model_args.vocab_size)
    train_loader = ShardLoader(args.data_dir, "train", seed=args.seed, shuffle=args.shuffle, **shards)
    val_loader = validation_loader(args.data_dir, args.shuffle, **shards)

    # model
    set_seed(args.seed)  # the same initialisation on every process
    model = build_model(model_args, args, device)
    moe_layers = [i for i in range(model.config.n_layer) if model.config.is_moe_layer(i)]
    tokenizer = get_tokenizer()
    hellaswag_examples = load_hellaswag(args, tokenizer, model.config.block_size, run_log.print)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(device)
    step_flops = flops_per_token(model, args.seq_len) * args.total_batch_size
    ideal_step_time = step_flops / (peak * world_size) if peak else None  # MFU = ideal_step_time / dt
    run_log.print(
        f"{sum(p.numel() for p in model.parameters()):,} parameters, {active_parameters(model):,.0f} active per token"
    )

    # optimizer
    optimizer = configure_optimizer(model, args, device)
    if accelerator.state.deepspeed_plugin is not None:
        # no DataLoader goes through prepare(), so DeepSpeed learns the micro-batch size and clipping here
        accelerator.state.deepspeed_plugin.deepspeed_config.update(
            train_micro_batch_size_per_gpu=args.micro_batch_size, gradient_clipping=args.grad_clip
        )
    model, optimizer = accelerator.prepare(model, optimizer)
    forward = torch.compile(model) if args.compile else model
    unwrapped = accelerator.unwrap_model(model)  # for generate() and HellaSwag: no DDP wrapper, never compiled

    # checkpoints and logs
    config = {**asdict(model_args), **asdict(args)}
    checkpointer = Checkpointer(accelerator, model, tokenizer, train_loader, config, run_log.print)
    try:
        start_step = resume(checkpointer, args, run_log.print)
        run_log.start(start_step, config)
        install_stop_handlers(accelerator, run_log.print)
        nonfinite_in_a_row = 0

        for step in range(start_step, args.max_steps + 1):
            last_step = step == args.max_steps
            evaluate_now = is_due(step, args.eval_interval, last_step)
            hellaswag_now = hellaswag_examples is not None and is_due(step, args.hellaswag_interval, last_step)
            if evaluate_now:
                val_loss, loads = evaluate(model, val_loader, args, accelerator)
                run_log.record(step, "val", val_loss, ".4f")
                run_log.record_expert_load(step, moe_layers, loads)
            if hellaswag_now:
                acc_norm = run_hellaswag(unwrapped, hellaswag_examples, args.micro_batch_size, accelerator)
                run_log.record(step, "hella", acc_norm, ".4f")
            if evaluate_now or hellaswag_now:
                run_log.plot()
            if is_due(step, args.sample_interval, last_step):
                for i, text in enumerate(generate_samples(unwrapped, tokenizer, args.seed)):
                    run_log.print(f"sample {i}: {text}")
            # after the records and plots of this step: one of those that could not be written was a warning (RunLog)
            if step > start_step and is_due(step, args.save_interval, last_step):
                checkpointer.save(step, run_log.metrics)
            if last_step:
                break

            t0 = time.time()
            lr = get_lr(step, args)
            result = train_step(model, forward, optimizer, train_loader, lr, args, accelerator)
            log_step(run_log, step, result, lr, time.time() - t0, args.total_batch_size, ideal_step_time)

            nonfinite_in_a_row = 0 if result.finite else nonfinite_in_a_row + 1
            if nonfinite_in_a_row == args.max_nonfinite_steps:
                path = checkpointer.save(step + 1, run_log.metrics)
                raise TrainingError(
                    f"{nonfinite_in_a_row} steps in a row with a non-finite loss or gradient norm (the last: step "
                    f"{step}); saved {path} and stopped. Lower --max_lr, check the data or try --mixed_precision no"
                )
            if accelerator.check_trigger():  # SIGTERM or Ctrl-C on any process
                checkpointer.save(step + 1, run_log.metrics)
                break
    finally:
        checkpointer.close()


def main(argv: list[str] | None = None) -> int:
    disable_progress_bar()  # the log is one line per event; no "Writing model shards" bars
    try:
        model_args, args = parse_arguments(argv)
        accelerator = build_accelerator(args)
    except TrainingError as error:
        return report(error)
    # an error is reported before end_training() ends the process group, which waits for the other processes
    try:
        train(model_args, args, accelerator)
    except (TrainingError, CheckpointError, WriteError, ShardError, hellaswag.HellaSwagError) as error:
        return report(error)
    except torch.OutOfMemoryError:
        # nothing is saved: the step stopped part-way, its batches read and its gradients partly summed
        return report(out_of_memory(args))
    finally:
        accelerator.end_training()
    return 0


def report(error) -> int:
    """Print an error as one line on stderr, prefixed with the process's rank when there are several (each process
    reports its own); returns the exit status, 1."""
    rank = f"[rank {os.environ.get('RANK', 0)}] " if int(os.environ.get("WORLD_SIZE", 1)) > 1 else ""
    # one write, newline included: processes sharing a terminal or pipe then never cut into each other's lines
    sys.stderr.write(f"{rank}error: {error}\n")
    sys.stderr.flush()
    return 1


def out_of_memory(args: TrainArguments) -> str:
    kept, then = what_was_kept(args.output_dir)
    return (
        f"out of GPU memory with --micro_batch_size {args.micro_batch_size} sequences of --seq_len {args.seq_len} "
        f"tokens per forward pass; {kept}: lower --micro_batch_size (gradient accumulation takes more micro-steps "
        f"and keeps --total_batch_size {args.total_batch_size}) and {then}"
    )


if __name__ == "__main__":
    sys.exit(main())
