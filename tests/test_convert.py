"""convert_gpt2_to_gpt_moe.py end to end: CLI, saved folder, loading in a process without our source."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT
from test_tokenizer import VARIED_TEXTS

from gpt2_tokenizer import get_encoding

PROMPT = [15496, 11, 314, 1101, 257, 3303, 2746, 11]  # "Hello, I'm a language model,"

# Runs in a fresh interpreter, cwd outside the repository, with our modules made unimportable:
# everything must come from the checkpoint folder (remote code) and transformers.
FRESH_PROCESS = """
import json, sys, torch
for name in ("configuration_gpt_moe", "modeling_gpt_moe", "gpt2_tokenizer", "convert_gpt2_to_gpt_moe"):
    sys.modules[name] = None
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, texts = sys.argv[1], json.loads(sys.argv[2])
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained(folder)
prompt = torch.tensor([json.loads(sys.argv[3])])
with torch.no_grad():
    logits = model(prompt).logits
generated = model.generate(prompt, max_new_tokens=8, do_sample=False)
print(json.dumps({
    "module": type(model).__module__,
    "logits": logits[0, -1, :20].tolist(),
    "generated": generated[0].tolist(),
    "ids": [tokenizer(t, split_special_tokens=True)["input_ids"] for t in texts],
}))
"""


def convert(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO_ROOT / "convert_gpt2_to_gpt_moe.py"), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


@pytest.fixture
def gpt2_folder(tmp_path, tiny_gpt2):
    tiny_gpt2.resize_token_embeddings(50257)  # the real vocabulary, so the saved tokenizer fits
    tiny_gpt2.save_pretrained(tmp_path / "gpt2")
    return tmp_path / "gpt2", tiny_gpt2


def test_cli_upcycles_and_checkpoint_loads_in_a_fresh_process(tmp_path, gpt2_folder):
    folder, gpt2 = gpt2_folder
    result = convert("--gpt2", str(folder), "--output_dir", str(tmp_path / "moe"), "--num_experts", "4")
    assert result.returncode == 0, result.stderr
    assert "4 experts, top-2" in result.stdout
    saved = sorted(p.name for p in (tmp_path / "moe").iterdir())
    assert {"model.safetensors", "modeling_gpt_moe.py", "configuration_gpt_moe.py", "tokenizer.json"} <= set(saved)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary folder left behind
    config = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_gpt_moe.GPTMoEForCausalLM"

    run = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, str(tmp_path / "moe"), json.dumps(VARIED_TEXTS), json.dumps(PROMPT)],
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["module"].startswith("transformers_modules.")
    prompt = torch.tensor([PROMPT])
    with torch.no_grad():
        expected_logits = gpt2(prompt).logits[0, -1, :20]
    torch.testing.assert_close(torch.tensor(got["logits"]), expected_logits, atol=1e-4, rtol=0)
    assert got["generated"] == gpt2.generate(prompt, max_new_tokens=8, do_sample=False)[0].tolist()
    assert got["ids"] == [get_encoding().encode_ordinary(text) for text in VARIED_TEXTS]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--gpt2", "/nonexistent/gpt2"], "could not load a GPT-2 checkpoint"),
        (["--num_experts", "2", "--num_experts_per_tok", "3"], "num_experts_per_tok"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, gpt2_folder, args, message):
    folder, _ = gpt2_folder
    result = convert("--gpt2", str(folder), "--output_dir", str(tmp_path / "out"), *args)
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
