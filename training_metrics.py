"""What the training loop measures besides the loss: model FLOPs utilisation and MoE expert load."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# Dense bf16 tensor-core peak FLOP/s, keyed by a substring of torch.cuda.get_device_name(); first match wins.
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("A100", 312e12),
)


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak FLOP/s, or None when unknown (CPUs, unlisted GPUs: pass --peak_tflops)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)


def active_parameters(model: nn.Module) -> float:
    """Parameters one token is multiplied with: all of them except the position embeddings (a table
    lookup) and, in each MoE layer, the routed experts the token is not sent to (E - k of E)."""
    config = model.config
    active = 0.0
    for name, param in model.named_parameters():
        if name.endswith("wpe.weight"):
            continue
        share = config.num_experts_per_tok / config.num_experts if ".experts." in name else 1.0
        active += share * param.numel()
    return active


def flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Training FLOPs per token, counted as in PaLM (appendix B) and nanoGPT's `estimate_mfu`:

        6 * N_active + 12 * n_layer * n_embd * seq_len

    6 * N_active: each active weight costs one multiply-add (2 FLOPs) forward and two backward.
    12 * L * C * T: attention scores Q K^T and the weighted sum A V, 2 * C * T FLOPs each per token
    and layer forward, times 3 for forward + backward, over the full T x T matrix (causal masking
    is not discounted, as in PaLM).
    """
    config = model.config
    return 6 * active_parameters(model) + 12 * config.n_layer * config.n_embd * seq_len


@dataclass
class ExpertLoad:
    """Routing of one MoE layer over an evaluation pass."""

    fractions: list[float]  # share of the N*k top-k assignments that went to each expert; sums to 1
    max_over_mean: float  # 1.0 when perfectly balanced, E when one expert takes everything
    router_entropy: float  # mean entropy (nats) of a token's router distribution; ln(E) is uniform


def router_statistics(router_logits: tuple[torch.Tensor, ...], assignments: torch.Tensor) -> torch.Tensor:
    """Sums to accumulate over batches (and ranks): (L, E + 1) with, per MoE layer, how many top-k
    assignments each expert got (`assignments`, (L, E): modeling_gpt_moe.assignment_counts), then the
    router entropy summed over tokens."""
    entropies = []
    for logits in router_logits:  # (N, E) per layer
        log_probs = F.log_softmax(logits.float(), dim=-1)
        entropies.append(-(log_probs.exp() * log_probs).sum())
    return torch.cat([assignments, torch.stack(entropies)[:, None]], dim=1)


def expert_load(statistics: torch.Tensor, top_k: int) -> list[ExpertLoad]:
    """Per-layer expert load from summed `router_statistics`."""
    layers = []
    for row in statistics.tolist():
        counts, entropy_sum = row[:-1], row[-1]
        assignments = sum(counts)
        fractions = [count / assignments for count in counts]
        layers.append(
            ExpertLoad(
                fractions=fractions,
                max_over_mean=max(fractions) * len(fractions),
                router_entropy=entropy_sum / (assignments / top_k),
            )
        )
    return layers
