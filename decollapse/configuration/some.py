"""Configuration of ``some``: a transformer whose feed-forward is a library of frozen random expert FFNs,
addressed through a key store that heuristics ("Knowledge Gravity") move instead of gradients."""

from __future__ import annotations

from typing import ClassVar

from .config_utils import DecollapseConfig


class SomeConfig(DecollapseConfig):
    r"""Configuration of the Self-Organizing Mixture of Experts (SoME).

    Each block is the dense control's attention followed by a SoME layer: a trainable query network maps
    the token to a unit query ``q``; the ``num_experts_per_tok`` experts whose keys score highest (``q · k``)
    run and their outputs are mixed by ``softmax(scores / router_temperature)``. Expert weights are frozen at their
    random initialisation; the keys are moved once per optimizer step by Knowledge Gravity (or, as
    controls, by gradients or not at all).

    The defaults train on the embedded corpus in a few CPU minutes and keep more than 95% of the
    parameters frozen (128 experts of width 128 in each of 2 layers at d=64, 2 per token). By default the
    keys stay frozen and the sign-of-load bias balances them: on the embedded corpus (3 paired seeds) that
    kept every layer's usage Gini below 0.3 with no dead expert, where Knowledge Gravity
    (``key_update="gravity", balance="none"``, the public design) left it at 0.42-0.53 and did not train a
    better model (docs/SOME.md).

    Args:
        num_attention_heads: heads per layer (the dense control's attention block).
        attention_dropout: dropout on attention probabilities during training.
        num_experts: experts per layer (N).
        expert_intermediate_size: hidden width of each frozen expert FFN (d_ffn).
        num_experts_per_tok: experts that run per token (top-k; named as in Mixtral's config, because
            ``top_k`` in a model config is read as a sampling flag by ``generate()``).
        key_size: width of keys and queries; ``None`` means ``hidden_size``.
        query_network: ``"linear"`` (one Linear, the public v2) or ``"mlp"`` (Linear → GELU → Linear).
        query_hidden_size: hidden width of the ``mlp`` query network; ``None`` means ``hidden_size``.
        router_temperature: softmax temperature of the gates in training.
        router_eval_temperature: softmax temperature of the gates in evaluation and generation. Explicit on
            purpose: the public v2 trains at 0.8 and evaluates at 0.5, which scores a model at a setting
            it never trained at; our default is the training value.
        init_method: frozen expert initialisation: ``"default"`` (nn.Linear's uniform ±1/√fan_in),
            ``"orthogonal"`` or ``"sparse"`` (normal with std 1/√fan_in, then a share ``init_sparsity`` of
            each column zeroed, as ``torch.nn.init.sparse_``).
        init_sparsity: zeroed share of each weight column with ``init_method="sparse"``, in [0, 1).
        key_update: how keys move: ``"frozen"`` (never; the default), ``"gravity"`` (Knowledge Gravity,
            below) or ``"gradient"`` (keys are parameters trained by backpropagation: an ordinary learned
            router).
        alpha: attraction step size: a selected key moves toward the queries it served. 0.01 by default:
            on the embedded corpus (3 seeds, paired) it beat 0.1 on validation perplexity on every seed,
            our reading: keys that move ten times less give the query network a steadier target (docs/SOME.md).
        alpha_rule: ``"mean"``: ``k ← k + α (q̄ − k)`` with q̄ the gate-weighted mean query the expert
            served this step; ``"damped_sum"`` (the public v2): ``k ← k + α / (1 + c̄) Σ_t (q_t − k)``
            summed over the tokens it served, with c̄ the expert's usual count per step (usage EMA × tokens).
        beta: co-activation step size: a key moves toward the mean of the keys selected with it.
        delta: shrink factor of ``forget_rule="shrink"`` (a forgotten key is multiplied by ``1 − δ``).
        use_alpha, use_beta, use_delta: switch each force off (ablations).
        ema_decay: decay of the per-expert usage EMA (share of tokens routed to the expert per step).
        forgetting_threshold: an expert is forgotten when its usage EMA falls below this fraction of
            the uniform share ``num_experts_per_tok / num_experts`` (scale-free across N; the public v2 used
            the 5th percentile of usage).
        forget_rule: ``"restart"``: a forgotten key is re-seeded at the step's worst-served query (the
            VQ-codebook dead-code restart; worst-served = lowest best score, which is the same on one
            process and on many) and its usage reset to the uniform share; ``"shrink"`` (the public
            v2): the key is multiplied by ``1 − δ`` and becomes less reachable.
        balance: ``"bias_sign"`` (the default) or ``"none"``. ``bias_sign`` is the auxiliary-loss-free
            balancing of DeepSeek-V3, a per-expert bias added to the scores for selection only, moved by
            ``balance_rate`` against the sign of the expert's load error after each step.
        balance_rate: step of the ``bias_sign`` balance (u in Wang et al. 2024).
        key_search: how evaluation and generation find the top-k keys: ``"exact"`` (a matmul and a
            top-k over every key; the default) or an approximate FAISS index over the keys (and the
            balance bias, as one more coordinate): ``"faiss_flat"`` (exhaustive, exact up to ties),
            ``"faiss_ivf"`` (inverted lists) or ``"faiss_hnsw"`` (a navigable small-world graph). Needs
            the ``ann`` extra. Training always searches exactly, since the keys or the bias move after
            every step; the index is built on first use and rebuilt whenever they have moved. Gates are
            the exact softmax of the found keys' scores, so ``num_experts_per_tok`` must be at least 2 (one
            expert's gate normalises over every key's score). ``benchmarks/some_search.py`` measures
            when an index pays (docs/SOME.md: on a 2-core CPU, from 16,384 keys, and there the exhaustive
            ``faiss_flat``).
        key_search_nprobe: inverted lists ``faiss_ivf`` visits per query (of ``min(4√N, N/39)``).
        key_search_ef: candidate list size of ``faiss_hnsw``'s search (efSearch; the graph has 32 links
            per node).
    """

    model_type = "decollapse_some"
    aux_loss_weight_fields: ClassVar[dict[str, str]] = {}
    QUERY_NETWORKS: ClassVar[tuple[str, ...]] = ("linear", "mlp")
    INIT_METHODS: ClassVar[tuple[str, ...]] = ("default", "orthogonal", "sparse")
    KEY_UPDATES: ClassVar[tuple[str, ...]] = ("gravity", "gradient", "frozen")
    ALPHA_RULES: ClassVar[tuple[str, ...]] = ("mean", "damped_sum")
    FORGET_RULES: ClassVar[tuple[str, ...]] = ("restart", "shrink")
    BALANCES: ClassVar[tuple[str, ...]] = ("none", "bias_sign")
    KEY_SEARCHES: ClassVar[tuple[str, ...]] = ("exact", "faiss_flat", "faiss_ivf", "faiss_hnsw")

    num_attention_heads: int = 2
    attention_dropout: float = 0.0
    num_experts: int = 128
    expert_intermediate_size: int = 128
    num_experts_per_tok: int = 2
    key_size: int | None = None
    query_network: str = "linear"
    query_hidden_size: int | None = None
    router_temperature: float = 0.5
    router_eval_temperature: float = 0.5
    init_method: str = "default"
    init_sparsity: float = 0.9
    key_update: str = "frozen"
    alpha: float = 0.01
    alpha_rule: str = "mean"
    beta: float = 0.01
    delta: float = 0.1
    use_alpha: bool = True
    use_beta: bool = True
    use_delta: bool = True
    ema_decay: float = 0.99
    forgetting_threshold: float = 0.1
    forget_rule: str = "restart"
    balance: str = "bias_sign"
    balance_rate: float = 0.001
    key_search: str = "exact"
    key_search_nprobe: int = 8
    key_search_ef: int = 64

    @property
    def supports_packed_documents(self) -> bool:
        """Attention is the only path between positions, and it is masked per document; experts are routed per token."""
        return True

    def validate(self) -> None:
        if self.key_size is None:
            self.key_size = self.hidden_size
        if self.query_hidden_size is None:
            self.query_hidden_size = self.hidden_size
        self.check_positive(
            "num_attention_heads", "num_experts", "expert_intermediate_size", "num_experts_per_tok", "key_size",
            "query_hidden_size",
        )
        self.check_divisible("hidden_size", "num_attention_heads")
        if self.num_experts_per_tok > self.num_experts:
            self._fail("num_experts_per_tok", f"a positive integer <= num_experts={self.num_experts}")
        self.check_range("attention_dropout", 0.0, 1.0, high_inclusive=False)
        self.check_choice("query_network", self.QUERY_NETWORKS)
        self.check_choice("init_method", self.INIT_METHODS)
        self.check_choice("key_update", self.KEY_UPDATES)
        self.check_choice("alpha_rule", self.ALPHA_RULES)
        self.check_choice("forget_rule", self.FORGET_RULES)
        self.check_choice("balance", self.BALANCES)
        self.check_choice("key_search", self.KEY_SEARCHES)
        self.check_positive("key_search_nprobe", "key_search_ef")
        if self.key_search != "exact" and self.num_experts_per_tok < 2:
            self._fail("key_search", "'exact' with num_experts_per_tok=1 (one expert's gate needs every key's score)")
        self.check_range("init_sparsity", 0.0, 1.0, high_inclusive=False)
        for name in ("router_temperature", "router_eval_temperature"):
            self.check_range(name, 0.0, float("inf"), low_inclusive=False, high_inclusive=False)
        for name in ("alpha", "beta", "delta", "ema_decay"):
            self.check_range(name, 0.0, 1.0)
        self.check_range("forgetting_threshold", 0.0, 1.0)
        self.check_range("balance_rate", 0.0, float("inf"), high_inclusive=False)
        for name in ("use_alpha", "use_beta", "use_delta"):
            if not isinstance(getattr(self, name), bool):
                self._fail(name, "true or false")

    @property
    def required_extras(self) -> dict[str, tuple[str, str]]:
        """Setting -> (module, extra) this configuration needs beyond the base install."""
        return {"key_search": ("faiss", "ann")} if self.key_search != "exact" else {}

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads
