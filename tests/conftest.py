"""Shared fixtures: tiny models small enough that the whole suite runs in minutes on 2 cores."""

import os

# The tests make their own data and models: no Hub requests, so a missing repo fails at once rather than after
# retries. Set before huggingface_hub is imported (it reads the variable then), for subprocesses too.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# a subprocess that crashes in native code (a segfault) prints its Python stack, as pytest does for its own
os.environ.setdefault("PYTHONFAULTHANDLER", "1")

import platform
import sys
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from configuration_gpt_moe import GPTMoEConfig
from modeling_gpt_moe import GPTMoEForCausalLM

# cpu_memory.keep_freed_memory sets a glibc option
requires_glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a glibc setting")

TINY = dict(vocab_size=96, block_size=64, n_layer=2, n_head=4, n_embd=32)


def tiny_config(**overrides) -> GPTMoEConfig:
    """A 2-layer, 32-wide GPTMoE with 4 experts, top-2 (override any field)."""
    return GPTMoEConfig(**{**TINY, "num_experts": 4, "num_experts_per_tok": 2, **overrides})


def tiny_model(seed: int = 0, **overrides) -> GPTMoEForCausalLM:
    torch.manual_seed(seed)
    return GPTMoEForCausalLM(tiny_config(**overrides)).eval()


@pytest.fixture
def tiny_gpt2() -> GPT2LMHeadModel:
    """A randomly initialised GPT2LMHeadModel (no download), dropout off."""
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=TINY["vocab_size"],
        n_positions=TINY["block_size"],
        n_layer=TINY["n_layer"],
        n_head=TINY["n_head"],
        n_embd=TINY["n_embd"],
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = GPT2LMHeadModel(config).eval()
    # Non-zero biases and LayerNorm affine parameters so a forgotten one cannot hide.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                param.add_(0.05 * torch.randn_like(param))
    return model
