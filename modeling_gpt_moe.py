"""GPT-2 with Mixture-of-Experts feed-forward layers, as a Hugging Face Transformers model.

Classes in the order data flows through them: attention, dense MLP, router, experts, MoE
block, transformer block, the base model and the causal-LM head. Weight names follow GPT-2
(`wte`, `wpe`, `h.N.attn.c_attn`, `ln_f`, ...) so converting OpenAI's checkpoint is a list of
transposes. This file travels with every checkpoint as remote code: it imports only torch,
transformers and the config file.
"""

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.integrations import use_experts_implementation
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple, logging
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

try:  # a helper of the output capturing, not its interface: without it the hooks come at the first recording call
    from transformers.utils.output_capturing import maybe_install_capturing_hooks
except ImportError:
    maybe_install_capturing_hooks = None

try:
    from .configuration_gpt_moe import GPTMoEConfig
except ImportError:  # imported from the repository root rather than as remote code
    from configuration_gpt_moe import GPTMoEConfig

# transformers 5.24 renamed the KV cache from `past_key_values` to `cache`: the argument generate() passes, the
# output field it reads back and create_causal_mask's argument. The forwards accept either name; the cache goes back
# to transformers under the installed version's name.
CACHE_NAME = "cache" if "cache" in MoeModelOutputWithPast.__dataclass_fields__ else "past_key_values"

logger = logging.get_logger(__name__)


def either_cache(cache: Cache | None, past_key_values: Cache | None) -> Cache | None:
    """The KV cache, passed as `cache` (transformers 5.24 on) or as `past_key_values` (before)."""
    if cache is not None and past_key_values is not None:
        raise ValueError("Pass the KV cache as `cache` or as `past_key_values`, not both.")
    return cache if cache is not None else past_key_values


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling  # (B, nh, T, S)
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()  # (B, T, nh, hs)
    return attn_output, attn_weights


class GPTMoEAttention(nn.Module):
    """Causal self-attention, dispatched to transformers' attention backends (sdpa, flash, flex, eager)."""

    def __init__(self, config: GPTMoEConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.n_embd // config.n_head
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.is_residual_projection = True
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch_size, seq_len, _ = hidden_states.shape
        head_shape = (batch_size, seq_len, -1, self.head_dim)
        query, key, value = self.c_attn(hidden_states).chunk(3, dim=2)  # chunk, not split: TP shards heads
        query = query.view(head_shape).transpose(1, 2)  # (B, nh, T, hs)
        key = key.view(head_shape).transpose(1, 2)
        value = value.view(head_shape).transpose(1, 2)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.config.dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(batch_size, seq_len, -1)  # (B, T, C)
        return self.resid_dropout(self.c_proj(attn_output)), attn_weights


class GPTMoEMLP(nn.Module):
    """GPT-2's feed-forward network; also the always-on shared experts of a MoE layer."""

    def __init__(self, config: GPTMoEConfig, intermediate_size: int):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, intermediate_size, bias=config.bias)
        self.act = ACT2FN[config.activation_function]
        self.c_proj = nn.Linear(intermediate_size, config.n_embd, bias=config.bias)
        self.c_proj.is_residual_projection = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(hidden_states))))


class GPTMoERouter(nn.Module):
    """Token-choice top-k router: softmax over experts in (at least) float32, keep the k largest.

    `expert_bias` (aux-loss-free balancing, DeepSeek-V3) is added to the probabilities to choose the
    k experts only: the routing weights are the unbiased probabilities of the chosen ones. It is
    zero unless `GPTMoEForCausalLM.finish_step` moves it, so a converted model stays exact.
    Returns the raw logits (N, E), the routing weights (N, k) and the chosen experts (N, k).
    """

    def __init__(self, config: GPTMoEConfig):
        super().__init__()
        self.num_experts = config.num_experts  # read by the expert-parallel router style of transformers 5.17
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.n_embd))
        self.register_buffer("expert_bias", torch.zeros(config.num_experts))

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        router_logits = F.linear(hidden_states, self.weight)  # (N, E)
        # at least float32: bf16 probabilities would make near-ties between experts flip at random
        router_probs = F.softmax(router_logits, dim=-1, dtype=torch.promote_types(router_logits.dtype, torch.float32))
        top_k_index = self.choose(router_probs)
        top_k_weights = router_probs.gather(-1, top_k_index)
        if self.norm_topk_prob:
            top_k_weights = top_k_weights / top_k_weights.sum(dim=-1, keepdim=True)
        top_k_weights = top_k_weights * self.routed_scaling_factor
        return router_logits, top_k_weights.to(hidden_states.dtype), top_k_index

    def choose(self, router_probs: torch.Tensor) -> torch.Tensor:
        """The (N, k) experts each token goes to: the k largest biased probabilities."""
        return torch.topk(router_probs + self.expert_bias, self.top_k, dim=-1).indices


