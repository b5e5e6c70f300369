"""Read the GPT-2 checkpoints of nanoGPT, build-nanogpt and llm.c as a dense model in GPTMoE's names and layout.

    nanoGPT        ckpt.pt                          {model, model_args, iter_num, best_val_loss, config, optimizer}
    build-nanogpt  log/model_19072.pt               {model, config: GPTConfig(...), step, val_loss}
    llm.c          model_00005000.bin, gpt2_124M.bin   a 256 x int32 header, then every parameter in fp32 or bf16

All three name their weights as nanoGPT does and store Linears as nn.Linear (out, in), which is GPTMoE's dense
model. A `.pt` file is read with torch.load(weights_only=True), so its pickle runs no code: build-nanogpt's
GPTConfig is admitted as a stand-in class that only receives the field values, and anything else is refused.
"""

import math
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

LLMC_MAGIC = 20240326
LLMC_HEADER_INTS = 256
# llm.c's model file versions since its padded vocabulary: precision, the numpy type read, the torch dtype it holds
LLMC_VERSIONS = {3: ("fp32", np.dtype("<f4"), torch.float32), 5: ("bf16", np.dtype("<i2"), torch.bfloat16)}
WRAPPER_PREFIXES = ("_orig_mod.", "module.")  # torch.compile's and DDP's
EXPECTED = "pass nanoGPT's ckpt.pt, build-nanogpt's log/model_*.pt or llm.c's model_*.bin"


class CheckpointError(ValueError):
    """A file that does not convert; the message names it, says why and what to do."""


class BuildNanoGPTConfig:
    """Stands in for build-nanogpt's GPTConfig dataclass while its checkpoint is unpickled: the weights-only
    unpickler creates it without running any code and sets its fields (block_size, vocab_size, n_layer, ...)."""


# train_gpt2.py is run as a script (python or torchrun), so its GPTConfig is pickled as __main__.GPTConfig;
# train_gpt2.GPTConfig when it was imported, e.g. from a notebook
ADMITTED_GLOBALS = [(BuildNanoGPTConfig, "__main__.GPTConfig"), (BuildNanoGPTConfig, "train_gpt2.GPTConfig")]


@dataclass
class DenseCheckpoint:
    """A dense GPT-2 as a checkpoint holds it."""

    state_dict: dict[str, torch.Tensor]  # GPTMoE's names, nn.Linear (out, in) layout, no lm_head (tied to wte)
    config: dict  # GPTMoEConfig fields; vocab_size is the vocabulary its softmax covered, maybe fewer than wte's rows
    source: str  # what it was read from, for the model card
    carried: dict = field(default_factory=dict)  # what the file says about its training (step, validation loss)
    training_config: dict | None = None  # nanoGPT's training hyperparameters


def read_checkpoint(path: str | Path) -> DenseCheckpoint:
    """A nanoGPT, build-nanogpt or llm.c checkpoint, told apart by content: llm.c's magic number or a torch file."""
    path = Path(path)
    try:
        head = np.fromfile(path, dtype="<i4", count=1)
    except OSError as error:
        raise CheckpointError(f"could not read {path}: {error.strerror or error}") from None
    if head.size and head[0] == LLMC_MAGIC:
        return read_llmc(path)
    checkpoint = load_torch_file(path)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model"), dict):
        raise CheckpointError(f"{path} is a PyTorch file without a state dict under 'model': {EXPECTED}")
    if "model_args" in checkpoint:
        return read_nanogpt(path, checkpoint)
    if isinstance(checkpoint.get("config"), BuildNanoGPTConfig):
        return read_build_nanogpt(path, checkpoint)
    raise CheckpointError(f"{path} has neither nanoGPT's 'model_args' nor build-nanogpt's GPTConfig: {EXPECTED}")


def load_torch_file(path: Path) -> object:
    with torch.serialization.safe_globals(ADMITTED_GLOBALS):
        try:
            # mmap: nanoGPT's file also holds the optimizer state (twice the model), which is never read
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
        except pickle.UnpicklingError as error:
            refused = unsafe_globals(path)
            if refused:
                raise CheckpointError(
                    f"refused {path}: its pickle needs {', '.join(sorted(refused))}, which a weights-only load "
                    "does not admit (nanoGPT's and build-nanogpt's checkpoints need only tensors, plain values and "
                    "build-nanogpt's GPTConfig); no code from it was run"
                ) from None
            raise CheckpointError(f"could not read {path}: {last_line(error)}; {EXPECTED}") from None
        except Exception as error:  # whatever a damaged or foreign file makes torch.load raise
            raise CheckpointError(f"could not read {path}: {last_line(error)}; {EXPECTED}") from None


def unsafe_globals(path: Path) -> list[str]:
    """The classes and functions the file's pickle names beyond what a weights-only load admits."""
    try:
        return torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a torch zip file: the caller reports it as unreadable
        return []


def last_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return lines[-1] if lines else type(error).__name__


def read_nanogpt(path: Path, checkpoint: dict) -> DenseCheckpoint:
    args = checkpoint["model_args"]
    config = shape_fields(path, args, "model_args")
    # nanoGPT's MLP uses nn.GELU(), the exact GELU; bias=False drops the biases of every Linear and LayerNorm
    config.update(
        bias=bool(args.get("bias", True)), dropout=float(args.get("dropout", 0.0)), activation_function="gelu"
    )
    carried = {name: plain(checkpoint[name]) for name in ("iter_num", "best_val_loss") if name in checkpoint}
    training_config = checkpoint.get("config") if isinstance(checkpoint.get("config"), dict) else None
    state = clean_state_dict(path, checkpoint["model"])
    return DenseCheckpoint(state, config, f"nanoGPT's `{path.name}`", carried, training_config)


