"""HellaSwag evaluation for any causal LM, standalone or from the training loop.

HellaSwag (Zellers et al. 2019) asks which of four endings continues a context. A causal LM
answers by scoring each ending's tokens given the context; the ending with the lowest loss
wins. Published numbers come in two styles, and they differ (OpenAI GPT-2 124M: acc_norm
0.2955 vs 0.3114), so both are implemented:

- `completion` (build-nanogpt / llm.c): tokens of `ctx`, then of `" " + ending`. `acc` picks
  the lowest summed loss, `acc_norm` the lowest mean loss per ending token.
- `harness` (lm-evaluation-harness's `hellaswag` task): the query is
  `activity_label: ctx_a Ctx_b` and each choice `" " + ending`, all cleaned of WikiHow's
  bracketed markers. `acc` picks the highest summed log-likelihood, `acc_norm` the highest
  log-likelihood per character of the ending.

The validation split (10,042 examples, original jsonl) is downloaded once into
$GPT_MOE_HELLASWAG_DIR (default ~/.cache/gpt_moe/hellaswag), checked against its sha256, or read from --data_file.

    python hellaswag.py --model gpt2 --style harness
    torchrun --nproc_per_node 8 hellaswag.py --model out/checkpoint --trust_remote_code
"""

import argparse
import hashlib
import json
import math
import os
import re
import sys
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

if __package__:  # installed: these modules are the package gpt_moe
    from .command_line import ArgumentParser, replace_file, write_failed
    from .gpt2_tokenizer import get_tokenizer
else:  # a script or module of a clone, whose root is on sys.path
    from command_line import ArgumentParser, replace_file, write_failed
    from gpt2_tokenizer import get_tokenizer

DATA_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
# sha256 of that file (12,246,618 bytes) as TensorFlow Datasets pins it for the same URL (tensorflow/datasets,
# tensorflow_datasets/url_checksums/hellaswag.txt), and as other projects pin it for that file; not computed here
VAL_SHA256 = "0aa3b88843990f3f10a97b9575c94d7b71fb2205240ba04ae4884d9e9c992588"
DATA_DIR_ENV = "GPT_MOE_HELLASWAG_DIR"
VAL_FILE_NAME = "hellaswag_val.jsonl"
VAL_EXAMPLES = 10_042
NUM_ENDINGS = 4
TEXT_FIELDS = ("activity_label", "ctx_a", "ctx_b", "ctx")
STYLES = ("completion", "harness")
DTYPES = ("float32", "bfloat16", "float16")


class HellaSwagError(Exception):
    """A problem the user can fix (missing or malformed data, unloadable model); one line long."""


# -----------------------------------------------------------------------------
# data


def parse_example(line: str) -> dict:
    """One example from a line of the original jsonl; raises ValueError naming the problem."""
    try:
        example = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"invalid JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(example, dict):
        raise ValueError("expected a JSON object")
    missing = [field for field in (*TEXT_FIELDS, "endings", "label") if field not in example]
    if missing:
        raise ValueError(f"missing field(s) {', '.join(missing)}")
    for field in TEXT_FIELDS:
        if not isinstance(example[field], str):
            raise ValueError(f"{field!r} must be a string")
    if not example["ctx"]:
        raise ValueError("'ctx' is empty")
    endings = example["endings"]
    is_list_of_four = isinstance(endings, list) and len(endings) == NUM_ENDINGS
    if not is_list_of_four or not all(isinstance(ending, str) and ending for ending in endings):
        raise ValueError(f"'endings' must be a list of {NUM_ENDINGS} non-empty strings")
    label = example["label"]
    if type(label) is not int or not 0 <= label < NUM_ENDINGS:
        raise ValueError(f"'label' must be an integer from 0 to {NUM_ENDINGS - 1}, got {label!r}")
    return example


