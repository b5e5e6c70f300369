"""Generate text from a checkpoint of train_accelerate.py, loaded the way a Hub user loads it.

python sample.py log/model_19073
python sample.py user/gpt-moe-124m --prompt "The history of" --num_samples 2 --max_new_tokens 64
"""

import argparse
import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils.logging import disable_progress_bar


class ArgumentParser(argparse.ArgumentParser):
    """A mistake in the flags is one line and exit status 1, as in the other tools (command_line.py; this script
    imports nothing of the repository, so that a copy of it runs anywhere)."""

    def error(self, message: str):
        self.exit(1, f"{self.prog}: error: {message}; run with --help for the flags\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a checkpoint folder (log/model_<step>) or a Hub repo id")
    parser.add_argument("--prompt", default="Hello, I'm a language model,")
    parser.add_argument("--num_samples", type=int, default=4)
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--top_k", type=int, default=50)
    parser.add_argument("--seed", type=int, default=42)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    disable_progress_bar()  # no "Loading weights" bar between the command and its samples
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        # the checkpoint carries its own modeling code (config.json's auto_map), hence trust_remote_code
        tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=True)
        model = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=True).to(device).eval()
    except (OSError, ValueError) as error:
        print(f"error: cannot load {args.model}: {str(error).strip().splitlines()[0]}", file=sys.stderr)
        return 1
    inputs = tokenizer(args.prompt, return_tensors="pt").to(device)
    # the model has no positions beyond its block_size
    room = model.config.max_position_embeddings - inputs["input_ids"].shape[1]
    torch.manual_seed(args.seed)
    outputs = model.generate(
        **inputs,
        max_new_tokens=min(args.max_new_tokens, room),
        do_sample=True,
        top_k=args.top_k,
        num_return_sequences=args.num_samples,
        pad_token_id=tokenizer.eos_token_id,
    )
    try:
        for i, text in enumerate(tokenizer.batch_decode(outputs, skip_special_tokens=True)):
            print(f"sample {i}: {text}")
        sys.stdout.flush()  # stdout redirected to a full disk fails here, not after main() has returned
    except OSError as error:
        # what is still buffered would fail again in the flush at exit, with Python's "Exception ignored" message
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        print(
            f"error: cannot write the samples to stdout: {error.strerror}; free some space or write them elsewhere "
            "and rerun (the same --seed gives the same samples)",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
