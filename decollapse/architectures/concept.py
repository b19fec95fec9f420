"""The concept encoder: C concept vectors read the sequence by cross-attention (a Perceiver bottleneck)."""

from ..registry import register_architecture

register_architecture(
    name="concept",
    config="ConceptEncoderConfig",
    models={
        "AutoModel": "ConceptEncoderModel",
        "AutoModelForMaskedLM": "ConceptEncoderForMaskedLM",
        "AutoModelForSequenceClassification": "ConceptEncoderForSequenceClassification",
    },
    summary="C concept vectors read the sequence by cross-attention: a Perceiver bottleneck (MrCogito)",
    citations=(
        "Jaegle et al. 2021, *Perceiver: General Perception with Iterative Attention*, ICML 2021, "
        "[arXiv:2103.03206](https://arxiv.org/abs/2103.03206): a small set of latents reads the input by "
        "cross-attention.",
        "Jaegle et al. 2022, *Perceiver IO: A General Architecture for Structured Inputs & Outputs*, ICLR 2022, "
        "[arXiv:2107.14795](https://arxiv.org/abs/2107.14795): output queries decode from the latents.",
        "MrCogito concept encoder, [github.com/ksopyla/MrCogito](https://github.com/ksopyla/MrCogito), HEAD "
        "`bcf06ad` (2026-02-26): the concept bottleneck, its objectives and concept losses this model implements.",
    ),
    limitations="A healthy concept rank is not evidence of semantic concepts: in the project's measured runs the "
    "regularised concepts were spread geometrically but barely depended on the input.",
    extra_heads={
        "tsdae": "ConceptEncoderForTSDAE",
        "masked_diffusion": "ConceptEncoderForMaskedDiffusion",
        "prefix_diffusion": "ConceptEncoderForPrefixDiffusion",
    },
    tiny={"num_concepts": 8, "num_attention_heads": 4, "intermediate_size": 32},
)