def read_examples(path: Path) -> list[dict]:
    """All examples of a jsonl file; a malformed line is reported with its line number."""
    examples = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                examples.append(parse_example(line))
            except ValueError as error:
                raise HellaSwagError(f"{path}, line {line_number}: {error}") from None
    if not examples:
        raise HellaSwagError(f"{path} holds no examples")
    return examples


def read_val_file(path: Path) -> list[dict]:
    """The full validation split, checked to be complete."""
    examples = read_examples(path)
    if len(examples) != VAL_EXAMPLES:
        raise HellaSwagError(
            f"{path} has {len(examples)} examples, expected {VAL_EXAMPLES}: delete it to download it again"
        )
    return examples


def val_file_path() -> Path:
    data_dir = os.environ.get(DATA_DIR_ENV) or Path.home() / ".cache" / "gpt_moe" / "hellaswag"
    return Path(data_dir) / VAL_FILE_NAME


def download_val_file(path: Path) -> None:
    try:
        # read whole (11 MB) before anything is written, so that a fault of the network and one of the disk are told
        # apart
        with urllib.request.urlopen(DATA_URL, timeout=60) as response:
            data = response.read()
    except OSError as error:
        reason = getattr(error, "reason", error)
        raise HellaSwagError(
            f"cannot download {DATA_URL} ({reason}); put {VAL_FILE_NAME} at {path} "
            f"(or set {DATA_DIR_ENV} to its folder), or pass --data_file PATH"
        ) from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != VAL_SHA256:  # checked before anything is written: a wrong file never takes the cached name
        raise HellaSwagError(
            f"downloaded {DATA_URL} has sha256 {digest}, expected {VAL_SHA256}; nothing was written. "
            f"Put a copy of the original {VAL_FILE_NAME} at {path}, or pass --data_file PATH"
        )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        replace_file(path, data)  # an interrupted write never takes the final name; ranks may download side by side
    except OSError as error:
        then = f"rerun, or set {DATA_DIR_ENV} to another folder"
        raise HellaSwagError(write_failed(path, error, "no partial file is left", then)) from None


def load_examples(data_file: str | Path | None = None) -> list[dict]:
    """Validated HellaSwag examples: from data_file (any subset), else the cached validation split.

    Under torch.distributed call it on the main process first (e.g. in
    `accelerator.main_process_first()`), so that only one rank downloads.
    """
    if data_file is not None:
        if not Path(data_file).is_file():
            raise HellaSwagError(f"HellaSwag file {data_file} does not exist")
        return read_examples(Path(data_file))
    path = val_file_path()
    if not path.is_file():
        download_val_file(path)
    return read_val_file(path)


# -----------------------------------------------------------------------------
# rendering: text to token sequences, one per ending


@dataclass
class RenderedExample:
    sequences: list[list[int]]  # context + ending tokens, one sequence per ending
    ending_lengths: list[int]  # how many tokens at the end of each sequence are scored
    norm_lengths: list[int]  # acc_norm divides the summed loss by these
    label: int


def harness_preprocess(text: str) -> str:
    """lm-evaluation-harness's HellaSwag cleaning: WikiHow's `[title]`, `[step]`, ... markers go."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def render_completion(example: dict, tokenizer: PreTrainedTokenizerBase) -> RenderedExample:
    context = _encode(tokenizer, example["ctx"])
    endings = [_encode(tokenizer, " " + ending) for ending in example["endings"]]
    return RenderedExample(
        sequences=[context + ending for ending in endings],
        ending_lengths=[len(ending) for ending in endings],
        norm_lengths=[len(ending) for ending in endings],
        label=example["label"],
    )


def render_harness(example: dict, tokenizer: PreTrainedTokenizerBase) -> RenderedExample:
    query = harness_preprocess(f"{example['activity_label']}: {example['ctx_a']} {example['ctx_b'].capitalize()}")
    choices = [harness_preprocess(ending) for ending in example["endings"]]
    context = _encode(tokenizer, query)
    # like the harness, tokenize query and choice together and keep what follows the query's own
    # tokens, so that the boundary is tokenized as in running text
    endings = [_encode(tokenizer, f"{query} {choice}")[len(context) :] for choice in choices]
    return RenderedExample(
        sequences=[context + ending for ending in endings],
        ending_lengths=[len(ending) for ending in endings],
        norm_lengths=[len(choice) for choice in choices],  # characters, without the leading space
        label=example["label"],
    )


RENDERERS = {"completion": render_completion, "harness": render_harness}


def render_examples(
    examples: list[dict], tokenizer: PreTrainedTokenizerBase, style: str = "completion"
) -> list[RenderedExample]:
    """Token sequences of each example's endings in the given scoring style (see STYLES)."""
    if style not in RENDERERS:
        raise ValueError(f"unknown HellaSwag style {style!r}, expected one of {STYLES}")
    return [RENDERERS[style](example, tokenizer) for example in examples]


