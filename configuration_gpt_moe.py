"""GPTMoEConfig: GPT-2 (small) by default, with Mixture-of-Experts feed-forward layers."""

from transformers import PretrainedConfig
from transformers.activations import ACT2FN


class GPTMoEConfig(PretrainedConfig):
    r"""
    Configuration of a GPT-2 style decoder whose feed-forward layers may be Mixture-of-Experts.

    The defaults are GPT-2 small (124M when `use_moe=False`). Field names follow nanoGPT
    (`block_size`, `n_layer`, `n_head`, `n_embd`); the usual Hugging Face names (`hidden_size`,
    `num_hidden_layers`, `num_attention_heads`, `max_position_embeddings`, `num_local_experts`,
    `intermediate_size`) are aliases of them.

    MoE fields:
        use_moe: MoE feed-forward layers (False: every layer is the dense GPT-2 MLP).
        num_experts: routed experts per MoE layer.
        num_experts_per_tok: top-k experts each token is sent to.
        moe_intermediate_size: hidden width of each expert (default 4 * n_embd, GPT-2's MLP).
        n_shared_experts: always-on experts (DeepSeekMoE), run as one dense MLP of
            n_shared_experts * moe_intermediate_size and added to the routed output.
        norm_topk_prob: renormalise the top-k router probabilities to sum to one (Mixtral).
            Needed for an upcycled model to start out computing exactly the dense function.
        router_aux_loss_coef: weight of the Switch load-balancing loss (1.0 at perfect balance).
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
    router_aux_loss_coef: float = 0.01
    router_z_loss_coef: float = 0.001
    output_router_logits: bool = False
    mlp_only_layers: list[int] | None = None
    decoder_sparse_step: int = 1

    def __post_init__(self, **kwargs):
        self.n_inner = self.n_inner or 4 * self.n_embd
        self.moe_intermediate_size = self.moe_intermediate_size or 4 * self.n_embd
        self.mlp_only_layers = list(self.mlp_only_layers or [])
        super().__post_init__(**kwargs)
        self.check()
        self.base_model_tp_plan = self.tensor_parallel_plan()

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
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be at least 1, got {self.num_experts}.")
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(
                f"num_experts_per_tok (top-k, {self.num_experts_per_tok}) must be between 1 and "
                f"num_experts ({self.num_experts}): lower num_experts_per_tok or raise num_experts."
            )
        for name in ("router_aux_loss_coef", "router_z_loss_coef", "n_shared_experts", "dropout"):
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

        Vocabulary-parallel embedding, MLPs split Megatron-style, every expert split along its hidden width on
        every rank. Attention stays replicated: transformers' packed styles cannot shard a fused q|k|v with bias.
        Experts' down-projection biases are replicated, so the expert all-reduce counts them once per rank:
        exact for bias-free experts only (README, "Known limitations").
        """
        moe_layers = [self.is_moe_layer(i) for i in range(self.n_layer)]
        plan = {"wte": "embedding_rowwise"}
        if not all(moe_layers):
            plan.update({"h.*.mlp.c_fc": "colwise", "h.*.mlp.c_proj": "rowwise"})
        if any(moe_layers):
            plan.update(
                {
                    "h.*.mlp.experts.up_proj": "colwise",
                    "h.*.mlp.experts.up_proj_bias": "rowwise",  # a parameter, not a Linear: rowwise = Shard(-1)
                    "h.*.mlp.experts.down_proj": "rowwise",
                    "h.*.mlp.experts": "moe_tp_experts",
                }
            )
        if any(moe_layers) and self.n_shared_experts > 0:
            plan.update({"h.*.mlp.shared_experts.c_fc": "colwise", "h.*.mlp.shared_experts.c_proj": "rowwise"})
        return plan

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (
            self.use_moe and layer_idx not in self.mlp_only_layers and (layer_idx + 1) % self.decoder_sparse_step == 0
        )


__all__ = ["GPTMoEConfig"]
