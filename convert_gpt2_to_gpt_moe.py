"""Convert a GPT-2 checkpoint into a GPTMoE checkpoint (a Hub model folder), dense or sparsely upcycled.

    python convert_gpt2_to_gpt_moe.py --gpt2 gpt2 --output_dir gpt2-dense
    python convert_gpt2_to_gpt_moe.py --gpt2 gpt2 --output_dir gpt2-moe --num_experts 8 --num_experts_per_tok 2
    python convert_gpt2_to_gpt_moe.py --from out/ckpt.pt --output_dir my-nanogpt                    # nanoGPT
    python convert_gpt2_to_gpt_moe.py --from log/model_19072.pt --output_dir my-gpt2 --vocab_size 50257
    python convert_gpt2_to_gpt_moe.py --from log124M/model_00020000.bin --output_dir my-llmc      # llm.c

`--gpt2` takes a transformers GPT2LMHeadModel (folder or Hub id); `--from` a nanoGPT, build-nanogpt or llm.c
checkpoint file (gpt2_checkpoint_formats.py reads them). The converted model computes the source's function.

Upcycling (Komatsuzaki et al. 2022) copies each MLP into every expert of its layer. With the
top-k weights renormalised to sum to one, the upcycled model computes exactly the dense
model's function at the start of training; the routers start random and learn to specialise.
"""

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from transformers import GPT2LMHeadModel

if __package__:  # installed: these modules are the package gpt_moe
    from .command_line import ArgumentParser, write_failed, write_fault
    from .configuration_gpt_moe import GPTMoEConfig
    from .gpt2_checkpoint_formats import DenseCheckpoint, read_checkpoint
    from .gpt2_tokenizer import VOCAB_SIZE, get_tokenizer
    from .modeling_gpt_moe import GPTMoEForCausalLM
else:  # a script or module of a clone, whose root is on sys.path
    from command_line import ArgumentParser, write_failed, write_fault
    from configuration_gpt_moe import GPTMoEConfig
    from gpt2_checkpoint_formats import DenseCheckpoint, read_checkpoint
    from gpt2_tokenizer import VOCAB_SIZE, get_tokenizer
    from modeling_gpt_moe import GPTMoEForCausalLM

# GPT-2 stores these as Conv1D (in, out); GPTMoE uses nn.Linear (out, in).
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def dense_from_gpt2(gpt2: GPT2LMHeadModel) -> DenseCheckpoint:
    src = gpt2.config
    if src.scale_attn_by_inverse_layer_idx or src.reorder_and_upcast_attn or not src.scale_attn_weights:
        raise ValueError("only standard GPT-2 attention (scale_attn_weights=True, no per-layer scaling) converts.")
    gpt2_state = gpt2.state_dict()
    if not torch.equal(gpt2_state["lm_head.weight"], gpt2_state["transformer.wte.weight"]):
        raise ValueError("only GPT-2 with tied embeddings converts: its lm_head.weight differs from wte.weight.")
    state = {}
    for name, tensor in gpt2_state.items():
        # the causal-mask buffers of old checkpoints, and lm_head (tied to wte)
        if name.endswith((".attn.bias", ".attn.masked_bias")) or name == "lm_head.weight":
            continue
        state[name] = tensor.t().contiguous() if name.endswith(CONV1D_SUFFIXES) else tensor
    config = dict(
        vocab_size=src.vocab_size,
        block_size=src.n_positions,
        n_layer=src.n_layer,
        n_head=src.n_head,
        n_embd=src.n_embd,
        n_inner=src.n_inner or 4 * src.n_embd,
        layer_norm_epsilon=src.layer_norm_epsilon,
        activation_function=src.activation_function,
        bos_token_id=src.bos_token_id,
        eos_token_id=src.eos_token_id,
    )
    return DenseCheckpoint(state, config, f"transformers' GPT2LMHeadModel `{src.name_or_path}`")


def config_for(
    dense: DenseCheckpoint, num_experts: int | None, num_experts_per_tok: int, vocab_size: int | None
) -> GPTMoEConfig:
    rows = dense.state_dict["transformer.wte.weight"].shape[0]
    vocab_size = vocab_size or dense.config["vocab_size"]
    if vocab_size > rows:
        raise ValueError(f"--vocab_size {vocab_size} exceeds the {rows} rows of the source's token embedding.")
    if vocab_size < min(rows, VOCAB_SIZE):
        raise ValueError(
            f"--vocab_size {vocab_size} would drop ids of GPT-2's tokenizer: pass {min(rows, VOCAB_SIZE)} "
            f"(the tokenizer's ids) or {rows} (every row of the source)."
        )
    return GPTMoEConfig(
        **{**dense.config, "vocab_size": vocab_size},
        use_moe=num_experts is not None,
        num_experts=num_experts or 1,
        num_experts_per_tok=num_experts_per_tok if num_experts else 1,
        moe_intermediate_size=dense.config.get("n_inner"),  # each expert is a copy of the MLP
        norm_topk_prob=True,
    )


def gpt_moe_state_dict(dense_state: dict[str, torch.Tensor], config: GPTMoEConfig) -> dict[str, torch.Tensor]:
    """Trim the vocabulary to config.vocab_size rows; in MoE layers copy the MLP into every expert."""
    state = dict(dense_state)
    state["transformer.wte.weight"] = state["transformer.wte.weight"][: config.vocab_size]
    state["lm_head.weight"] = state["transformer.wte.weight"]  # logits of the kept ids are unchanged
    for layer in range(config.n_layer):
        if not config.is_moe_layer(layer):
            continue
        prefix = f"transformer.h.{layer}.mlp."
        up, down = state.pop(prefix + "c_fc.weight"), state.pop(prefix + "c_proj.weight")
        # experts always have biases: zeros compute what a source without biases (nanoGPT's bias=False) computes
        up_bias = state.pop(prefix + "c_fc.bias", up.new_zeros(up.shape[0]))
        down_bias = state.pop(prefix + "c_proj.bias", down.new_zeros(down.shape[0]))
        copies = (config.num_experts, 1, 1)
        state[prefix + "experts.up_proj"] = up.repeat(*copies)
        state[prefix + "experts.up_proj_bias"] = up_bias.repeat(*copies[:2])
        state[prefix + "experts.down_proj"] = down.repeat(*copies)
        state[prefix + "experts.down_proj_bias"] = down_bias.repeat(*copies[:2])
    return state


def check_fits(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], source: str) -> None:
    """One line naming what does not fit, rather than load_state_dict's report of every tensor."""
    wrong = [name for name, tensor in state.items() if name in expected and tensor.shape != expected[name].shape]
    missing = [name for name in expected if name not in state and ".mlp.router." not in name]  # routers start fresh
    problems = [f"{name} is {tuple(state[name].shape)}, not {tuple(expected[name].shape)}" for name in wrong]
    problems += [f"{name} is missing" for name in missing]
    problems += [f"{name} is unexpected" for name in state if name not in expected]
    if problems:
        raise ValueError(f"the weights of {source} do not fit its config: {'; '.join(problems[:3])}")


def convert(
    dense: DenseCheckpoint, num_experts: int | None = None, num_experts_per_tok: int = 2, vocab_size: int | None = None
) -> GPTMoEForCausalLM:
    config = config_for(dense, num_experts, num_experts_per_tok, vocab_size)
    model = GPTMoEForCausalLM(config)
    state = gpt_moe_state_dict(dense.state_dict, config)
    check_fits(state, model.state_dict(), dense.source)
    model.load_state_dict(state, strict=False)  # the routers keep their fresh weights and zero expert_bias
    return model.to(dense.state_dict["transformer.wte.weight"].dtype)


def convert_gpt2(
    gpt2: GPT2LMHeadModel | str | Path,
    num_experts: int | None = None,
    num_experts_per_tok: int = 2,
    vocab_size: int | None = None,
) -> GPTMoEForCausalLM:
    """A GPTMoEForCausalLM computing the same function as `gpt2` (routers are freshly initialised): a
    GPT2LMHeadModel, or the path of a nanoGPT, build-nanogpt or llm.c checkpoint file. `vocab_size` trims a padded
    vocabulary (the logits of the ids kept are unchanged); by default the source's softmax vocabulary is kept."""
    dense = dense_from_gpt2(gpt2) if isinstance(gpt2, GPT2LMHeadModel) else read_checkpoint(gpt2)
    return convert(dense, num_experts, num_experts_per_tok, vocab_size)


def model_card(name: str, dense: DenseCheckpoint, model: GPTMoEForCausalLM) -> str:
    """The folder's README: where the model came from and what the source said about its training."""
    config = model.config
    experts = f"{config.num_experts} experts, top-{config.num_experts_per_tok}"
    kind = f"upcycled: every MLP copied into {experts}" if config.use_moe else "dense"
    facts = "\n".join(
        f"| {key} | {value:.4f} |" if isinstance(value, float) else f"| {key} | {value} |"
        for key, value in dense.carried.items()
    )
    card = f"""---
library_name: transformers
tags:
- gpt_moe
- text-generation
---

# {name}

Converted by GPT-MoE's `convert_gpt2_to_gpt_moe.py` from {dense.source} ({kind}; {config.vocab_size:,} token ids,
{model.num_parameters():,} parameters). It computes the source's function: the same logits, the same greedy text.

## Usage

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{name}", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("{name}", trust_remote_code=True)
```
"""
    if facts:
        card += f"\n## From the source checkpoint\n\n| field | value |\n| --- | --- |\n{facts}\n"
    if dense.training_config:
        hyperparameters = yaml.safe_dump(dense.training_config, sort_keys=False).strip()
        card += f"\n## Its training configuration\n\n```yaml\n{hyperparameters}\n```\n"
    return card