# -----------------------------------------------------------------------------
# scoring


@torch.no_grad()
def ending_losses(model: torch.nn.Module, batch: list[RenderedExample]) -> torch.Tensor:
    """Summed cross-entropy of each ending's tokens, (B, NUM_ENDINGS) float32, in one forward pass."""
    rows = [sequence for example in batch for sequence in example.sequences]
    ending_lengths = [length for example in batch for length in example.ending_lengths]
    width = max(len(row) for row in rows)
    # right padding: causal attention keeps the real tokens blind to the pad after them
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
    is_ending = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, (row, ending_length) in enumerate(zip(rows, ending_lengths, strict=True)):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
        is_ending[i, len(row) - ending_length : len(row)] = True
    device = next(model.parameters()).device
    input_ids, attention_mask, is_ending = input_ids.to(device), attention_mask.to(device), is_ending.to(device)

    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits  # (R, T, V)
    # the logits at position t predict token t + 1; only the ending tokens are scored, and only their
    # logits are cast to float32, which keeps memory at (ending tokens, V)
    scored = is_ending[:, 1:]
    token_losses = torch.zeros(scored.shape, device=device)
    token_losses[scored] = F.cross_entropy(logits[:, :-1][scored].float(), input_ids[:, 1:][scored], reduction="none")
    return token_losses.sum(dim=1).view(len(batch), -1)


@dataclass
class HellaSwagResult:
    n: int
    correct: int
    correct_norm: int

    @property
    def acc(self) -> float:
        return self.correct / self.n

    @property
    def acc_norm(self) -> float:
        return self.correct_norm / self.n


def all_reduce_sum(counts: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over the ranks of the default torch.distributed process group."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("world_size > 1 needs an initialised torch.distributed process group or a reduce function")
    dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    return counts


def evaluate(
    model: torch.nn.Module,
    examples: list[RenderedExample],
    batch_size: int = 16,
    rank: int = 0,
    world_size: int = 1,
    reduce: Callable[[torch.Tensor], torch.Tensor] = all_reduce_sum,
    show_progress: bool = False,
) -> HellaSwagResult:
    """Accuracy of a causal LM on rendered examples; with world_size > 1 every rank scores every
    world_size-th example and the counts are summed with `reduce`, so all ranks get the full result.

    Every rank runs the same number of forward passes (a rank that runs out scores a throwaway
    batch), so a sharded (FSDP) model stays in step. Dropout is off during the call.
    """
    shard = examples[rank::world_size]
    device = next(model.parameters()).device
    counts = torch.zeros(3, dtype=torch.long, device=device)  # examples, correct, correct_norm
    was_training = model.training
    model.eval()
    num_batches = math.ceil(math.ceil(len(examples) / world_size) / batch_size)
    for start in tqdm(
        range(0, num_batches * batch_size, batch_size), desc="hellaswag", disable=not show_progress or rank != 0
    ):
        batch = shard[start : start + batch_size]
        if not batch:
            ending_losses(model, examples[:1])
            continue
        losses = ending_losses(model, batch)
        norm_lengths = torch.tensor([example.norm_lengths for example in batch], device=device)
        labels = torch.tensor([example.label for example in batch], device=device)
        # argmin takes the first of equal scores, as the harness's argmax does
        counts[0] += len(batch)
        counts[1] += (losses.argmin(dim=1) == labels).sum()
        counts[2] += ((losses / norm_lengths).argmin(dim=1) == labels).sum()
    model.train(was_training)
    if world_size > 1:
        counts = reduce(counts)
    n, correct, correct_norm = counts.tolist()
    return HellaSwagResult(n=n, correct=correct, correct_norm=correct_norm)


# -----------------------------------------------------------------------------
# command line


def load_model(name: str, dtype: str, device: torch.device, trust_remote_code: bool) -> torch.nn.Module:
    # a missing folder would otherwise be reported as a malformed Hub repo id
    if name.startswith((".", "/", "~")) and not Path(name).expanduser().exists():
        raise HellaSwagError(f"model folder {name} does not exist")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0]
        hint = " (pass --trust_remote_code)" if "trust_remote_code" in str(error) else ""
        raise HellaSwagError(f"cannot load model {name}: {first_line}{hint}") from None
    return model.to(device)


