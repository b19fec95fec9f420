"""SoME: a frozen random expert library addressed by a key store that Knowledge Gravity moves."""

from ..registry import register_architecture

register_architecture(
    name="some",
    config="SomeConfig",
    models={
        "AutoModel": "SomeModel",
        "AutoModelForCausalLM": "SomeForCausalLM",
        "AutoModelForMaskedLM": "SomeForMaskedLM",
    },
    summary="Self-Organizing Mixture of Experts: frozen random expert FFNs routed through a key store "
    "(learning as routing; Knowledge Gravity, or frozen keys with a sign-of-load bias by default)",
    citations=(
        "Self-Organizing Mixture of Experts (SoME), "
        "[github.com/TesterSim2/Self-Organizing-Mixture-of-Experts-SoME-](https://github.com/TesterSim2/"
        "Self-Organizing-Mixture-of-Experts-SoME-) (MIT, notebooks v2-v7): frozen experts, the key store and "
        "Knowledge Gravity.",
        "Wang et al. 2024, *Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts*, "
        "[arXiv:2408.15664](https://arxiv.org/abs/2408.15664): the sign-of-load bias (`balance=bias_sign`).",
        "van den Oord et al. 2017, *Neural Discrete Representation Learning*, "
        "[arXiv:1711.00937](https://arxiv.org/abs/1711.00937): the codebook whose dead-code restart "
        "`forget_rule=restart` follows.",
    ),
    limitations="Only the routing learns: the experts stay random. The defaults keep the keys frozen and balance "
    "them with a sign-of-load bias, because on the embedded corpus (3 seeds) Knowledge Gravity did not beat frozen "
    "or gradient-trained keys on perplexity and left usage Gini at 0.42-0.53; at the defaults SoME's test "
    "perplexity was 0.90-1.06x dense of equal trainable parameters (no claim either way) and 1.07-1.25x dense of "
    "equal active parameters, and it trains at 0.56x the speed of dense of matched active size on CPU; see "
    "docs/SOME.md.",
    tiny={"num_attention_heads": 4, "num_experts": 8, "expert_intermediate_size": 16, "num_experts_per_tok": 2},
)
