"""nanoGPT, build-nanogpt and llm.c checkpoints into GPTMoE folders (gpt2_checkpoint_formats.py and the converter).

Each test writes a tiny checkpoint in the source's own format from random weights and compares the converted model
with a reference built independently from the same weights: transformers' GPT2LMHeadModel, its Conv1D layers
given the transposed nn.Linear weights.
"""

import json
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
from conftest import REPO_ROOT
from transformers import GPT2Config, GPT2LMHeadModel

import convert_gpt2_to_gpt_moe
from convert_gpt2_to_gpt_moe import convert_gpt2, main
from modeling_gpt_moe import GPTMoEForCausalLM

L, H, C, T = 2, 4, 32, 64  # layers, heads, channels, positions
PADDED, GPT2_VOCAB = 50304, 50257
LAYER_TENSORS = [  # (name, shape) of one block, nn.Linear (out, in)
    ("ln_1.weight", (C,)),
    ("ln_1.bias", (C,)),
    ("attn.c_attn.weight", (3 * C, C)),
    ("attn.c_attn.bias", (3 * C,)),
    ("attn.c_proj.weight", (C, C)),
    ("attn.c_proj.bias", (C,)),
    ("ln_2.weight", (C,)),
    ("ln_2.bias", (C,)),
    ("mlp.c_fc.weight", (4 * C, C)),
    ("mlp.c_fc.bias", (4 * C,)),
    ("mlp.c_proj.weight", (C, 4 * C)),
    ("mlp.c_proj.bias", (C,)),
]
LINEAR_WEIGHTS = ("c_attn.weight", "c_proj.weight", "c_fc.weight")  # transposed into GPT-2's Conv1D (in, out)


@dataclass
class GPTConfig:
    """build-nanogpt's config; train_gpt2.py runs as a script, so its checkpoints pickle __main__.GPTConfig."""

    block_size: int = 1024
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768


GPTConfig.__module__ = "__main__"


class TrainConfig:
    """A class outside the converter's allow-list."""


TrainConfig.__module__ = "__main__"


class RunsCode:
    """Unpickling this runs a shell command, as a malicious checkpoint would."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def random_weights(vocab_size: int = PADDED, bias: bool = True) -> dict[str, torch.Tensor]:
    """nanoGPT's names and layout; random weights, biases and LayerNorm parameters, so none can be forgotten. Large
    enough that the MLP's inputs reach where the exact and the tanh GELU differ (by 1e-4 near |x| = 2)."""
    generator = torch.Generator().manual_seed(0)

    def rand(shape, mean=0.0, std=0.4):
        return mean + std * torch.randn(shape, generator=generator)

    state = {"transformer.wte.weight": rand((vocab_size, C)), "transformer.wpe.weight": rand((T, C))}
    for i in range(L):
        for name, shape in LAYER_TENSORS:
            if bias or not name.endswith(".bias"):
                is_norm_scale = name.startswith("ln_") and name.endswith("weight")
                state[f"transformer.h.{i}.{name}"] = rand(shape, mean=1.0 if is_norm_scale else 0.0)
    state["transformer.ln_f.weight"] = rand((C,), mean=1.0)
    if bias:
        state["transformer.ln_f.bias"] = rand((C,))
    return state


def reference_gpt2(state: dict[str, torch.Tensor], activation: str, vocab_size: int | None = None) -> GPT2LMHeadModel:
    """GPT2LMHeadModel with these weights (its first vocab_size token rows); a bias the source lacks is zero there,
    which computes the same (a LayerNorm with zero bias is one without)."""
    wte = state["transformer.wte.weight"][:vocab_size]
    config = GPT2Config(
        vocab_size=wte.shape[0], n_positions=T, n_embd=C, n_layer=L, n_head=H, activation_function=activation,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5,
    )  # fmt: skip
    model = GPT2LMHeadModel(config).eval()
    weights = {}
    for name, param in model.state_dict().items():
        if name in ("transformer.wte.weight", "lm_head.weight"):
            weights[name] = wte
        elif name in state:
            weights[name] = state[name].t() if name.endswith(LINEAR_WEIGHTS) else state[name]
        else:
            assert name.endswith(".bias"), name
            weights[name] = torch.zeros_like(param)
    model.load_state_dict(weights, strict=True)
    return model


