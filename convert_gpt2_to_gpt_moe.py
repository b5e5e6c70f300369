"""Convert a transformers GPT-2 checkpoint into a GPTMoE checkpoint, dense or sparsely upcycled.

    python convert_gpt2_to_gpt_moe.py --gpt2 gpt2 --output_dir gpt2-dense
    python convert_gpt2_to_gpt_moe.py --gpt2 gpt2 --output_dir gpt2-moe --num_experts 8 --num_experts_per_tok 2

Upcycling (Komatsuzaki et al. 2022) copies each MLP into every expert of its layer. With the
top-k weights renormalised to sum to one, the upcycled model computes exactly the dense
model's function at the start of training; the routers start random and learn to specialise.
"""

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from transformers import GPT2LMHeadModel

if __package__:  # installed: these modules are the package gpt_moe
    from .command_line import ArgumentParser
    from .configuration_gpt_moe import GPTMoEConfig
    from .gpt2_tokenizer import get_tokenizer
    from .modeling_gpt_moe import GPTMoEForCausalLM
else:  # a script or module of a clone, whose root is on sys.path
    from command_line import ArgumentParser
    from configuration_gpt_moe import GPTMoEConfig
    from gpt2_tokenizer import get_tokenizer
    from modeling_gpt_moe import GPTMoEForCausalLM

# GPT-2 stores these as Conv1D (in, out); GPTMoE uses nn.Linear (out, in).
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def config_from_gpt2(gpt2: GPT2LMHeadModel, num_experts: int | None, num_experts_per_tok: int) -> GPTMoEConfig:
    src = gpt2.config
    if src.scale_attn_by_inverse_layer_idx or src.reorder_and_upcast_attn or not src.scale_attn_weights:
        raise ValueError("only standard GPT-2 attention (scale_attn_weights=True, no per-layer scaling) converts.")
    n_inner = src.n_inner or 4 * src.n_embd
    return GPTMoEConfig(
        vocab_size=src.vocab_size,
        block_size=src.n_positions,
        n_layer=src.n_layer,
        n_head=src.n_head,
        n_embd=src.n_embd,
        n_inner=n_inner,
        layer_norm_epsilon=src.layer_norm_epsilon,
        activation_function=src.activation_function,
        dropout=0.0,
        use_moe=num_experts is not None,
        num_experts=num_experts or 1,
        num_experts_per_tok=num_experts_per_tok if num_experts else 1,
        moe_intermediate_size=n_inner,
        norm_topk_prob=True,
        bos_token_id=src.bos_token_id,
        eos_token_id=src.eos_token_id,
    )


def gpt2_state_dict_to_gpt_moe(gpt2_state: dict[str, torch.Tensor], config: GPTMoEConfig) -> dict[str, torch.Tensor]:
    """Rename/transpose GPT-2 weights; in MoE layers copy the MLP into every expert."""
    state = {}
    for name, tensor in gpt2_state.items():
        if name.endswith((".attn.bias", ".attn.masked_bias")):  # causal-mask buffers of old checkpoints
            continue
        state[name] = tensor.t().contiguous() if name.endswith(CONV1D_SUFFIXES) else tensor
    for layer in range(config.n_layer):
        if not config.is_moe_layer(layer):
            continue
        prefix = f"transformer.h.{layer}.mlp."
        up, up_bias = state.pop(prefix + "c_fc.weight"), state.pop(prefix + "c_fc.bias")
        down, down_bias = state.pop(prefix + "c_proj.weight"), state.pop(prefix + "c_proj.bias")
        copies = (config.num_experts, 1, 1)
        state[prefix + "experts.up_proj"] = up.repeat(*copies)
        state[prefix + "experts.up_proj_bias"] = up_bias.repeat(*copies[:2])
        state[prefix + "experts.down_proj"] = down.repeat(*copies)
        state[prefix + "experts.down_proj_bias"] = down_bias.repeat(*copies[:2])
    return state


def convert_gpt2(
    gpt2: GPT2LMHeadModel, num_experts: int | None = None, num_experts_per_tok: int = 2
) -> GPTMoEForCausalLM:
    """A GPTMoEForCausalLM computing the same function as `gpt2` (routers are freshly initialised)."""
    config = config_from_gpt2(gpt2, num_experts, num_experts_per_tok)
    model = GPTMoEForCausalLM(config)
    state = gpt2_state_dict_to_gpt_moe(gpt2.state_dict(), config)
    # the routers keep their fresh weights and zero expert_bias
    routers = {name: p for name, p in model.state_dict().items() if ".mlp.router." in name}
    missing, unexpected = model.load_state_dict({**state, **routers}, strict=False)
    if missing or unexpected:
        raise ValueError(f"GPT-2 weights did not map onto GPTMoE: missing {missing}, unexpected {unexpected}")
    return model.to(gpt2.dtype)


def save_checkpoint(model: GPTMoEForCausalLM, output_dir: Path) -> None:
    """Write model + tokenizer to a temporary folder, then rename it into place."""
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    model.save_pretrained(tmp_dir)
    get_tokenizer().save_pretrained(tmp_dir)
    if output_dir.exists():
        shutil.rmtree(output_dir)
    tmp_dir.rename(output_dir)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpt2", required=True, help="GPT2LMHeadModel folder or Hub id (e.g. gpt2, gpt2-medium)")
    parser.add_argument("--output_dir", required=True, type=Path)
    parser.add_argument("--num_experts", type=int, default=None, help="upcycle every MLP into this many experts")
    parser.add_argument("--num_experts_per_tok", type=int, default=2, help="top-k of the upcycled routers")
    parser.add_argument("--seed", type=int, default=0, help="seed of the router initialisation")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    try:
        gpt2 = GPT2LMHeadModel.from_pretrained(args.gpt2)
    except OSError as error:
        sys.exit(
            f"error: could not load a GPT-2 checkpoint from --gpt2 {args.gpt2!r} ({error}). "
            "Offline? Pass a local folder saved with save_pretrained."
        )
    try:
        model = convert_gpt2(gpt2, args.num_experts, args.num_experts_per_tok)
    except ValueError as error:
        sys.exit(f"error: {error}")
    save_checkpoint(model, args.output_dir)
    kind = f"{args.num_experts} experts, top-{args.num_experts_per_tok}" if args.num_experts else "dense"
    print(f"wrote {args.output_dir} ({kind}, {model.num_parameters():,} parameters)")


if __name__ == "__main__":
    main()