def check_replaceable(output_dir: Path) -> None:
    """An existing output_dir is replaced only when it is a GPTMoE model folder (an earlier conversion): any other
    folder, or one holding the current directory (`--output_dir .`), is the user's and is never deleted."""
    output_dir = output_dir.resolve()
    if Path.cwd().is_relative_to(output_dir):
        raise ValueError(f"--output_dir {output_dir} holds the current directory: name a new folder.")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not is_gpt_moe_folder(output_dir):
        raise ValueError(
            f"--output_dir {output_dir} exists and is not a GPTMoE model folder: name a new folder (nothing was "
            "changed)."
        )


def is_gpt_moe_folder(folder: Path) -> bool:
    try:
        return json.loads((folder / "config.json").read_text()).get("model_type") == GPTMoEConfig.model_type
    except (OSError, ValueError):
        return False


def save_checkpoint(model: GPTMoEForCausalLM, output_dir: Path, card: str | None = None) -> None:
    """Write model + tokenizer (+ model card) to a temporary folder, then rename it into place: a failure leaves
    nothing at output_dir."""
    output_dir = output_dir.resolve()
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        model.save_pretrained(tmp_dir)
        get_tokenizer().save_pretrained(tmp_dir)
        if card:
            (tmp_dir / "README.md").write_text(card)
        if output_dir.exists():
            shutil.rmtree(output_dir)
        tmp_dir.rename(output_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)  # gone after the rename; a failure's partial folder otherwise


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--gpt2", help="GPT2LMHeadModel folder or Hub id (e.g. gpt2, gpt2-medium)")
    source.add_argument(
        "--from", dest="checkpoint", type=Path, help="nanoGPT ckpt.pt, build-nanogpt model_*.pt or llm.c model_*.bin"
    )
    parser.add_argument("--output_dir", required=True, type=Path)
    parser.add_argument("--num_experts", type=int, default=None, help="upcycle every MLP into this many experts")
    parser.add_argument("--num_experts_per_tok", type=int, default=2, help="top-k of the upcycled routers")
    parser.add_argument(
        "--vocab_size", type=int, default=None, help="keep this many embedding rows, e.g. 50257 to trim a padded 50304"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the router initialisation")
    return parser.parse_args(argv)


def load_gpt2(name: str) -> DenseCheckpoint:
    try:
        return dense_from_gpt2(GPT2LMHeadModel.from_pretrained(name))
    except OSError as error:
        raise ValueError(
            f"could not load a GPT-2 checkpoint from --gpt2 {name!r} ({error}). "
            "Offline? Pass a local folder saved with save_pretrained."
        ) from None


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    try:
        dense = read_checkpoint(args.checkpoint) if args.checkpoint else load_gpt2(args.gpt2)
        model = convert(dense, args.num_experts, args.num_experts_per_tok, args.vocab_size)
        check_replaceable(args.output_dir)
    except ValueError as error:
        sys.exit(f"error: {error}")
    if model.config.vocab_size < VOCAB_SIZE:  # e.g. nanoGPT's shakespeare_char
        print(
            f"warning: the model has {model.config.vocab_size} token ids, GPT-2's tokenizer saved with it "
            f"{VOCAB_SIZE}: replace the folder's tokenizer with the one it was trained with",
            file=sys.stderr,
        )
    try:
        save_checkpoint(model, args.output_dir, model_card(args.output_dir.name, dense, model))
    except Exception as error:
        fault = write_fault(error)  # safetensors and tokenizers report the OS error inside their own messages
        if fault is None:
            raise
        kept = f"nothing was written at {args.output_dir} (the temporary folder is removed)"
        sys.exit(f"error: {write_failed(args.output_dir, fault, kept, 'run the command again')}")
    kind = f"{args.num_experts} experts, top-{args.num_experts_per_tok}" if args.num_experts else "dense"
    print(f"wrote {args.output_dir} ({kind}, {model.num_parameters():,} parameters)")


if __name__ == "__main__":
    main()
