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
    "than dense of equal trainable parameters on two seeds of three (test perplexity 0.96-1.09x), its usage Gini "
    "stayed at 0.42-0.53 at the defaults (only frozen keys with the sign-of-load bias went below 0.3), Knowledge "
    "Gravity did not beat frozen or gradient-trained keys on perplexity, and it trains at 0.56x the speed of dense "
    "of matched active size on CPU; see docs/SOME.md.",
    tiny={"num_attention_heads": 4, "num_experts": 8, "expert_intermediate_size": 16, "num_experts_per_tok": 2},
)
