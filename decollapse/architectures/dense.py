"""The dense control: a plain pre-LN transformer every experiment compares to."""

from ..registry import register_architecture

register_architecture(
    name="dense",
    config="DenseConfig",
    models={"AutoModel": "DenseModel", "AutoModelForCausalLM": "DenseForCausalLM", "AutoModelForMaskedLM": "DenseForMaskedLM"},
    summary="plain pre-LN transformer: the control arm",
    citations=(
        "Vaswani et al. 2017, *Attention Is All You Need*, NeurIPS 2017, "
        "[arXiv:1706.03762](https://arxiv.org/abs/1706.03762): the Transformer.",
        "Radford et al. 2019, *Language Models are Unsupervised Multitask Learners* (GPT-2): the pre-LN "
        "layout with learned absolute positions and tied embeddings that `dense` follows.",
    ),
    limitations="`dense` is the control arm: a plain transformer with no anti-collapse mechanism beyond an optional "
    "head-diversity term, kept small so that the modular architectures can be compared with it at equal budget.",
    tiny={"num_attention_heads": 4},
)