def assert_same_function(model, reference: GPT2LMHeadModel) -> float:
    """Logits equal to 1e-5 on a batch, greedy generation token for token; returns the largest logit difference."""
    prompts = torch.randint(0, GPT2_VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    model, reference = model.float().eval(), reference.eval()
    with torch.no_grad():
        got, expected = model(prompts).logits, reference(prompts).logits
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    greedy = dict(max_new_tokens=12, do_sample=False, pad_token_id=GPT2_VOCAB - 1)
    assert model.generate(prompts[:1], **greedy).tolist() == reference.generate(prompts[:1], **greedy).tolist()
    return (got - expected).abs().max().item()


def adamw_state(state: dict[str, torch.Tensor]) -> dict:
    """An optimizer state dict as nanoGPT saves it beside the model."""
    params = [torch.nn.Parameter(t.clone()) for t in state.values()]
    optimizer = torch.optim.AdamW(params, fused=False)
    sum(p.sum() for p in params).backward()
    optimizer.step()
    return optimizer.state_dict()


def write_nanogpt(path, state, bias=True, prefix="", mask_buffers=False):
    model = {prefix + name: t for name, t in state.items()}
    model[prefix + "lm_head.weight"] = model[prefix + "transformer.wte.weight"]  # tied, saved under both names
    if mask_buffers:  # nanoGPT without flash attention keeps its causal mask as a buffer named attn.bias
        for i in range(L):
            model[f"{prefix}transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(T, T)).view(1, 1, T, T)
    vocab_size = state["transformer.wte.weight"].shape[0]
    model_args = dict(n_layer=L, n_head=H, n_embd=C, block_size=T, bias=bias, vocab_size=vocab_size, dropout=0.0)
    config = {"out_dir": "out", "dataset": "openwebtext", "learning_rate": 6e-4, "compile": True, "batch_size": 12}
    checkpoint = dict(model=model, optimizer=adamw_state(state), model_args=model_args, iter_num=5000)
    torch.save({**checkpoint, "best_val_loss": torch.tensor(3.2847), "config": config}, path)


def write_build_nanogpt(path, state, monkeypatch, prefix="module."):
    # pickle finds the class under the name it will write: __main__.GPTConfig
    monkeypatch.setattr(sys.modules["__main__"], "GPTConfig", GPTConfig, raising=False)
    model = {prefix + name: t for name, t in state.items()}
    model[prefix + "lm_head.weight"] = model[prefix + "transformer.wte.weight"]
    config = GPTConfig(
        block_size=T, vocab_size=state["transformer.wte.weight"].shape[0], n_layer=L, n_head=H, n_embd=C
    )
    torch.save({"model": model, "config": config, "step": 19072, "val_loss": 3.0712}, path)
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == ["__main__.GPTConfig"]


def write_llmc(path, state, version, vocab_size=GPT2_VOCAB):
    """llm.c's model file, as its train_gpt2.py write_model writes it: the header, then each tensor kind for all
    layers in turn, in fp32 (version 3) or bf16 (version 5), the token embedding padded."""
    padded_vocab = state["transformer.wte.weight"].shape[0]
    header = torch.zeros(256, dtype=torch.int32)
    header[:8] = torch.tensor([20240326, version, T, vocab_size, L, H, C, padded_vocab])
    names = ["transformer.wte.weight", "transformer.wpe.weight"]
    names += [f"transformer.h.{i}.{name}" for name, _ in LAYER_TENSORS for i in range(L)]
    names += ["transformer.ln_f.weight", "transformer.ln_f.bias"]
    with open(path, "wb") as file:
        file.write(header.numpy().tobytes())
        for name in names:
            tensor = state[name].float() if version == 3 else state[name].to(torch.bfloat16).view(torch.int16)
            file.write(tensor.numpy().tobytes())


def convert_cli(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO_ROOT / "convert_gpt2_to_gpt_moe.py"), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=180)


def load(folder) -> GPTMoEForCausalLM:
    return GPTMoEForCausalLM.from_pretrained(folder, dtype=torch.float32)


def test_nanogpt_cli_keeps_padded_vocab_and_training_facts(tmp_path):
    state = random_weights()
    write_nanogpt(tmp_path / "ckpt.pt", state, prefix="_orig_mod.")  # saved from a torch.compile'd model
    result = convert_cli("--from", str(tmp_path / "ckpt.pt"), "--output_dir", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["activation_function"], config["vocab_size"], config["bias"]) == ("gelu", PADDED, True)
    assert_same_function(load(tmp_path / "out"), reference_gpt2(state, "gelu"))
    card = (tmp_path / "out" / "README.md").read_text()
    assert (
        "from nanoGPT's `ckpt.pt` (dense;" in card
        and "| iter_num | 5000 |" in card
        and "| best_val_loss | 3.2847 |" in card
    )
    assert "dataset: openwebtext" in card  # nanoGPT's training configuration
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


@pytest.mark.parametrize("num_experts", [None, 4])
def test_nanogpt_without_biases(tmp_path, num_experts):
    state = random_weights(bias=False)
    # DDP around a torch.compile'd model; no flash attention, so the causal masks are saved as buffers
    write_nanogpt(tmp_path / "ckpt.pt", state, bias=False, prefix="module._orig_mod.", mask_buffers=True)
    torch.manual_seed(0)  # the routers' initialisation
    model = convert_gpt2(tmp_path / "ckpt.pt", num_experts=num_experts)
    assert model.config.bias is False and model.transformer.ln_f.bias is None
    assert model.config.use_moe == (num_experts is not None)
    assert_same_function(model, reference_gpt2(state, "gelu"))


def test_build_nanogpt_cli_upcycles_trims_vocab_and_keeps_step(tmp_path, monkeypatch):
    state = random_weights()
    write_build_nanogpt(tmp_path / "model_19072.pt", state, monkeypatch, prefix="module.")
    result = convert_cli(
        *("--from", str(tmp_path / "model_19072.pt"), "--output_dir", str(tmp_path / "out")),
        *("--num_experts", "4", "--vocab_size", str(GPT2_VOCAB)),
    )
    assert result.returncode == 0, result.stderr
    assert "4 experts, top-2" in result.stdout
    model = load(tmp_path / "out")
    assert (model.config.activation_function, model.config.vocab_size) == ("gelu_pytorch_tanh", GPT2_VOCAB)
    # the first 50257 rows' logits are the padded model's: the reference has only those rows
    assert_same_function(model, reference_gpt2(state, "gelu_pytorch_tanh", vocab_size=GPT2_VOCAB))
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| step | 19072 |" in card and "| val_loss | 3.0712 |" in card


@pytest.mark.parametrize("version", [3, 5])
@pytest.mark.parametrize("vocab_size", [None, PADDED])
def test_llmc(tmp_path, version, vocab_size):
    state = random_weights()
    write_llmc(tmp_path / "model_00005000.bin", state, version)
    model = convert_gpt2(tmp_path / "model_00005000.bin", vocab_size=vocab_size)
    assert model.dtype == (torch.float32 if version == 3 else torch.bfloat16)  # kept as stored
    # by default llm.c's vocabulary is V (its softmax ignores the padded rows); --vocab_size keeps them
    assert model.config.vocab_size == (vocab_size or GPT2_VOCAB)
    if version == 5:
        state = {name: t.to(torch.bfloat16).float() for name, t in state.items()}
    assert_same_function(model, reference_gpt2(state, "gelu_pytorch_tanh", vocab_size=vocab_size or GPT2_VOCAB))


def test_llmc_bf16_cli_upcycled(tmp_path):
    state = random_weights()
    write_llmc(tmp_path / "gpt2_124M_bf16.bin", state, version=5)
    out = tmp_path / "out"
    result = convert_cli(
        "--from", str(tmp_path / "gpt2_124M_bf16.bin"), "--output_dir", str(out), "--num_experts", "4"
    )
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    state = {name: t.to(torch.bfloat16).float() for name, t in state.items()}
    assert_same_function(load(out), reference_gpt2(state, "gelu_pytorch_tanh", vocab_size=GPT2_VOCAB))
    assert "| padded_vocab_size | 50304 |" in (out / "README.md").read_text()


@pytest.mark.parametrize("foreign", ["class", "code"])
def test_pickle_outside_allow_list_is_refused(tmp_path, monkeypatch, foreign):
    marker = tmp_path / "code_ran"
    config = TrainConfig() if foreign == "class" else RunsCode(marker)
    monkeypatch.setattr(sys.modules["__main__"], "TrainConfig", TrainConfig, raising=False)
    torch.save({"model": random_weights(vocab_size=GPT2_VOCAB), "config": config, "step": 1}, tmp_path / "model.pt")
    result = convert_cli("--from", str(tmp_path / "model.pt"), "--output_dir", str(tmp_path / "out"))
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    name = "__main__.TrainConfig" if foreign == "class" else "system"
    assert "refused" in result.stderr and name in result.stderr and str(tmp_path / "model.pt") in result.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def one_line_error(argv: list[str], capsys) -> str:
    """The message of a main() that fails as the CLI does: sys.exit(message), status 1, or argparse's one line."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    message = exit_info.value.code if isinstance(exit_info.value.code, str) else capsys.readouterr().err
    assert exit_info.value.code != 0 and len(message.strip().splitlines()) == 1, message
    return message


def write_unusable(path, kind: str) -> None:
    """A file that does not convert ("missing": none at all)."""
    if kind == "not a checkpoint":
        path.write_bytes(b"not a checkpoint at all" * 10)
    elif kind == "no model_args nor GPTConfig":
        torch.save({"model": {}, "step": 3}, path)
    elif kind == "truncated .pt":
        write_nanogpt(path, random_weights())
        path.write_bytes(path.read_bytes()[:4000])
    elif kind == "truncated .bin":
        write_llmc(path, random_weights(), version=3)
        path.write_bytes(path.read_bytes()[:5000])
    elif kind == "llm.c version 1":
        write_llmc(path, random_weights(), version=1)


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("missing", "No such file"),
        ("not a checkpoint", "could not read"),
        ("no model_args nor GPTConfig", "neither nanoGPT's 'model_args'"),
        ("truncated .pt", "could not read"),
        ("truncated .bin", "truncated"),
        ("llm.c version 1", "versions 3 (fp32) and 5 (bf16) convert"),
    ],
)
def test_unusable_input_is_one_line_naming_the_file(tmp_path, capsys, kind, expected):
    write_unusable(tmp_path / "input", kind)
    message = one_line_error(["--from", str(tmp_path / "input"), "--output_dir", str(tmp_path / "out")], capsys)
    assert expected in message and str(tmp_path / "input") in message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--vocab_size", "50400"], "exceeds the 50304 rows"),
        (["--vocab_size", "50000"], "would drop ids of GPT-2's tokenizer"),
        (["--gpt2", "gpt2"], "not allowed with argument"),
    ],
)
def test_flag_mistakes_are_one_line(tmp_path, capsys, flags, expected):
    write_llmc(tmp_path / "model.bin", random_weights(), version=3)
    message = one_line_error(
        ["--from", str(tmp_path / "model.bin"), "--output_dir", str(tmp_path / "out"), *flags], capsys
    )
    assert expected in message
    assert not (tmp_path / "out").exists()


def test_write_errors_are_one_line_and_leave_nothing(tmp_path, capsys, monkeypatch):
    write_llmc(tmp_path / "model.bin", random_weights(), version=3)
    (tmp_path / "a_file").write_text("")
    message = one_line_error(
        ["--from", str(tmp_path / "model.bin"), "--output_dir", str(tmp_path / "a_file/out")], capsys
    )
    assert message.startswith("error: cannot write") and "a_file" in message and "nothing was written" in message

    out = tmp_path / "out"  # an earlier conversion: replaced only once the new folder is complete
    out.mkdir()
    (out / "config.json").write_text('{"model_type": "gpt_moe"}')
    (out / "earlier.txt").write_text("kept")

    def disk_full(self, folder, *args, **kwargs):
        (folder / "model.safetensors").write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(convert_gpt2_to_gpt_moe.GPTMoEForCausalLM, "save_pretrained", disk_full)
    message = one_line_error(["--from", str(tmp_path / "model.bin"), "--output_dir", str(out)], capsys)
    assert "No space left on device" in message and str(out) in message and "free some space" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "model.bin", "out"]  # no temporary folder left
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "earlier.txt"]


@pytest.mark.parametrize("target", ["a folder of the user's", "the current directory"])
def test_an_output_dir_that_is_not_a_model_folder_is_never_deleted(tmp_path, capsys, monkeypatch, target):
    write_llmc(tmp_path / "model.bin", random_weights(), version=3)
    folder = tmp_path / "work"
    (folder / "src").mkdir(parents=True)
    (folder / "src" / "train.py").write_text("kept")
    if target == "the current directory":
        monkeypatch.chdir(folder / "src")  # --output_dir names a folder that holds it
    message = one_line_error(["--from", str(tmp_path / "model.bin"), "--output_dir", str(folder)], capsys)
    assert "name a new folder" in message
    assert (folder / "src" / "train.py").read_text() == "kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bin", "work"]  # no temporary folder either


def test_an_untied_gpt2_is_refused(tmp_path, capsys, tiny_gpt2):
    tiny_gpt2.config.tie_word_embeddings = False
    tiny_gpt2.lm_head.weight = torch.nn.Parameter(tiny_gpt2.lm_head.weight.detach().clone() + 0.1)
    tiny_gpt2.resize_token_embeddings(50257)
    tiny_gpt2.save_pretrained(tmp_path / "gpt2")
    message = one_line_error(["--gpt2", str(tmp_path / "gpt2"), "--output_dir", str(tmp_path / "out")], capsys)
    assert "tied embeddings" in message and not (tmp_path / "out").exists()
