"""Configuration of ``dawn``: neurons as combinations of shared basis FFN blocks, picked per token by a
neuron router (DAWN v5.0, github.com/madst0614/DAWN, commit 1356f29; docs/DAWN.md)."""

from __future__ import annotations

from typing import ClassVar

from .config_utils import DecollapseConfig

FFN_COMPOSITIONS = ("token", "causal_prefix", "sequence")
NEURON_INITS = ("qr", "normal", "uniform")


class DawnConfig(DecollapseConfig):
    r"""Configuration of a DAWN model: per layer a neuron router and a basis FFN.

    Each layer holds a pool of ``num_neurons`` neurons. A token's router scores all of them (from the
    token itself and from a context attention over the tokens it may see, mixed by a learned gate),
    keeps the ``neuron_top_k`` best and softmax-weights them. The weighted neurons are written into
    the residual stream, and their coefficient rows (one per neuron over ``num_basis`` shared low-rank
    basis blocks) compose that token's FFN up-projection.

    The defaults are a CPU-sized version of the original's shape (DAWN v5.0's training config has
    ``hidden_size=256``, ``num_neurons=512``, ``neuron_top_k=16``, ``num_basis=16``, ``basis_rank=8``,
    ``modulation_rank=32``, ``intermediate_size=512``), sized to the embedded corpus's two-minute recipe. Four defaults depart
    from v5.0 on purpose, each one knob away from the original:

    - ``context_residual=True``: the router's context attention also writes into the residual stream
      (through an output projection). In v5.0 the only path between tokens besides routing was the
      sequence-pooled up-projection, which is the future leak. With it removed and nothing in its
      place, the v5.0 layer (``context_residual=False, basis_rank=8, balance_weight=0,
      mixing_norm=False``) trained to 1.84× the optimal perplexity, where dense reaches 1.03×
      (docs/DAWN.md).
    - ``balance_weight=0.1``: a Switch-style load-balancing term on the neuron router, as DAWN's own
      later versions added (v17.1 in the same repository); without it the router leaves more than
      half the pool unused.
    - ``basis_rank=32`` (v5.0 had 8; its authors called 8 a "severe bottleneck" and moved to 32).
    - ``mixing_norm=True``: each token's mixing vectors are scaled to unit norm before they compose
      its up-projection. dawn leaves the corpus's early plateau later than dense on some seeds either
      way; with v5.0's raw mixing 3 of 22 paired runs then ended 1.17–1.55× dense, with unit-norm
      mixing one, at 1.109× (docs/DAWN.md). A configuration saved before this option existed
      loads with ``False``.

    Args:
        num_attention_heads: heads of the router's context attention. It moves the neuron scores and,
            with ``context_residual``, writes into the residual stream through its output projection.
        num_neurons: neuron pool per layer (N).
        neuron_rank: rank of the neuron pool: neurons are ``A_n @ B_n`` with ``A_n`` (N × r_n) and
            ``B_n`` (r_n × hidden_size).
        neuron_top_k: neurons selected per token (k).
        router_temperature: the neuron scores are divided by it before the top-k softmax (and before the
            softmax of ``neuron_balance``); which neurons are selected does not change. 1.0 (default)
            is v5.0, which softmaxes the raw scores. An Adam step moves the neurons by about the learning
            rate whatever the gradient's size, so below 1 each step moves the k weights 1/T times as
            far. At 0.25 with v5.0's mixing, over six seeds at one and at two threads per run, one run
            of twelve ended more than 10% above dense, as at 1.0, on another seed (docs/DAWN.md), so
            the default stays v5.0's.
        num_basis: shared basis blocks per layer (M).
        basis_rank: rank of each basis block: ``A_m`` is hidden_size × r_b, ``B_m`` is r_b × F.
        modulation_rank: bottleneck of the token-modulation MLP that gates the FFN's hidden units.
        intermediate_size: FFN width F; ``None`` means ``4 * hidden_size``.
        context_residual: write the router's context attention into the residual stream through an
            output projection (``False`` is v5.0: the context only moves the neuron scores).
        ffn_composition: how a token's up-projection is composed from neuron selections.
            ``"token"``: from the token's own selections. ``"causal_prefix"``: from the mean
            selection over the real (non-padding) tokens up to and including it. ``"sequence"``: from
            the mean over the whole sequence, as the original does; it sees the future, so only the
            masked-LM objective accepts it.
        mixing_norm: divide each position's mixing vectors ``a`` and ``b`` by their L2 norm before they
            compose the up-projection (default; ``False`` is v5.0). Without it the composed
            up-projection starts about 200 times quieter than a dense FFN (``a`` and ``b`` average k
            coefficient rows, each of norm about sqrt(M/N)) and its scale follows the mixing weights.
        neuron_init: initialisation of the coefficient matrices ``coef_A``, ``coef_B`` (N × M).
            ``"qr"``: the Q factor of a reduced QR decomposition of a Gaussian N × M matrix (the fix
            DAWN v5.0 introduced). ``"normal"``: i.i.d. ``N(0, 1/N)``, the same entry scale without
            the orthogonal columns. ``"uniform"``: every row ``1/sqrt(M)`` plus ``N(0, 0.01)`` noise, the nearly
            identical rows of the initialisation DAWN used before that fix, whose run collapsed.
        basis_init_std: standard deviation of the basis blocks at initialisation (0.05 in the
            original, which raised it from 0.02 after a "basis collapse").
        orthogonality_weight: weight of ``router_orthogonality``, the mean squared off-diagonal
            cosine of the rows of ``A_n`` minus its floor.
        diversity_weight: weight of ``coefficient_diversity``, the same quantity on the rows of
            ``coef_A`` and ``coef_B`` (averaged) minus its floor.
        sparsity_weight: weight of ``basis_sparsity``, ``mean_i relu(min_bases_per_neuron − PR_i)``
            with ``PR_i`` the participation ratio (effective number of bases) of coefficient row i.
        min_bases_per_neuron: the basis count every neuron should at least use (3 in DAWN v5.0).
        balance_weight: weight of ``neuron_balance``, the Switch load-balancing loss of the neuron
            router (``N Σ_i f_i P_i`` over real tokens) minus 1, its value at perfect balance.
    """

    model_type = "decollapse_dawn"
    aux_loss_weight_fields: ClassVar[dict[str, str]] = {
        "router_orthogonality": "orthogonality_weight",
        "coefficient_diversity": "diversity_weight",
        "basis_sparsity": "sparsity_weight",
        "neuron_balance": "balance_weight",
    }
    # Saved before `mixing_norm` existed: such checkpoints were trained with v5.0's raw mixing.
    saved_without_key_defaults: ClassVar[dict[str, object]] = {"mixing_norm": False}

    num_attention_heads: int = 2
    num_neurons: int = 128
    neuron_rank: int = 16
    neuron_top_k: int = 8
    router_temperature: float = 1.0
    num_basis: int = 16
    basis_rank: int = 32
    modulation_rank: int = 32
    intermediate_size: int | None = None
    ffn_composition: str = "token"
    mixing_norm: bool = True
    context_residual: bool = True
    neuron_init: str = "qr"
    basis_init_std: float = 0.05
    orthogonality_weight: float = 1.0
    diversity_weight: float = 0.1
    sparsity_weight: float = 0.01
    min_bases_per_neuron: float = 3.0
    balance_weight: float = 0.1
    # The router's context attention and the causal-prefix composition keep no incremental state:
    # generation re-encodes the prefix at each step and the model ignores use_cache.
    use_cache: bool = False

    @property
    def supports_packed_documents(self) -> bool:
        """The context attention is masked per document; a pooled ``ffn_composition`` averages over
        the whole row, so with it, documents are not packed."""
        return self.ffn_composition == "token"

    def validate(self) -> None:
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        self.check_positive(
            "num_attention_heads", "num_neurons", "neuron_rank", "neuron_top_k", "num_basis", "basis_rank",
            "modulation_rank", "intermediate_size",
        )
        self.check_divisible("hidden_size", "num_attention_heads")
        self.check_range("router_temperature", 0.0, float("inf"), low_inclusive=False)
        if self.neuron_top_k > self.num_neurons:
            self._fail("neuron_top_k", f"at most num_neurons={self.num_neurons}")
        self.check_choice("ffn_composition", FFN_COMPOSITIONS)
        if self.ffn_composition == "sequence" and self.objective == "causal_lm":
            self._fail(
                "ffn_composition",
                "'token' or 'causal_prefix' for a causal LM ('sequence' pools the routing of future "
                "tokens into every position, the leak of the original; it is allowed for masked_lm only)",
            )
        self.check_choice("neuron_init", NEURON_INITS)
        if self.neuron_init == "qr" and self.num_neurons < self.num_basis:
            self._fail("neuron_init", f"'normal' or 'uniform' when num_neurons < num_basis={self.num_basis}")
        self.check_range("basis_init_std", 0.0, 1.0, low_inclusive=False)
        self.check_range("min_bases_per_neuron", 1.0, float(self.num_basis))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads
