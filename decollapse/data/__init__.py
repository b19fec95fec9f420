"""Training data for decollapse models: the embedded synthetic benchmark language (with exact
Bayes-optimal bounds and ground-truth labels) and real text corpora through ``datasets``."""

from .collators import (
    DataCollatorForMaskedDiffusion,
    DataCollatorForPackedLanguageModeling,
    DataCollatorForPrefixGeneration,
    DataCollatorForTSDAE,
)
from .synthetic import (
    DOMAIN_NAMES,
    WORD_CLASS_NAMES,
    SyntheticCorpus,
    SyntheticCorpusConfig,
    SyntheticLanguage,
    build_synthetic_corpus,
    masked_lm_floor,
)
from .text import PACKING, TextCorpus, load_text_corpus, stream_text_corpus

__all__ = [
    "DOMAIN_NAMES",
    "PACKING",
    "DataCollatorForMaskedDiffusion",
    "DataCollatorForPackedLanguageModeling",
    "DataCollatorForPrefixGeneration",
    "DataCollatorForTSDAE",
    "WORD_CLASS_NAMES",
    "SyntheticCorpus",
    "SyntheticCorpusConfig",
    "SyntheticLanguage",
    "TextCorpus",
    "build_synthetic_corpus",
    "load_text_corpus",
    "masked_lm_floor",
    "stream_text_corpus",
]