def load_tokenizer(name: str, trust_remote_code: bool) -> PreTrainedTokenizerBase:
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        tokenizer = None
    # for a folder without tokenizer files transformers builds an empty GPT-2 tokenizer rather than failing
    if tokenizer is None or tokenizer.vocab_size == 0:
        print(f"note: {name} has no tokenizer, using the project's GPT-2 tokenizer", file=sys.stderr)
        return get_tokenizer()
    return tokenizer


def init_distributed(device: torch.device) -> tuple[int, int, torch.device]:
    """Rank, world size and device; under torchrun each process joins the group and takes its own GPU."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world_size, device


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(description="HellaSwag validation accuracy of a causal LM.")
    parser.add_argument("--model", required=True, help="Hub name or local folder of an AutoModelForCausalLM")
    parser.add_argument("--data_file", help=f"local HellaSwag jsonl (default: the cached {VAL_FILE_NAME})")
    parser.add_argument("--style", choices=STYLES, default="completion", help="scoring style (see module docstring)")
    parser.add_argument("--limit", type=positive_int, help="score only the first N examples")
    parser.add_argument("--batch_size", type=positive_int, default=16, help="examples per forward pass")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype to load the model in")
    parser.add_argument("--output_json", help="write the scores to this JSON file")
    parser.add_argument("--trust_remote_code", action="store_true", help="allow custom model code (our checkpoints)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rank, world_size, device = init_distributed(torch.device(args.device))
    try:
        examples = load_examples(args.data_file)[: args.limit]
        model = load_model(args.model, args.dtype, device, args.trust_remote_code)
    except HellaSwagError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    tokenizer = load_tokenizer(args.model, args.trust_remote_code)
    rendered = render_examples(examples, tokenizer, args.style)
    result = evaluate(
        model, rendered, batch_size=args.batch_size, rank=rank, world_size=world_size, show_progress=True
    )
    if world_size > 1:
        dist.destroy_process_group()
    if rank != 0:
        return 0
    scores = {"model": args.model, "style": args.style, "n": result.n, "acc": result.acc, "acc_norm": result.acc_norm}
    print(f"hellaswag {args.style}: acc {result.acc:.4f} | acc_norm {result.acc_norm:.4f} | n {result.n}")
    if args.output_json:
        try:
            Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
            replace_file(Path(args.output_json), json.dumps(scores, indent=2) + "\n")  # an earlier file stays whole
        except OSError as error:
            kept, then = "the scores are printed above", "rerun, or pass another --output_json"
            print(f"error: {write_failed(args.output_json, error, kept, then)}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
