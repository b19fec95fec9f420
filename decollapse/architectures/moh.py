"""Mixture-of-Heads: attention heads weighted and skipped per token by a router."""

from ..registry import register_architecture

register_architecture(
    name="moh",
    config="MoHConfig",
    models={"AutoModel": "MoHModel", "AutoModelForCausalLM": "MoHForCausalLM"},
    summary="attention heads weighted and skipped per token by a router: standard and fully adaptive "
    "Mixture-of-Heads (RustGPT)",
    citations=(
        "Jin et al. 2024, *MoH: Multi-Head Attention as Mixture-of-Head Attention*, "
        "[arXiv:2410.11842](https://arxiv.org/abs/2410.11842): shared and routed heads, weighted per token.",
        "RustGPT Mixture-of-Heads, [github.com/ryancinsight/RustGPT](https://github.com/ryancinsight/RustGPT), commit "
        "`16aab77` (2025-10-19): the fully adaptive head router (per-token threshold, count and temperature).",
    ),
    limitations="Skipping heads is exact but, in this implementation, not faster than computing all heads on CPU; "
    "the routed variants trade some perplexity for fewer active heads per token.",
    tiny={"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8},
)
