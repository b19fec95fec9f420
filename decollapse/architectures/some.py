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
    summary="Self-Organizing Mixture of Experts: frozen random expert FFNs routed through a key store that "
    "Knowledge Gravity moves (learning as routing)",
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
    limitations="Only the routing learns: the experts stay random. On the embedded corpus (3 seeds) SoME was worse "
    "than dense of equal trainable parameters on every seed, its usage Gini stayed at 0.46-0.62 at the defaults, and "
    "keys that never move matched Knowledge Gravity on perplexity; see docs/SOME.md.",
    tiny={"num_attention_heads": 4, "num_experts": 8, "expert_intermediate_size": 16, "num_experts_per_tok": 2},
)
