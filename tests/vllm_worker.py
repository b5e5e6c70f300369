"""Runs inside vLLM's own virtual environment (tests/test_vllm.py): loads a checkpoint with vLLM's Transformers
backend, offline, and writes as JSON the class vLLM chose, each prompt position's log-probability of its actual
token, and greedy continuations (to a file: vLLM's shutdown logs go to stdout after the last line of ours).

    python vllm_worker.py CHECKPOINT '{"text_ids": [...], "prompts": [[...], ...], "max_new_tokens": 12}' OUT.json

It imports nothing of this repository: the model comes from the checkpoint's own code files (remote code).
"""

import json
import sys

from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt


def main() -> None:
    checkpoint, request, output = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    llm = LLM(
        model=checkpoint,
        model_impl="transformers",
        trust_remote_code=True,
        dtype="float32",
        enforce_eager=True,
        gpu_memory_utilization=0.1,  # on vLLM's CPU backend: the share of the machine's memory it reserves
        seed=0,
    )
    # one step of decoding returns every prompt position's log-probability of the token that is there
    scored = llm.generate(
        TokensPrompt(prompt_token_ids=request["text_ids"]),
        SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0),
        use_tqdm=False,
    )[0]
    prompt_logprobs = [
        None if position is None else position[token].logprob
        for position, token in zip(scored.prompt_logprobs, request["text_ids"], strict=True)
    ]
    greedy = llm.generate(
        [TokensPrompt(prompt_token_ids=prompt) for prompt in request["prompts"]],
        SamplingParams(max_tokens=request["max_new_tokens"], temperature=0.0, ignore_eos=True),
        use_tqdm=False,
    )
    result = {
        "architecture": llm.llm_engine.model_config.architecture,
        "prompt_logprobs": prompt_logprobs,
        "greedy": [list(completion.outputs[0].token_ids) for completion in greedy],
    }
    with open(output, "w") as file:
        json.dump(result, file)


if __name__ == "__main__":  # vLLM starts its engine in a spawned process, which re-imports this file
    main()
