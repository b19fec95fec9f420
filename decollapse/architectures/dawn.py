"""DAWN: neurons as combinations of shared basis FFNs, picked per token by a neuron router."""

from ..registry import register_architecture

register_architecture(
    name="dawn",
    config="DawnConfig",
    models={"AutoModel": "DawnModel", "AutoModelForCausalLM": "DawnForCausalLM", "AutoModelForMaskedLM": "DawnForMaskedLM"},
    summary="neurons as basis-FFN combinations picked per token by a neuron router (DAWN v5.0)",
    citations=(
        "DAWN (Dynamic Architecture With Neurons) v5.0, "
        "[github.com/madst0614/DAWN](https://github.com/madst0614/DAWN), "
        "commit `1356f29` (2025-11-23): neurons as combinations of shared basis FFNs, picked per token by a router.",
    ),
    limitations="DAWN leaves the synthetic corpus's early plateau later than dense, by a number of steps that depends "
    "on the seed and on the thread count (float rounding). With the default unit-norm mixing, 21 of 22 paired runs "
    "(seeds 0-11 at one thread, 0-9 at two) ended within 1.10x dense's perplexity and one, which left the "
    "plateau at step 3100, at 1.109x; with v5.0's mixing (mixing_norm=False) 3 of 22 ended 1.17-1.55x. "
    "Compare it with the dense control over several seeds before drawing a conclusion from one run. "
    "It keeps no KV cache: generation re-encodes the prefix at every step.",
    tiny={"num_neurons": 32, "neuron_top_k": 4, "num_basis": 8, "basis_rank": 4, "modulation_rank": 8},
)
