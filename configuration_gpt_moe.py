"""GPTMoEConfig: GPT-2 (small) by default, with Mixture-of-Experts feed-forward layers."""

from transformers import PretrainedConfig
from transformers.activations import ACT2FN
from transformers.distributed import DistributedConfig


class GPTMoEConfig(PretrainedConfig):
    r"""
    Configuration of a GPT-2 style decoder whose feed-forward layers may be Mixture-of-Experts.

    The defaults are GPT-2 small (124M when `use_moe=False`). Field names follow nanoGPT
    (`block_size`, `n_layer`, `n_head`, `n_embd`); the usual Hugging Face names (`hidden_size`,
    `num_hidden_layers`, `num_attention_heads`, `max_position_embeddings`, `num_local_experts`,
    `intermediate_size`) are aliases of them.

    MoE fields:
        use_moe: MoE feed-forward layers (False: every layer is the dense GPT-2 MLP).
        num_experts: routed experts per MoE layer (0 in a model without MoE layers).
        num_experts_per_tok: top-k experts each token is sent to (0 without MoE layers).
        moe_intermediate_size: hidden width of each expert (default 4 * n_embd, GPT-2's MLP).
        n_shared_experts: always-on experts (DeepSeekMoE), run as one dense MLP of
            n_shared_experts * moe_intermediate_size and added to the routed output.
        norm_topk_prob: renormalise the top-k router probabilities to sum to one (Mixtral).
            Needed for an upcycled model to start out computing exactly the dense function.
        routed_scaling_factor: multiplies the routing weights (DeepSeek-V3's name; torchtitan's route_scale).
            With renormalised weights, num_experts_per_tok makes the routed experts add up to a dense MLP of
            their combined width at the start; 1.0 (the default) keeps an upcycled model exact.
        router_aux_loss_coef: weight of the Switch load-balancing loss (1.0 at perfect balance).
        router_aux_loss_scope: "micro_batch" takes the load-balancing loss's expert shares f_i from each
            micro-batch (Switch); "global_batch" from every process and micro-step of the optimizer step so far
            (Qwen, arXiv 2501.11873; Megatron-LM's global_aux_loss), which lets experts specialise.
        router_bias_update_rate: aux-loss-free balancing (DeepSeek-V3): a per-expert bias added to the router
            probabilities to choose the top-k only, moved by this much towards balance after every optimizer
            step (`GPTMoEForCausalLM.finish_step`). 0.0 turns it off; DeepSeek-V3 uses 1e-3.
        router_z_loss_coef: weight of the router z-loss (ST-MoE).
        output_router_logits: return the router logits of every MoE layer.
        mlp_only_layers: indices of layers that keep a dense MLP.
        decoder_sparse_step: every `decoder_sparse_step`-th layer is MoE (1: all of them).
    """

    model_type = "gpt_moe"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]  # the KV cache, named so from 5.24 on and before
    attribute_map = {
        "hidden_size": "n_embd",
        "num_hidden_layers": "n_layer",
        "num_attention_heads": "n_head",
        "max_position_embeddings": "block_size",
        "num_local_experts": "num_experts",
        "intermediate_size": "n_inner",
    }
    vocab_size: int = 50257
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_inner: int | None = None
    dropout: float = 0.0
    bias: bool = True
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_pytorch_tanh"
    initializer_range: float = 0.02
    use_cache: bool = True
    bos_token_id: int | None = 50256
    eos_token_id: int | None = 50256
    pad_token_id: int | None = None
    tie_word_embeddings: bool = True

    use_moe: bool = True
    num_experts: int = 8
    num_experts_per_tok: int = 2
    moe_intermediate_size: int | None = None
    n_shared_experts: int = 0
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    router_aux_loss_coef: float = 0.01
    router_aux_loss_scope: str = "micro_batch"
    router_bias_update_rate: float = 0.0
    router_z_loss_coef: float = 0.001
    output_router_logits: bool = False
    mlp_only_layers: list[int] | None = None
    decoder_sparse_step: int = 1

    def __post_init__(self, **kwargs):
        self.n_inner = self.n_inner or 4 * self.n_embd
        self.moe_intermediate_size = self.moe_intermediate_size or 4 * self.n_embd
        self.mlp_only_layers = list(self.mlp_only_layers or [])
        if not self.has_moe_layers():
            # a dense model has no experts: serving engines (vLLM) take any num_experts > 0 for a MoE
            self.num_experts = self.num_experts_per_tok = 0
        super().__post_init__(**kwargs)
        self.check()
        self.base_model_tp_plan = self.tensor_parallel_plan()
        self.base_model_ep_plan = self.expert_parallel_plan()

    def check(self) -> None:
        """Raise a ValueError naming the offending field and the fix."""
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}): choose an n_head that "
                "divides n_embd (GPT-2 uses heads of 64: n_head = n_embd / 64)."
            )
        if self.activation_function not in ACT2FN:
            raise ValueError(
                f"activation_function={self.activation_function!r} is unknown: use a key of "
                "transformers.activations.ACT2FN, e.g. 'gelu_pytorch_tanh' (GPT-2's tanh GELU) or 'gelu'."
            )
        if self.has_moe_layers() and self.num_experts < 1:
            raise ValueError(f"num_experts must be at least 1, got {self.num_experts}.")
        if self.has_moe_layers() and not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(
                f"num_experts_per_tok (top-k, {self.num_experts_per_tok}) must be between 1 and "
                f"num_experts ({self.num_experts}): lower num_experts_per_tok or raise num_experts."
            )
        if self.router_aux_loss_scope not in ("micro_batch", "global_batch"):
            raise ValueError(
                f"router_aux_loss_scope must be 'micro_batch' or 'global_batch', got {self.router_aux_loss_scope!r}."
            )
        nonnegative = ("router_aux_loss_coef", "router_z_loss_coef", "router_bias_update_rate", "n_shared_experts")
        if self.routed_scaling_factor <= 0:
            raise ValueError(f"routed_scaling_factor must be > 0, got {self.routed_scaling_factor}.")
        for name in (*nonnegative, "dropout"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}; use 0 to disable it.")
        if self.decoder_sparse_step < 1:
            raise ValueError(f"decoder_sparse_step must be >= 1, got {self.decoder_sparse_step}.")
        bad_layers = [i for i in self.mlp_only_layers if not 0 <= i < self.n_layer]
        if bad_layers:
            raise ValueError(
                f"mlp_only_layers {bad_layers} are not layer indices: use values in 0..{self.n_layer - 1}."
            )

    def tensor_parallel_plan(self) -> dict[str, str]:
        """The plan of `from_pretrained(..., tp_plan="auto")`, naming only the modules this config builds.

        Vocabulary-parallel embedding; dense MLPs and shared experts split Megatron-style (rowwise adds its bias once,
        after the all-reduce). Attention stays replicated: splitting GPT-2's fused q|k|v by head needs a three-way
        packed style, and transformers' packed_colwise splits two ways and shards a packed bias contiguously. The
        routed experts stay whole too: transformers' moe_tp_experts all-reduces each expert's output, so a bias
        replicated on every rank would be added once per rank. `expert_parallel_plan` shards them, by expert.
        """
        moe_layers = [self.is_moe_layer(i) for i in range(self.n_layer)]
        plan = {"wte": "embedding_rowwise"}
        if not all(moe_layers):
            plan.update({"h.*.mlp.c_fc": "colwise", "h.*.mlp.c_proj": "rowwise"})
        if any(moe_layers) and self.n_shared_experts > 0:
            plan.update({"h.*.mlp.shared_experts.c_fc": "colwise", "h.*.mlp.shared_experts.c_proj": "rowwise"})
        return plan

    def expert_parallel_plan(self) -> dict[str, str]:
        """The plan of transformers' expert parallelism: each rank holds num_experts / ep_size whole experts, biases
        included (README, "Parallelism").

        transformers with `DistributedConfig(ep_size=...)` (5.2x) sends each rank the tokens routed to its experts;
        before (5.17, `enable_expert_parallel=True`) the router's choices of other ranks' experts were masked on each
        rank and the experts' outputs all-reduced.
        """
        if not self.has_moe_layers():
            return {}
        weights = ("up_proj", "up_proj_bias", "down_proj", "down_proj_bias")
        plan = {f"h.*.mlp.experts.{name}": "grouped_gemm" for name in weights}
        if "ep_size" in DistributedConfig.__dataclass_fields__:
            return {**plan, "h.*.mlp.experts": "ep_dispatch_experts"}
        return {**plan, "h.*.mlp.router": "ep_router", "h.*.mlp.experts": "moe_tp_experts"}

    def has_moe_layers(self) -> bool:
        return any(self.is_moe_layer(i) for i in range(self.n_layer))

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (
            self.use_moe and layer_idx not in self.mlp_only_layers and (layer_idx + 1) % self.decoder_sparse_step == 0
        )


__all__ = ["GPTMoEConfig"]