def plain(value: object) -> object:
    """nanoGPT's best_val_loss is a 0-d tensor: its number."""
    return value.item() if isinstance(value, torch.Tensor) else value


def read_build_nanogpt(path: Path, checkpoint: dict) -> DenseCheckpoint:
    config = shape_fields(path, vars(checkpoint["config"]), "GPTConfig")
    config.update(bias=True, dropout=0.0, activation_function="gelu_pytorch_tanh")  # nn.GELU(approximate="tanh")
    carried = {name: checkpoint[name] for name in ("step", "val_loss") if name in checkpoint}
    state = clean_state_dict(path, checkpoint["model"])
    return DenseCheckpoint(state, config, f"build-nanogpt's `{path.name}`", carried)


def shape_fields(path: Path, fields: dict, where: str) -> dict:
    names = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd")
    missing = [name for name in names if not (isinstance(fields, dict) and isinstance(fields.get(name), int))]
    if missing:
        raise CheckpointError(f"{path}: its {where} lacks the integer fields {', '.join(missing)}; {EXPECTED}")
    return {name: fields[name] for name in names}


def clean_state_dict(path: Path, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our names: without the wrappers' prefixes, nanoGPT's causal-mask buffers (kept without flash attention) and
    lm_head, which GPTMoE ties to wte as nanoGPT and build-nanogpt do."""
    if not all(isinstance(tensor, torch.Tensor) for tensor in state.values()):
        raise CheckpointError(f"{path}: its state dict holds values that are not tensors; {EXPECTED}")
    cleaned = {}
    for name, tensor in state.items():
        while name.startswith(WRAPPER_PREFIXES):  # DDP around a compiled model saves module._orig_mod.
            name = name.split(".", 1)[1]
        if not name.endswith(".attn.bias"):
            cleaned[name] = tensor
    lm_head, wte = cleaned.pop("lm_head.weight", None), cleaned.get("transformer.wte.weight")
    if wte is None:
        raise CheckpointError(f"{path}: its state dict has no transformer.wte.weight; {EXPECTED}")
    if lm_head is not None and not torch.equal(lm_head, wte):
        raise CheckpointError(f"{path}: lm_head.weight differs from transformer.wte.weight; GPTMoE ties them")
    return cleaned


def llmc_layout(Vp: int, maxT: int, L: int, C: int) -> list[tuple[str, tuple[int, ...]]]:
    """The parameters of an llm.c model file in their order (llm.c's fill_in_parameter_sizes), each (out, in) like
    nn.Linear; a name with {} is one tensor stacked over the L layers."""
    layer = [
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
    return [
        ("transformer.wte.weight", (Vp, C)),  # the vocabulary padded to Vp rows
        ("transformer.wpe.weight", (maxT, C)),
        *[(f"transformer.h.{{}}.{name}", (L, *shape)) for name, shape in layer],
        ("transformer.ln_f.weight", (C,)),
        ("transformer.ln_f.bias", (C,)),
    ]


def read_llmc(path: Path) -> DenseCheckpoint:
    header = np.fromfile(path, dtype="<i4", count=LLMC_HEADER_INTS)
    if header.size < LLMC_HEADER_INTS:
        raise CheckpointError(f"{path} ends inside its llm.c header: the file is truncated")
    version, maxT, V, L, NH, C, Vp = header[1:8].tolist()
    if min(maxT, V, L, NH, C) <= 0 or Vp < V:
        raise CheckpointError(f"{path} has a damaged llm.c header: maxT={maxT}, V={V}, Vp={Vp}, L={L}, NH={NH}, C={C}")
    if version not in LLMC_VERSIONS:
        raise CheckpointError(
            f"{path} is an llm.c model file of version {version}; versions 3 (fp32) and 5 (bf16) convert: "
            "export it again with a current llm.c"
        )
    precision, file_dtype, dtype = LLMC_VERSIONS[version]
    layout = llmc_layout(Vp, maxT, L, C)
    sizes = [math.prod(shape) for _, shape in layout]
    values = np.fromfile(path, dtype=file_dtype, offset=4 * LLMC_HEADER_INTS)
    if values.size != sum(sizes):
        raise CheckpointError(
            f"{path} holds {values.size:,} parameters after its header, but its header (maxT={maxT}, Vp={Vp}, L={L}, "
            f"C={C}) needs {sum(sizes):,}: the file is truncated or damaged"
        )
    state = {}
    for (name, shape), flat in zip(layout, torch.from_numpy(values).view(dtype).split(sizes), strict=True):
        tensor = flat.view(shape)
        state.update({name.format(i): t for i, t in enumerate(tensor)} if "{}" in name else {name: tensor})
    # llm.c's softmax covers the V real tokens only (its padded rows stay untrained), so V is its vocabulary;
    # biases, LayerNorm epsilon 1e-5 and the tanh GELU as in GPT-2
    config = dict(vocab_size=V, block_size=maxT, n_layer=L, n_head=NH, n_embd=C)
    config.update(bias=True, dropout=0.0, activation_function="gelu_pytorch_tanh")
    carried = {"version": f"{version} ({precision} parameters)", "vocab_size": V, "padded_vocab_size": Vp}
    return DenseCheckpoint(state, config, f"llm.c's `{path.name}`", carried)
