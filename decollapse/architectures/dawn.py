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
    limitations="At the default recipe DAWN's escape from the synthetic corpus's early plateau depends on the seed "
    "and on the thread count (float rounding): over six seeds at one and at two threads, one run of twelve ended 26% "
    "above dense and the others within 7%; "
    "compare it with the dense control over several seeds before drawing a conclusion from one run. "
    "It keeps no KV cache: generation re-encodes the prefix at every step.",
    tiny={"num_neurons": 32, "neuron_top_k": 4, "num_basis": 8, "basis_rank": 4, "modulation_rank": 8},
)
