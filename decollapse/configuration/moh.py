"""Configuration of ``moh``: Mixture-of-Heads attention, standard (Jin et al. 2024) and fully adaptive
(after RustGPT's router, github.com/ryancinsight/RustGPT, rebuilt so that the language-model loss
reaches every predictor; docs/MOH.md says what differs from the original)."""

from __future__ import annotations

from typing import ClassVar

from .config_utils import DecollapseConfig

ROUTINGS = ("all", "topk", "topp", "adaptive")
ROUTING_GRADS = ("soft", "gumbel", "ste", "none")
SKIP_INACTIVE = ("never", "inference", "always")
SKIP_KERNELS = ("sdpa", "flex")


class MoHConfig(DecollapseConfig):
    r"""Configuration of a Mixture-of-Heads causal LM: the dense control's pre-LN block with an attention
    layer whose heads are weighted, and skipped, per token by a learned router.

    Attention has full projections: ``W_q`` (hidden → H·d), ``W_k`` and ``W_v`` (hidden →
    n_kv·d, grouped-query when ``num_key_value_heads < num_attention_heads``) and ``W_o`` (H·d →
    hidden). Every head sees the whole hidden state. The output is ``o_proj(concat_h w_h · head_h)``,
    where ``w_h`` is the head's routing weight for that token.

    Routing modes (``routing``):

    - ``"all"``: no router, every ``w_h = 1``. Numerically the same as ordinary MHA / GQA.
    - ``"topk"`` / ``"topp"``: standard MoH. The first ``num_shared_heads`` heads are always on with
      ``w = α₁ · softmax(W_s x)``; each of the remaining (routed) heads gets ``w = α₂ · softmax(W_r x)``
      if it is among the ``routing_top_k`` largest routed probabilities (or in the smallest set whose
      probability mass reaches ``routing_top_p``), else 0; ``[α₁, α₂] = softmax(W_h x)``.
    - ``"adaptive"``: no shared/routed split. A router gives ``P = softmax(W x)`` over all heads,
      heads are walked in descending ``P``, and head ``i`` (rank ``r_i``, probability mass before it
      ``C_i``) is kept while ``C_i < τ_t`` (threshold head) and ``r_i < n_t − ½`` (complexity head).
      Its weight is ``w_i = P_i · g_i`` with the gate ``g_i`` made differentiable by ``routing_grad``.

    All weights are multiplied by ``num_attention_heads``, so a uniform router that keeps every head
    starts exactly where ``"all"`` starts (weight 1 per head); ``W_o`` absorbs any constant.

    ``routing_grad`` (adaptive only) makes the keep/drop decision differentiable:

    - ``"soft"``: ``g_i = σ((τ_t − C_i)·T_t) · σ((n_t − r_i − ½)·T_t / H)`` in training; at inference
      the heads with ``g_i < ½`` are dropped (and not computed) and the rest keep their soft weight.
    - ``"ste"``: the hard 0/1 decision in the forward pass, the soft gate's gradient backward.
    - ``"gumbel"``: ``"ste"`` with heads walked in the order of Gumbel-perturbed logits (Gumbel top-k,
      sampling without replacement from ``P``); the noise is scaled by a temperature annealed from
      ``gumbel_temperature_start`` to ``gumbel_temperature_end`` over ``gumbel_anneal_steps`` training
      forwards (exploration early, the deterministic router late); no noise at inference.
    - ``"none"``: the discrete selection computed without gradient and used as a 0/1 mask, like
      the discrete fully adaptive router of RustGPT, whose training stalled. No language-model
      gradient reaches the router or any predictor. It exists to reproduce that failure and is
      never a default.

    Args:
        num_attention_heads: query heads per layer (H).
        num_key_value_heads: key/value heads (n_kv); must divide H. ``None`` means H (no grouping).
        head_dim: width of each head (d); ``None`` means ``hidden_size // num_attention_heads``.
        intermediate_size: MLP width; ``None`` means ``4 * hidden_size``.
        attention_dropout: dropout on attention probabilities during training.
        routing: ``"all"``, ``"topk"``, ``"topp"`` or ``"adaptive"`` (above).
        routing_grad: ``"soft"``, ``"gumbel"``, ``"ste"`` or ``"none"`` (above; adaptive only).
        num_shared_heads: always-on heads of standard MoH (the rest are routed).
        routing_top_k: routed heads kept per token by ``"topk"``.
        routing_top_p: probability mass of the routed heads kept per token by ``"topp"`` (at least one head).
        use_complexity_head: predict a per-token head count ``n_t = min + (max − min)·σ(w_c·x + b_c)``.
        use_threshold_head: predict a per-token mass threshold
            ``τ_t = τ_min + (τ_max − τ_min)·σ(w_τ·x + b_τ)``.
        use_temperature_head: predict a per-token gate temperature
            ``T_t = T_min + (T_max − T_min)·σ(w_T·x + b_T)``; otherwise ``T_t = gate_temperature``.
        min_active_heads / max_active_heads: range of ``n_t`` (``None`` means H).
        threshold_min / threshold_max: range of ``τ_t``.
        gate_temperature: the fixed ``T`` without a temperature head, and the temperature head's
            value at initialisation.
        temperature_min / temperature_max: range of ``T_t``.
        target_head_share: the share of heads tokens should use on average: the compute budget. The
            predictor biases start where a uniform router keeps about this share, and ``head_budget``
            holds the average there while the predictors decide which tokens get more or fewer heads.
        budget_weight: weight of ``head_budget = |mean_t Σ_i g_ti / H − target_head_share|``, the
            distance of the batch's head share from the budget (adaptive only), counted on the gates
            the forward pass uses (hard with the soft gradient for ``"ste"`` / ``"gumbel"``).
            It is two-sided: without it the gates drift wherever the early language-model gradient
            pushes them (measured: to about a quarter of the heads, README), with only an upper bound
            nothing would stop them falling further.
        gumbel_temperature_start / gumbel_temperature_end / gumbel_anneal_steps: the ``"gumbel"``
            schedule (geometric interpolation, then constant).
        load_balance_weight: weight of ``load_balance``, the Switch loss ``E Σ_e f_e · P̄_e`` over the
            routed heads (all heads when adaptive; 1 at perfect balance).
        router_z_loss_weight: weight of ``router_z``, the ST-MoE z-loss on the router logits.
        router_entropy_weight: weight of ``router_entropy``, the mean per-token entropy of the router
            distribution (positive weights sharpen routing).
        skip_inactive_heads: when heads with weight 0 for a token are left uncomputed (their query,
            scores and output projection): ``"never"``, ``"inference"`` (no gradient being recorded:
            evaluation and generation) or ``"always"`` (also in training; only for selections whose
            backward never needs a dropped head's output: ``"topk"``, ``"topp"`` and ``"none"``).
        skip_kernel: how the skipped path attends. ``"sdpa"``: per head, its active queries packed and
            attended in SDPA calls (the fastest on CPU). ``"flex"``: one ``flex_attention`` call over
            every head's packed queries with a block mask, so the query blocks a head leaves empty
            and the keys after a block's last query are never scored; compiled on CUDA, where it is
            meant to run (on a CPU it is PyTorch's unfused reference: correct, slow).
    """

    model_type = "decollapse_moh"
    supported_objectives: ClassVar[tuple[str, ...]] = ("causal_lm",)
    aux_loss_weight_fields: ClassVar[dict[str, str]] = {
        "load_balance": "load_balance_weight",
        "router_z": "router_z_loss_weight",
        "router_entropy": "router_entropy_weight",
        "head_budget": "budget_weight",
    }

    num_attention_heads: int = 8
    num_key_value_heads: int | None = 4
    head_dim: int | None = 16
    intermediate_size: int | None = None
    attention_dropout: float = 0.0
    routing: str = "adaptive"
    routing_grad: str = "ste"
    num_shared_heads: int = 2
    routing_top_k: int = 2
    routing_top_p: float = 0.5
    use_complexity_head: bool = True
    use_threshold_head: bool = True
    use_temperature_head: bool = True
    min_active_heads: int = 1
    max_active_heads: int | None = None
    threshold_min: float = 0.1
    threshold_max: float = 0.9
    gate_temperature: float = 10.0
    temperature_min: float = 2.0
    temperature_max: float = 50.0
    target_head_share: float = 0.5
    budget_weight: float = 1.0
    gumbel_temperature_start: float = 1.0
    gumbel_temperature_end: float = 0.1
    gumbel_anneal_steps: int = 2000
    load_balance_weight: float = 0.01
    router_z_loss_weight: float = 0.0
    router_entropy_weight: float = 0.0
    skip_inactive_heads: str = "inference"
    skip_kernel: str = "sdpa"

    @property
    def supports_packed_documents(self) -> bool:
        """Attention is the only path between positions, and it is masked per document; heads are routed per token."""
        return True

    def validate(self) -> None:
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.check_positive("num_attention_heads")
            self.check_divisible("hidden_size", "num_attention_heads")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.max_active_heads is None:
            self.max_active_heads = self.num_attention_heads
        self.check_positive(
            "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size", "min_active_heads",
            "max_active_heads", "gumbel_anneal_steps",
        )
        self.check_divisible("num_attention_heads", "num_key_value_heads")
        self.check_range("attention_dropout", 0.0, 1.0, high_inclusive=False)
        self.check_choice("routing", ROUTINGS)
        self.check_choice("routing_grad", ROUTING_GRADS)
        self.check_choice("skip_inactive_heads", SKIP_INACTIVE)
        self.check_choice("skip_kernel", SKIP_KERNELS)
        if self.routing in ("topk", "topp"):
            if not 0 <= self.num_shared_heads < self.num_attention_heads or isinstance(self.num_shared_heads, bool):
                self._fail("num_shared_heads", f"an integer in [0, {self.num_attention_heads - 1}] (one head must be routed)")
            routed = self.num_attention_heads - self.num_shared_heads
            if self.routing == "topk" and not (isinstance(self.routing_top_k, int) and 1 <= self.routing_top_k <= routed):
                self._fail("routing_top_k", f"an integer in [1, {routed}] (the routed heads)")
            self.check_range("routing_top_p", 0.0, 1.0, low_inclusive=False)
        if self.routing == "adaptive":
            if not (self.use_complexity_head or self.use_threshold_head):
                self._fail("use_threshold_head", "True when use_complexity_head is False (nothing would select heads)")
            if self.max_active_heads > self.num_attention_heads:
                self._fail("max_active_heads", f"at most num_attention_heads={self.num_attention_heads}")
            if self.min_active_heads > self.max_active_heads:
                self._fail("min_active_heads", f"at most max_active_heads={self.max_active_heads}")
            self.check_range("threshold_min", 0.0, 1.0, low_inclusive=False)
            self.check_range("threshold_max", self.threshold_min, 1.0, low_inclusive=False)
            self.check_range("temperature_min", 0.0, float("inf"), low_inclusive=False)
            self.check_range("temperature_max", self.temperature_min, float("inf"), low_inclusive=False)
            self.check_range("gate_temperature", self.temperature_min, self.temperature_max)
            self.check_range("target_head_share", 0.0, 1.0, low_inclusive=False)
            self.check_range("gumbel_temperature_start", 0.0, float("inf"), low_inclusive=False)
            self.check_range("gumbel_temperature_end", 0.0, self.gumbel_temperature_start, low_inclusive=False)
        if self.skip_inactive_heads == "always" and not (
            self.routing in ("topk", "topp") or (self.routing == "adaptive" and self.routing_grad == "none")
        ):
            self._fail(
                "skip_inactive_heads",
                "'never' or 'inference' for this routing: its backward needs every head's output "
                "('always' fits routing='topk'/'topp' or routing_grad='none')",
            )

    @property
    def num_routed_heads(self) -> int:
        return self.num_attention_heads - self.num_shared_heads