@use_experts_implementation(has_gate=False, has_bias=True)
class GPTMoEExperts(nn.Module):
    """E GPT-2 MLPs stored as 3D tensors, so `experts_implementation` can pick grouped GEMMs.

    This forward is the "eager" implementation: tokens are sorted by expert once, each expert
    runs one dense MLP over its contiguous slice, and results are put back in token order.
    No token is ever dropped (no capacity factor).
    """

    def __init__(self, config: GPTMoEConfig):
        super().__init__()
        self.num_experts = config.num_experts
        hidden, intermediate = config.n_embd, config.moe_intermediate_size
        self.up_proj = nn.Parameter(torch.empty(self.num_experts, intermediate, hidden))
        self.up_proj_bias = nn.Parameter(torch.empty(self.num_experts, intermediate))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, hidden, intermediate))
        self.down_proj_bias = nn.Parameter(torch.empty(self.num_experts, hidden))
        self.act_fn = ACT2FN[config.activation_function]

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        num_tokens, top_k = top_k_index.shape
        expert_ids = top_k_index.reshape(-1)  # (N*k,)
        order = torch.argsort(expert_ids, stable=True)
        # one slot more than experts: expert parallelism gives the routes to other ranks' experts the id num_experts
        # (and weight 0); sorted last, they get a zero output
        tokens_per_expert = torch.bincount(expert_ids, minlength=self.num_experts + 1).tolist()
        # index_select, not hidden_states[...]: its backward is an index_add, several times faster on CPU
        routed = hidden_states.index_select(0, order // top_k).split(tokens_per_expert)  # E + 1 slices of (n_e, H)
        expert_outputs = [*self.expert_mlps(routed[:-1]), torch.zeros_like(routed[-1])]
        sorted_outputs = torch.cat(expert_outputs) * top_k_weights.reshape(-1)[order, None]
        outputs = sorted_outputs.new_empty(sorted_outputs.shape).index_copy(0, order, sorted_outputs)
        return outputs.view(num_tokens, top_k, -1).sum(dim=1).to(hidden_states.dtype)  # (N, H)

    def expert_mlps(self, routed: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        """Expert e's MLP applied to routed[e], the (n_e, H) tokens sent to it."""
        # unbind, not up_proj[e]: indexing in the loop makes backward build E zero-filled (E, I, H) gradients
        weights = (
            self.up_proj.unbind(),
            self.up_proj_bias.unbind(),
            self.down_proj.unbind(),
            self.down_proj_bias.unbind(),
        )
        return [
            F.linear(self.act_fn(F.linear(x, up, up_bias)), down, down_bias)
            for x, up, up_bias, down, down_bias in zip(routed, *weights, strict=True)
        ]


class GPTMoESparseMoeBlock(nn.Module):
    """Router + routed experts (+ optional shared experts). The router logits are recorded from the router."""

    def __init__(self, config: GPTMoEConfig):
        super().__init__()
        self.router = GPTMoERouter(config)
        self.experts = GPTMoEExperts(config)
        self.shared_experts = (
            GPTMoEMLP(config, config.n_shared_experts * config.moe_intermediate_size)
            if config.n_shared_experts > 0
            else None
        )
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch_size, seq_len, hidden_dim = hidden_states.shape
        flat = hidden_states.view(-1, hidden_dim)  # (N, H)
        _, top_k_weights, top_k_index = self.router(flat)
        output = self._run_experts(flat, top_k_index, top_k_weights)
        if self.shared_experts is not None:
            output = output + self.shared_experts(flat)
        return self.dropout(output.view(batch_size, seq_len, hidden_dim))

    def _run_experts(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        # Autocast does not cover transformers' grouped GEMMs: they would run in the float32 weights' dtype
        # (on CUDA a slow per-expert fallback). Cast the weights as autocast casts nn.Linear's: float32 only.
        # Meta tensors have no autocast state; torch.amp.is_autocast_available, which would say so, breaks
        # torch.compile's graph in torch 2.11.
        device_type = hidden_states.device.type
        if (
            self.experts.up_proj.dtype != torch.float32
            or hidden_states.is_meta
            or not torch.is_autocast_enabled(device_type)
        ):
            return self.experts(hidden_states, top_k_index, top_k_weights)
        compute_dtype = torch.get_autocast_dtype(device_type)
        weights = {name: param.to(compute_dtype) for name, param in self.experts.named_parameters()}
        return torch.func.functional_call(self.experts, weights, (hidden_states, top_k_index, top_k_weights))


class GPTMoEBlock(GradientCheckpointingLayer):
    """Pre-LayerNorm GPT-2 block whose MLP is dense or a sparse MoE block."""

    def __init__(self, config: GPTMoEConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.attn = GPTMoEAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        is_moe = config.is_moe_layer(layer_idx)
        self.mlp = GPTMoESparseMoeBlock(config) if is_moe else GPTMoEMLP(config, config.n_inner)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        hidden_states = hidden_states + self.attn(self.ln_1(hidden_states), attention_mask, cache, **kwargs)[0]
        return hidden_states + self.mlp(self.ln_2(hidden_states))


class GPTMoEPreTrainedModel(PreTrainedModel):
    config: GPTMoEConfig
    config_class = GPTMoEConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["GPTMoEBlock"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True  # tests/test_modeling.py compiles static-cache decoding with fullgraph=True
    # what output_router_logits / output_hidden_states / output_attentions return, recorded by forward hooks
    _can_record_outputs = {
        "router_logits": OutputRecorder(GPTMoERouter, index=0),
        "hidden_states": GPTMoEBlock,
        "attentions": GPTMoEAttention,
    }

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # GPT-2: N(0, 0.02) everywhere, residual projections scaled by 1/sqrt(2 * n_layer)
        # because each block adds two of them to the residual stream.
        std = self.config.initializer_range
        residual_std = std / math.sqrt(2 * self.config.n_layer)
        if isinstance(module, nn.Linear):
            init.normal_(
                module.weight, mean=0.0, std=residual_std if getattr(module, "is_residual_projection", False) else std
            )
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, GPTMoERouter):
            init.normal_(module.weight, mean=0.0, std=std)
            init.zeros_(module.expert_bias)
        elif isinstance(module, GPTMoEExperts):
            init.normal_(module.up_proj, mean=0.0, std=std)
            init.zeros_(module.up_proj_bias)
            init.normal_(module.down_proj, mean=0.0, std=residual_std)
            init.zeros_(module.down_proj_bias)

    def save_pretrained(self, save_directory, *args, **kwargs):
        # transformers names only the saved class and the config in config.json's auto_map; serving engines (vLLM's
        # Transformers backend) build the base model with AutoModel, so every folder names all three
        self.config.auto_map = {
            auto_class: f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}"
            for auto_class, cls in (
                ("AutoConfig", type(self.config)),
                ("AutoModel", GPTMoEModel),
                ("AutoModelForCausalLM", GPTMoEForCausalLM),
            )
        }
        return super().save_pretrained(save_directory, *args, **kwargs)


class GPTMoEModel(GPTMoEPreTrainedModel):
    def __init__(self, config: GPTMoEConfig):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList([GPTMoEBlock(config, i) for i in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.gradient_checkpointing = False
        self.post_init()
        # now rather than at the first call that records outputs: installing them inside torch.compile (a training
        # step records the router logits) breaks the graph
        if maybe_install_capturing_hooks is not None:
            maybe_install_capturing_hooks(self)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.wte

    def set_input_embeddings(self, new_embeddings: nn.Embedding) -> None:
        self.wte = new_embeddings

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        past_key_values: Cache | None = None,  # the name of `cache` before transformers 5.24
        **kwargs: Unpack[TransformersKwargs],
    ) -> MoeModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        cache = either_cache(cache, past_key_values)
        if cache is not None and self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            # the backward pass reruns each block, which would write its keys and values to the cache again
            logger.warning_once("Gradient checkpointing is on while training: the KV cache is not used.")
            cache = None
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)

        if inputs_embeds is None:
            inputs_embeds = self.wte(input_ids)
        if position_ids is None:
            past_seen = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device).unsqueeze(0) + past_seen
        hidden_states = self.drop(inputs_embeds + self.wpe(position_ids))  # (B, T, C)

        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **{CACHE_NAME: cache},
        )
        for block in self.h:
            hidden_states = block(hidden_states, causal_mask, cache=cache, position_ids=position_ids, **kwargs)
        return MoeModelOutputWithPast(last_hidden_state=self.ln_f(hidden_states), **{CACHE_NAME: cache})


def token_mean(values: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over the tokens (dim 0) of `values`, leaving out padding (token_mask 0)."""
    if token_mask is None:
        return values.mean(dim=0)
    weights = token_mask.to(values.dtype).view(-1, *[1] * (values.dim() - 1))
    return (values * weights).sum(dim=0) / weights.sum().clamp(min=1.0)


def load_balancing_loss(
    router_logits: tuple[torch.Tensor, ...],
    top_k: int,
    token_mask: torch.Tensor | None = None,
    assignment_shares: torch.Tensor | None = None,
) -> torch.Tensor:
    """Switch Transformer load-balancing loss, averaged over MoE layers; 1.0 at perfect balance.

    Per layer: E * sum_i f_i * P_i, with f_i the share of the N*k routing assignments that went
    to expert i and P_i the mean router probability of expert i. Padding tokens (token_mask 0)
    are left out. `assignment_shares` (L, E) gives f from elsewhere (a global batch, a biased
    choice); by default it is this batch's top-k. Unlike transformers' built-in
    `load_balancing_loss_func` (which returns k at balance and pools layers before the product),
    this is comparable across top-k settings.
    """
    layer_losses = []
    for layer, logits in enumerate(router_logits):
        num_experts = logits.shape[-1]
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)  # (N, E)
        if assignment_shares is None:
            chosen = F.one_hot(torch.topk(probs, top_k, dim=-1).indices, num_experts).sum(dim=1).float()  # (N, E)
            shares = token_mean(chosen, token_mask) / top_k
        else:
            shares = assignment_shares[layer]
        layer_losses.append(num_experts * torch.sum(shares * token_mean(probs, token_mask)))
    return torch.stack(layer_losses).mean()


def assignment_counts(
    router_logits: tuple[torch.Tensor, ...], routers: list["GPTMoERouter"], token_mask: torch.Tensor | None
) -> torch.Tensor:
    """(L, E): how many top-k assignments of real tokens (token_mask 1) each MoE layer gave each expert."""
    counts = []
    for logits, router in zip(router_logits, routers, strict=True):
        chosen = router.choose(F.softmax(logits.detach(), dim=-1, dtype=torch.float32))  # (N, k)
        weights = torch.ones(chosen.shape, device=chosen.device) if token_mask is None else token_mask.float()[:, None]
        zeros = torch.zeros(logits.shape[-1], device=chosen.device)
        counts.append(zeros.scatter_add(0, chosen.flatten(), weights.expand(chosen.shape).flatten()))
    return torch.stack(counts)


def router_z_loss(router_logits: tuple[torch.Tensor, ...], token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2, averaged over MoE layers."""
    z_per_layer = [token_mean(torch.logsumexp(logits.float(), dim=-1) ** 2, token_mask) for logits in router_logits]
    return torch.stack(z_per_layer).mean()


def all_processes_sum(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` summed over the processes of the default group (data parallelism), as a new tensor."""
    total = tensor.clone()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total)
    return total


@dataclass
class GPTMoECausalLMOutputWithPast(MoeCausalLMOutputWithPast):
    """MoeCausalLMOutputWithPast plus `z_loss`, the router z-loss (unweighted) when computed."""

    z_loss: torch.FloatTensor | None = None


class GPTMoEForCausalLM(GPTMoEPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: GPTMoEConfig):
        super().__init__(config)
        self.transformer = GPTMoEModel(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # (L, E) top-k assignments of this optimizer step so far, this process only (see finish_step). Not a
        # buffer: DDP would overwrite every process's counts with rank 0's at each forward.
        self.routed_tokens: torch.Tensor | None = None
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        shift_labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Cache | None = None,  # the name of `cache` before transformers 5.24
        **kwargs: Unpack[TransformersKwargs],
    ) -> GPTMoECausalLMOutputWithPast:
        r"""
        labels: token ids, shifted inside (HF convention); -100 positions are ignored.
        shift_labels: targets already aligned with the inputs (y of a packed pretraining batch (x, y)).
        With either, the loss includes `router_aux_loss_coef * aux_loss + router_z_loss_coef * z_loss`
        whatever `output_router_logits` says.
        """
        output_router_logits = (
            self.config.output_router_logits if output_router_logits is None else output_router_logits
        )
        has_targets = labels is not None or shift_labels is not None
        outputs = self.transformer(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_router_logits=output_router_logits or has_targets,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])

        loss = aux_loss = z_loss = None
        if has_targets:
            loss = self.loss_function(logits, labels, self.config.vocab_size, shift_labels=shift_labels, **kwargs)
        if outputs.router_logits:  # None when not recorded, () for a dense model
            self._check_router_logits_carry_gradients(outputs.router_logits[0])
            token_mask = self._router_token_mask(attention_mask, outputs.router_logits[0].shape[0])
            counts = assignment_counts(outputs.router_logits, self.routers(), token_mask)
            if self.training:  # the step's load, for finish_step
                self.routed_tokens = counts if self.routed_tokens is None else self.routed_tokens + counts
            shares = self._expert_shares(counts)
            aux_loss = load_balancing_loss(outputs.router_logits, self.config.num_experts_per_tok, token_mask, shares)
            z_loss = router_z_loss(outputs.router_logits, token_mask)
            if has_targets:
                loss = loss + self.config.router_aux_loss_coef * aux_loss + self.config.router_z_loss_coef * z_loss

        return GPTMoECausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            z_loss=z_loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=(outputs.router_logits or None) if output_router_logits else None,
            **{CACHE_NAME: getattr(outputs, CACHE_NAME)},
        )

    def routers(self) -> list[GPTMoERouter]:
        """The router of each MoE layer, in layer order (the order of the recorded router logits)."""
        return [module for module in self.modules() if isinstance(module, GPTMoERouter)]

    def _expert_shares(self, counts: torch.Tensor) -> torch.Tensor:
        """f_i of the load-balancing loss, (L, E): from this batch's `counts` (micro_batch scope, and always in
        evaluation), or from every process's and micro-step's of the optimizer step so far (global_batch scope)."""
        if self.training and self.config.router_aux_loss_scope == "global_batch":
            counts = all_processes_sum(self.routed_tokens)
        return counts / counts.sum(dim=-1, keepdim=True).clamp(min=1.0)

    @torch.no_grad()
    def finish_step(self, update_bias: bool = True) -> torch.Tensor | None:
        """Call after each optimizer step: the step's (L, E) top-k assignments summed over all processes (None before
        any training forward), which also moves each router's expert_bias towards balance (aux-loss-free,
        DeepSeek-V3: bias_i += rate * sign(mean load - load_i), centred as torchtitan does) unless `update_bias` is
        False (a skipped step) or router_bias_update_rate is 0. Starts the next step's count."""
        counts, self.routed_tokens = self.routed_tokens, None
        if counts is None:
            return None
        counts = all_processes_sum(counts)
        rate = self.config.router_bias_update_rate
        if update_bias and rate > 0:
            for router, load in zip(self.routers(), counts, strict=True):
                step = rate * torch.sign(load.mean() - load)
                router.expert_bias += step - step.mean()
        return counts

    def _check_router_logits_carry_gradients(self, router_logits: torch.Tensor) -> None:
        """Reentrant activation checkpointing (use_reentrant=True) runs each block without autograd, so the router
        logits recorded inside it carry no gradient: the router losses would silently not train the routers."""
        if router_logits.requires_grad or not torch.is_grad_enabled():
            return
        routers = [module for module in self.modules() if isinstance(module, GPTMoERouter)]
        if any(router.weight.requires_grad for router in routers):
            raise ValueError(
                "The router logits carry no gradient, so the load-balancing and z-losses would not train the "
                "routers: this happens under reentrant activation checkpointing. Enable checkpointing with "
                "use_reentrant=False (transformers' default) in its kwargs."
            )

    @staticmethod
    def _router_token_mask(attention_mask: torch.Tensor | None, num_tokens: int) -> torch.Tensor | None:
        """Which routed tokens are real (not padding): the last T columns of a 2D attention mask."""
        if attention_mask is None or attention_mask.dim() != 2:
            return None
        batch_size = attention_mask.shape[0]
        return attention_mask[:, -(num_tokens // batch_size) :].reshape(-1)


GPTMoEConfig.register_for_auto_class()
GPTMoEModel.register_for_auto_class("AutoModel")
GPTMoEForCausalLM.register_for_auto_class("AutoModelForCausalLM")
# Importing this module is enough to use the Auto classes without trust_remote_code.
AutoConfig.register(GPTMoEConfig.model_type, GPTMoEConfig, exist_ok=True)
AutoModel.register(GPTMoEConfig, GPTMoEModel, exist_ok=True)
AutoModelForCausalLM.register(GPTMoEConfig, GPTMoEForCausalLM, exist_ok=True)
# generate() calls inspect.signature(model.forward) at every step for remote-code models (to look for the old
# cache_position argument); working it out anew is 2-3% of decoding on CPU. Stored on the undecorated function,
# so wrappers that copy forward's attributes (accelerate's hooks) still drop `self` from their signature.
_undecorated_forward = inspect.unwrap(GPTMoEForCausalLM.forward)
_undecorated_forward.__signature__ = inspect.signature(_undecorated_forward)

__all__ = ["GPTMoEForCausalLM", "GPTMoEModel", "GPTMoEPreTrainedModel"]
