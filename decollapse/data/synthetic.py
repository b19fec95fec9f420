"""The embedded benchmark corpus: a synthetic language whose latent structure is known exactly.

The language is a hidden Markov model. Its hidden state is a *(domain, grammar state)* pair, plus one
end-of-document state. Every grammar state emits a word of one word class. Content words (nouns,
verbs, adjectives) belong to one domain each; function words (determiners, prepositions,
conjunctions, pronouns, sentence punctuation) are shared by all domains. A small share of content
words are *homonyms*: two lexical entries of different domains share one surface form, and some of
those pairs also change word class. A model can only tell their senses apart from context.

Because the generator is known, the Bayes-optimal next-token cross-entropy of any example is
computable exactly with the forward algorithm. That number is the floor every trained model is
measured against: ``model perplexity / optimal perplexity`` is how far from perfect a model is, on
the very tokens it was evaluated on.

**Examples.** Each example is an independent run of the generator of exactly ``seq_len`` tokens:
token 0 is ``[BOS]``, then the process starts at a document start and runs across document
boundaries (``[EOD]``, then a fresh document whose domain is drawn from the prior) until the example
is full. The bound is computed under exactly that context, so it is the optimum for a model that
sees one example at a time, not a full-history optimum a 128-token model could never reach.

**Word ids.** The generator has its own word ids. Id 0 is ``[BOS]``, which no state emits: it only
fills column 0 of every example, so ``sample`` returns ``[n, seq_len]`` arrays whose first column is
``BOS_WORD_ID`` and ``log_probs`` scores columns 1 onward. Id 1 is ``[EOD]``, then the function
words, then the content surface forms. ``build_synthetic_corpus`` maps these ids one-to-one onto
the ids of a word-level tokenizer.

Nothing is cached on disk: building the default corpus takes a few seconds, less than reading a
cache would cost to get right.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# Word classes and the sentence grammar
# --------------------------------------------------------------------------------------------------

WORD_CLASS_NAMES: tuple[str, ...] = (
    "NOUN",
    "VERB",
    "ADJ",
    "DET",
    "PREP",
    "CONJ",
    "PRON",
    "PUNCT",
    "EOD",
    "BOS",
)
NOUN, VERB, ADJ, DET, PREP, CONJ, PRON, PUNCT, EOD, BOS = range(len(WORD_CLASS_NAMES))
CONTENT_CLASSES: tuple[int, ...] = (NOUN, VERB, ADJ)
FUNCTION_CLASSES: tuple[int, ...] = (DET, PREP, CONJ, PRON, PUNCT)

# Sizes of the shared function-word classes. They are fixed rather than configurable: the content
# vocabulary is the knob that sets the benchmark's hardness, and fewer knobs keep corpora comparable.
FUNCTION_CLASS_SIZES: dict[int, int] = {DET: 8, PREP: 14, CONJ: 5, PRON: 8}
# Real punctuation marks keep generated text readable; the first is the most frequent (Zipf rank 1).
PUNCTUATION_MARKS: tuple[str, ...] = (".", "?", "!")

BOS_TOKEN = "[BOS]"
EOD_TOKEN = "[EOD]"
BOS_WORD_ID = 0
EOD_WORD_ID = 1

DOMAIN_NAMES: tuple[str, ...] = (
    "weather",
    "cooking",
    "sailing",
    "medicine",
    "music",
    "trade",
    "farming",
    "law",
    "astronomy",
    "mining",
    "weaving",
    "warfare",
    "chess",
    "pottery",
    "fishing",
    "building",
)

# The sentence automaton over word classes. Each state emits one word of its class; the last state
# (END) emits sentence punctuation and hands control to the document process, which decides
# whether the document ends and whether the next sentence changes domain.
# Subject, object and prepositional noun phrases are separate states (not one shared NP
# sub-automaton) so that the hidden state remembers where in the sentence it is: that makes the
# verb slot predictable, which is the kind of structure a model has to discover. Verbs may take a
# bare object noun: otherwise a verb is always followed by a shared function word, and a verb
# homonym's two senses would have identical continuations.
GRAMMAR_STATE_NAMES: tuple[str, ...] = (
    "SUBJ_DET",
    "SUBJ_ADJ",
    "SUBJ_NOUN",
    "SUBJ_CONJ",
    "SUBJ_NOUN2",
    "SUBJ_PRON",
    "VERB",
    "OBJ_DET",
    "OBJ_ADJ",
    "OBJ_NOUN",
    "PP_PREP",
    "PP_DET",
    "PP_ADJ",
    "PP_NOUN",
    "CLAUSE_CONJ",
    "INTRO_PREP",
    "INTRO_DET",
    "INTRO_NOUN",
    "END",
)
_G = {name: i for i, name in enumerate(GRAMMAR_STATE_NAMES)}
GRAMMAR_STATE_CLASS: tuple[int, ...] = (
    DET, ADJ, NOUN, CONJ, NOUN, PRON, VERB, DET, ADJ, NOUN, PREP, DET, ADJ, NOUN, CONJ, PREP, DET,
    NOUN, PUNCT,
)  # fmt: skip
END_STATE = _G["END"]
SENTENCE_START: dict[str, float] = {"SUBJ_DET": 0.55, "SUBJ_PRON": 0.25, "INTRO_PREP": 0.20}
GRAMMAR_TRANSITIONS: dict[str, dict[str, float]] = {
    "SUBJ_DET": {"SUBJ_ADJ": 0.35, "SUBJ_NOUN": 0.65},
    "SUBJ_ADJ": {"SUBJ_ADJ": 0.15, "SUBJ_NOUN": 0.85},
    "SUBJ_NOUN": {"VERB": 0.80, "SUBJ_CONJ": 0.20},
    "SUBJ_CONJ": {"SUBJ_NOUN2": 1.0},
    "SUBJ_NOUN2": {"VERB": 1.0},
    "SUBJ_PRON": {"VERB": 1.0},
    "VERB": {"OBJ_DET": 0.35, "OBJ_NOUN": 0.15, "PP_PREP": 0.20, "END": 0.30},
    "OBJ_DET": {"OBJ_ADJ": 0.30, "OBJ_NOUN": 0.70},
    "OBJ_ADJ": {"OBJ_NOUN": 1.0},
    "OBJ_NOUN": {"PP_PREP": 0.30, "CLAUSE_CONJ": 0.15, "END": 0.55},
    "PP_PREP": {"PP_DET": 1.0},
    "PP_DET": {"PP_ADJ": 0.25, "PP_NOUN": 0.75},
    "PP_ADJ": {"PP_NOUN": 1.0},
    "PP_NOUN": {"END": 0.70, "CLAUSE_CONJ": 0.15, "PP_PREP": 0.15},
    "CLAUSE_CONJ": {"SUBJ_PRON": 0.40, "SUBJ_DET": 0.30, "VERB": 0.30},
    "INTRO_PREP": {"INTRO_DET": 1.0},
    "INTRO_DET": {"INTRO_NOUN": 1.0},
    "INTRO_NOUN": {"SUBJ_DET": 0.60, "SUBJ_PRON": 0.40},
    "END": {},
}

# Syllable inventory for pseudo-words: consonant onset, vowel nucleus, optional coda.
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "sh", "ch", "th",
           "tr", "pl", "gr", "st", "br", "kl", "dr")  # fmt: skip
_NUCLEI = ("a", "e", "i", "o", "u", "ai", "ou", "ee", "oa")
_CODAS = ("", "", "", "", "n", "r", "l", "s", "m", "k", "t")

# Independent random streams derived from the one seed: changing how many numbers one stream draws
# (say, a bigger lexicon) must not shift the examples of another.
_LEXICON_STREAM = 101
_SPLIT_STREAMS = {"train": 1, "validation": 2, "test": 3}
# A domain subset draws its splits from streams of its own (keyed by the subset): on shared streams the
# same uniform draws would make the corpus of domains 4-7 a word-for-word relabelling of that of 0-3.
_SUBSET_STREAM = 201


def _grammar_matrix() -> np.ndarray:
    size = len(GRAMMAR_STATE_NAMES)
    matrix = np.zeros((size, size))
    for source, targets in GRAMMAR_TRANSITIONS.items():
        for target, prob in targets.items():
            matrix[_G[source], _G[target]] = prob
    return matrix


def _start_vector() -> np.ndarray:
    vector = np.zeros(len(GRAMMAR_STATE_NAMES))
    for name, prob in SENTENCE_START.items():
        vector[_G[name]] = prob
    return vector


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


@dataclass
class SyntheticCorpusConfig:
    """Everything that determines the synthetic language and the corpus drawn from it.

    ``homonym_rate`` is the share of content words whose surface form is shared with a content word
    of another domain (so ``round(rate * content_words / 2)`` pairs), and ``homonym_class_change``
    the share of those pairs whose two senses have different word classes. ``p_switch`` is the
    probability that the next sentence of a document moves to another domain (uniformly among the
    others), ``p_end`` the probability that the document ends after a sentence. ``seq_len`` counts
    the leading ``[BOS]``. The same ``seed`` always gives the same lexicon, examples and bounds.

    ``domains`` restricts every split to a subset of the domains (``"0-3"``, ``"0,2,5"``, ``"4"``;
    None: all of them). The language stays the same (lexicon, tokenizer, grammar); only the hidden
    Markov model's domain prior and switches are restricted to the subset (see ``SyntheticLanguage``),
    so the exact bound holds for the restricted corpus too.
    """

    num_domains: int = 8
    nouns: int = 150
    verbs: int = 80
    adjectives: int = 60
    zipf_exponent: float = 1.0
    homonym_rate: float = 0.08
    homonym_class_change: float = 0.3
    p_switch: float = 0.1
    p_end: float = 0.1
    seq_len: int = 128
    num_train: int = 24000
    num_validation: int = 500
    num_test: int = 500
    seed: int = 0
    domains: str | None = None

    def __post_init__(self) -> None:
        self._check_int("num_domains", 2, "an integer >= 2 (homonyms need two domains)")
        for name in ("nouns", "verbs", "adjectives", "num_train", "num_validation", "num_test"):
            self._check_int(name, 1, "an integer >= 1")
        self._check_int("seq_len", 2, "an integer >= 2 ([BOS] plus at least one word)")
        self._check_int("seed", 0, "a non-negative integer")
        self._check_float("zipf_exponent", 0.0, 10.0, "a number in [0, 10]")
        for name in ("homonym_rate", "homonym_class_change", "p_switch", "p_end"):
            self._check_float(name, 0.0, 1.0, "a probability in [0, 1]")
        if self.domains is not None:
            try:
                parse_domain_subset(self.domains, self.num_domains)
            except ValueError as err:
                self._fail("domains", str(err))

    def _fail(self, name: str, allowed: str) -> None:
        raise ValueError(
            f"SyntheticCorpusConfig.{name}={getattr(self, name)!r} is not allowed: expected {allowed}."
        )

    def _check_int(self, name: str, minimum: int, allowed: str) -> None:
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
            self._fail(name, allowed)

    def _check_float(self, name: str, low: float, high: float, allowed: str) -> None:
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            self._fail(name, allowed)
        if not (math.isfinite(value) and low <= value <= high):
            self._fail(name, allowed)

    @property
    def content_class_sizes(self) -> dict[int, int]:
        return {NOUN: self.nouns, VERB: self.verbs, ADJ: self.adjectives}

    @property
    def domain_subset(self) -> tuple[int, ...]:
        """The domains the corpus is drawn from, in increasing order (all of them by default)."""
        if self.domains is None:
            return tuple(range(self.num_domains))
        return parse_domain_subset(self.domains, self.num_domains)

    @property
    def restricts_domains(self) -> bool:
        """Whether ``domains`` leaves some domain out (a subset naming every domain is the default corpus)."""
        return len(self.domain_subset) < self.num_domains

    @property
    def label_classes(self) -> dict[str, int]:
        """The number of values each ground-truth label column can take in this language, whatever
        domains a corpus is drawn from: models trained on two subsets in turn need the same label space."""
        function_words = 1 + sum(FUNCTION_CLASS_SIZES.values()) + len(PUNCTUATION_MARKS)  # [EOD] first
        content_words = self.num_domains * sum(self.content_class_sizes.values())
        senses = function_words + content_words
        return {"domain": self.num_domains, "word_class": len(WORD_CLASS_NAMES), "sense": senses}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


DOMAIN_SUBSET_FORMS = "a range such as 0-3, a list such as 0,2,5, or one index such as 4"


def parse_domain_subset(text: str, num_domains: int) -> tuple[int, ...]:
    """``"0-3"``, ``"0,2,5"``, ``"4"`` or a mix (``"0-2,5"``) -> sorted domain indices.

    Raises ``ValueError`` whose message says what is allowed and what is wrong, for the caller to
    prefix with the field or flag the text came from.
    """
    allowed = f"domain indices in 0-{num_domains - 1} (num_domains={num_domains}): {DOMAIN_SUBSET_FORMS}"
    if not isinstance(text, str):
        raise ValueError(f"{allowed}; got a {type(text).__name__}, not text")
    chosen: list[int] = []
    for part in text.split(","):
        low, dash, high = part.strip().partition("-")
        if not (low.strip().isdigit() and (not dash or high.strip().isdigit())):
            raise ValueError(f"{allowed} ({part.strip()!r} is not an index or a range)")
        first, last = int(low), int(high) if dash else int(low)
        if first > last:
            raise ValueError(f"{allowed} (the range {first}-{last} runs backwards)")
        if last >= num_domains:
            raise ValueError(f"{allowed} ({last} is out of range)")
        for domain in range(first, last + 1):
            if domain in chosen:
                raise ValueError(f"{allowed} (domain {domain} is named twice)")
            chosen.append(domain)
    return tuple(sorted(chosen))


# --------------------------------------------------------------------------------------------------
# Lexicon
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LexicalEntry:
    """One sense of one word. ``domain`` is -1 for shared words; ``homonym_of`` is the sense id of
    the other meaning of the same surface form, or None."""

    sense: int
    surface: str
    word_id: int
    word_class: int
    domain: int
    rank: int
    homonym_of: int | None = None

    @property
    def class_name(self) -> str:
        return WORD_CLASS_NAMES[self.word_class]


def _pseudo_word(rng: np.random.Generator, syllables: int, open_syllables: bool) -> str:
    parts = []
    for _ in range(syllables):
        parts.append(_ONSETS[rng.integers(len(_ONSETS))])
        parts.append(_NUCLEI[rng.integers(len(_NUCLEI))])
        if not open_syllables:
            parts.append(_CODAS[rng.integers(len(_CODAS))])
    return "".join(parts)


def _fresh_word(rng: np.random.Generator, taken: set[str], short: bool) -> str:
    # Function words are short and content words long, as in natural languages; a collision just
    # draws again, with one syllable more after many failures so the loop always ends. Short words
    # use open syllables only: one closed syllable too easily spells a real (sometimes rude) word.
    base = 1 if short else 2 + int(rng.random() < 0.4)
    for attempt in range(10_000):
        word = _pseudo_word(rng, base + attempt // 50, open_syllables=short)
        if word not in taken:
            taken.add(word)
            return word
    raise RuntimeError("could not draw a fresh pseudo-word")  # unreachable with this inventory


def _pair_homonyms(
    config: SyntheticCorpusConfig, content: list[tuple[int, int, int]], rng: np.random.Generator
) -> list[tuple[int, int]]:
    """Pick homonym pairs among content entries ``(domain, class, rank)``; returns index pairs."""
    num_pairs = int(round(config.homonym_rate * len(content) / 2))
    num_class_change = int(round(config.homonym_class_change * num_pairs))
    domains = np.array([c[0] for c in content])
    classes = np.array([c[1] for c in content])
    free = np.ones(len(content), dtype=bool)
    order = rng.permutation(len(content))
    cursor = 0
    pairs = []
    for k in range(num_pairs):
        change_class = k < num_class_change
        while cursor < len(order) and not free[order[cursor]]:
            cursor += 1
        partner_ok = None
        while cursor < len(order):
            first = order[cursor]
            same = classes == classes[first]
            partner_ok = free & (domains != domains[first]) & (~same if change_class else same)
            partner_ok[first] = False
            if free[first] and partner_ok.any():
                break
            cursor += 1
        if cursor >= len(order):
            raise ValueError(
                f"SyntheticCorpusConfig.homonym_rate={config.homonym_rate!r} is not allowed with "
                f"these vocabulary sizes: only {k} of {num_pairs} homonym pairs could be formed; "
                "expected a lower homonym_rate or homonym_class_change."
            )
        candidates = np.flatnonzero(partner_ok)
        second = int(candidates[rng.integers(len(candidates))])
        free[first] = free[second] = False
        pairs.append((int(first), second))
        cursor += 1
    return pairs


def _build_lexicon(config: SyntheticCorpusConfig) -> tuple[list[LexicalEntry], list[str]]:
    rng = np.random.default_rng([config.seed, _LEXICON_STREAM])
    taken: set[str] = set()
    words = [BOS_TOKEN, EOD_TOKEN]
    entries = [LexicalEntry(0, EOD_TOKEN, EOD_WORD_ID, EOD, -1, 0)]

    for word_class in FUNCTION_CLASSES:
        if word_class == PUNCT:
            surfaces = list(PUNCTUATION_MARKS)
        else:
            surfaces = [_fresh_word(rng, taken, short=True) for _ in range(FUNCTION_CLASS_SIZES[word_class])]
        for rank, surface in enumerate(surfaces):
            entries.append(LexicalEntry(len(entries), surface, len(words), word_class, -1, rank))
            words.append(surface)

    content = [
        (domain, word_class, rank)
        for domain in range(config.num_domains)
        for word_class, size in config.content_class_sizes.items()
        for rank in range(size)
    ]
    partner = {}
    for a, b in _pair_homonyms(config, content, rng):
        partner[a], partner[b] = b, a
    first_sense = len(entries)
    surfaces: dict[int, tuple[str, int]] = {}
    for index, (domain, word_class, rank) in enumerate(content):
        other = partner.get(index)
        if other is not None and other in surfaces:
            surface, word_id = surfaces[other]
        else:
            surface = _fresh_word(rng, taken, short=False)
            word_id = len(words)
            words.append(surface)
        surfaces[index] = (surface, word_id)
        entries.append(
            LexicalEntry(
                sense=first_sense + index,
                surface=surface,
                word_id=word_id,
                word_class=word_class,
                domain=domain,
                rank=rank,
                homonym_of=None if other is None else first_sense + other,
            )
        )
    return entries, words


# --------------------------------------------------------------------------------------------------
# The language
# --------------------------------------------------------------------------------------------------


class _RowSampler:
    """Draws one column per requested row of a row-stochastic matrix, for many rows at once.

    All rows' cumulative distributions are laid end to end on one axis, row ``r`` occupying
    ``[r, r + 1]``, so a draw for row ``r`` is a single ``searchsorted`` of ``r + u``. That keeps
    sampling O(n log nnz) per step however large the vocabulary is.
    """

    def __init__(self, matrix: np.ndarray) -> None:
        rows, cols = np.nonzero(matrix)
        values = matrix[rows, cols]
        cumulative = np.cumsum(values)
        row_start = np.searchsorted(rows, np.arange(matrix.shape[0]))
        row_offset = np.concatenate([[0.0], cumulative])[row_start]
        within = cumulative - row_offset[rows]
        totals = np.zeros(matrix.shape[0])
        np.add.at(totals, rows, values)
        within = within / totals[rows]
        last = np.r_[rows[1:] != rows[:-1], True]
        # An exact 1.0 at each row's end means a uniform draw in [0, 1) never falls past its row.
        within[last] = 1.0
        self._keys = rows + within
        self._cols = cols
        # r + u can round up to r + 1 for u just below 1; clamping keeps such a draw in its row.
        self._row_last = np.flatnonzero(last)[np.searchsorted(rows[last], np.arange(matrix.shape[0]))]

    def draw(self, rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        keys = rows + rng.random(rows.shape[0])
        index = np.minimum(np.searchsorted(self._keys, keys, side="right"), self._row_last[rows])
        return self._cols[index]


@dataclass(frozen=True)
class MaskingChannel:
    """How a BERT-style masking collator corrupts a sequence, as the masked-LM floor reads it: each
    position whose word is ``selectable`` is selected with ``select_prob``; a selected position shows
    ``[MASK]`` (``mask_prob``), a token drawn uniformly from the ``vocab_size`` tokenizer ids
    (``random_prob``) or its own word (``keep_prob``, the rest)."""

    select_prob: float
    mask_prob: float
    random_prob: float
    vocab_size: int
    selectable: np.ndarray  # [language words] bool

    @property
    def keep_prob(self) -> float:
        return 1.0 - self.mask_prob - self.random_prob


class SyntheticLanguage:
    """The hidden Markov model behind the synthetic corpus.

    Hidden states are ``domain * G + g`` for grammar state ``g`` (``G = len(GRAMMAR_STATE_NAMES)``)
    plus a final end-of-document state that emits ``[EOD]``. ``transition[s, s']`` is the
    probability of the next word's state, ``initial`` the state distribution of the first word after
    ``[BOS]`` (a document start), ``emission[s, w]`` the probability of surface word ``w``.

    With ``config.domains`` set, the process itself is restricted, not its output filtered: a
    document starts in a subset domain (uniform prior over the subset) and a switch moves to another
    subset domain (``p_switch``, uniform among the others; a one-domain subset never switches). The
    other domains' states stay in the state space, unreachable, so state ids, emissions and the
    lexicon are those of the full language, and the forward algorithm over this ``transition`` is the
    exact bound of the corpus actually sampled. Dropping the documents of other domains from full
    samples would not be: examples cross document boundaries and documents switch domain midway.
    """

    def __init__(self, config: SyntheticCorpusConfig) -> None:
        self.config = config
        self.lexicon, self.words = _build_lexicon(config)
        self.num_grammar_states = len(GRAMMAR_STATE_NAMES)
        self.num_domains = config.num_domains
        self.eod_state = self.num_domains * self.num_grammar_states
        self.num_states = self.eod_state + 1
        self.vocab_size = len(self.words)
        self.domain_subset = config.domain_subset
        self.domain_prior = np.zeros(self.num_domains)
        self.domain_prior[list(self.domain_subset)] = 1.0 / len(self.domain_subset)

        self.state_domain = np.r_[np.repeat(np.arange(self.num_domains), self.num_grammar_states), -1]
        self.state_grammar = np.r_[np.tile(np.arange(self.num_grammar_states), self.num_domains), -1]
        self.state_class = np.r_[np.asarray(GRAMMAR_STATE_CLASS)[self.state_grammar[:-1]], EOD]

        self.sense_word = np.array([e.word_id for e in self.lexicon])
        self.sense_class = np.array([e.word_class for e in self.lexicon])
        self.sense_domain = np.array([e.domain for e in self.lexicon])

        self.transition = self._build_transition()
        self.initial = self.transition[self.eod_state].copy()
        self.sense_emission = self._build_sense_emission()
        incidence = np.zeros((len(self.lexicon), self.vocab_size))
        incidence[np.arange(len(self.lexicon)), self.sense_word] = 1.0
        self.emission = self.sense_emission @ incidence

        # Forward-pass operands, laid out for [states, sequences] columns: the transposed transition
        # is sparse (about 2% non-zero by default), and emission rows are gathered per word.
        self._transition_t = scipy.sparse.csr_matrix(self.transition.T)
        self._emission_by_word = np.ascontiguousarray(self.emission.T)
        self._transition_sampler = _RowSampler(self.transition)
        self._emission_sampler = _RowSampler(self.sense_emission)
        self._initial_sampler = _RowSampler(self.initial[None, :])

    # -- construction ---------------------------------------------------------------------------
    def _build_transition(self) -> np.ndarray:
        cfg, G, D = self.config, self.num_grammar_states, self.num_domains
        grammar, start = _grammar_matrix(), _start_vector()
        T = np.zeros((self.num_states, self.num_states))
        subset = self.domain_subset
        for d in range(D):
            block = slice(d * G, (d + 1) * G)
            T[block, block] = grammar
            end = d * G + END_STATE
            T[end, self.eod_state] = cfg.p_end
            for target in subset:
                if d not in subset:  # never reached; any distribution keeps the row stochastic
                    domain_prob = self.domain_prior[target]
                elif len(subset) == 1:  # nowhere to switch to
                    domain_prob = 1.0
                else:
                    stay = target == d
                    domain_prob = (1.0 - cfg.p_switch) if stay else cfg.p_switch / (len(subset) - 1)
                T[end, target * G : (target + 1) * G] += (1.0 - cfg.p_end) * domain_prob * start
        for target in range(D):
            T[self.eod_state, target * G : (target + 1) * G] = self.domain_prior[target] * start
        return T

    def _zipf(self, size: int) -> np.ndarray:
        weights = np.arange(1, size + 1, dtype=float) ** -self.config.zipf_exponent
        return weights / weights.sum()

    def _build_sense_emission(self) -> np.ndarray:
        E = np.zeros((self.num_states, len(self.lexicon)))
        E[self.eod_state, 0] = 1.0
        for s in range(self.eod_state):
            word_class, domain = self.state_class[s], self.state_domain[s]
            mask = self.sense_class == word_class
            if word_class in CONTENT_CLASSES:
                mask &= self.sense_domain == domain
            senses = np.flatnonzero(mask)  # already in rank order
            E[s, senses] = self._zipf(len(senses))
        return E

    # -- descriptive helpers ----------------------------------------------------------------------
    @property
    def domain_names(self) -> list[str]:
        return [DOMAIN_NAMES[d] if d < len(DOMAIN_NAMES) else f"domain_{d}" for d in range(self.num_domains)]

    @property
    def homonym_word_ids(self) -> list[int]:
        """Generator word ids whose surface form carries two senses."""
        return sorted({e.word_id for e in self.lexicon if e.homonym_of is not None})

    def senses_of(self, word_id: int) -> list[LexicalEntry]:
        return [e for e in self.lexicon if e.word_id == word_id]

    def state_name(self, state: int) -> str:
        if state == self.eod_state:
            return "EOD"
        domain, grammar = self.state_domain[state], self.state_grammar[state]
        return f"{self.domain_names[domain]}:{GRAMMAR_STATE_NAMES[grammar]}"

    def decode(self, word_ids: Sequence[int]) -> str:
        return " ".join(self.words[int(w)] for w in word_ids)

    # -- sampling ---------------------------------------------------------------------------------
    def sample(self, n: int, rng: np.random.Generator, seq_len: int | None = None) -> dict[str, np.ndarray]:
        """Draw ``n`` independent examples of ``seq_len`` tokens (default: the config's).

        Returns int64 arrays of shape ``[n, seq_len]``: ``word_ids`` (column 0 is ``BOS_WORD_ID``),
        ``domain`` (the hidden domain; ``[EOD]`` keeps the domain of the document it closes, and
        ``[BOS]`` gets -1), ``word_class`` (index into ``WORD_CLASS_NAMES``), ``sense`` (lexical
        entry id, -1 for ``[BOS]``) and ``state`` (hidden state, -1 for ``[BOS]``).
        """
        seq_len = self.config.seq_len if seq_len is None else seq_len
        if n < 0 or seq_len < 1:
            raise ValueError(f"sample needs n >= 0 and seq_len >= 1, got n={n}, seq_len={seq_len}.")
        keys = ("word_ids", "domain", "sense", "state")
        out = {key: np.full((n, seq_len), -1, dtype=np.int64) for key in keys}
        out["word_ids"][:, 0] = BOS_WORD_ID
        out["word_class"] = np.full((n, seq_len), BOS, dtype=np.int64)
        if n == 0 or seq_len == 1:
            return out
        state = self._initial_sampler.draw(np.zeros(n, dtype=np.int64), rng)
        domain = self.state_domain[state]
        for t in range(1, seq_len):
            sense = self._emission_sampler.draw(state, rng)
            domain = np.where(state == self.eod_state, domain, self.state_domain[state])
            out["state"][:, t] = state
            out["sense"][:, t] = sense
            out["word_ids"][:, t] = self.sense_word[sense]
            out["word_class"][:, t] = self.sense_class[sense]
            out["domain"][:, t] = domain
            if t + 1 < seq_len:
                state = self._transition_sampler.draw(state, rng)
        return out

    # -- exact likelihoods ------------------------------------------------------------------------
    def _check_word_ids(self, word_ids: np.ndarray) -> np.ndarray:
        word_ids = np.asarray(word_ids)
        if word_ids.ndim == 1:
            word_ids = word_ids[None, :]
        if word_ids.ndim != 2 or word_ids.shape[1] < 2:
            raise ValueError(f"word_ids must have shape [n, length >= 2], got {word_ids.shape}.")
        if word_ids.size and (word_ids.min() < 0 or word_ids.max() >= self.vocab_size):
            raise ValueError(f"word_ids must lie in [0, {self.vocab_size}); got values outside.")
        if not np.all(word_ids[:, 0] == BOS_WORD_ID):
            raise ValueError(f"every example must start with [BOS] (word id {BOS_WORD_ID}).")
        return word_ids.astype(np.int64, copy=False)

    def log_probs(self, word_ids: np.ndarray, chunk_size: int = 1024) -> np.ndarray:
        """Exact ``log p(w_t | w_<t)`` for ``t = 1 .. length - 1``, shape ``[n, length - 1]``.

        The scaled forward algorithm over hidden states, stepped for all sequences at once. A word
        the language cannot produce there gets ``-inf`` (and so does everything after it).
        """
        word_ids = self._check_word_ids(word_ids)
        n, length = word_ids.shape
        out = np.empty((n, length - 1))
        # Chunks keep the [states, chunk] working arrays in cache: about 2.5x faster than one pass
        # over 24k sequences on a 2-core machine.
        for lo in range(0, n, chunk_size):
            out[lo : lo + chunk_size] = self._forward(word_ids[lo : lo + chunk_size])
        return out

    def _forward(self, word_ids: np.ndarray) -> np.ndarray:
        n, length = word_ids.shape
        out = np.empty((n, length - 1))
        predicted = np.repeat(self.initial[:, None], n, axis=1)  # [states, sequences]
        with np.errstate(divide="ignore", invalid="ignore"):
            for t in range(1, length):
                joint = predicted * self._emission_by_word[word_ids[:, t]].T
                prob = joint.sum(axis=0)
                out[:, t - 1] = np.log(prob)
                if t + 1 < length:
                    # Dead sequences (prob 0) keep an all-zero posterior, so their later steps stay -inf.
                    posterior = joint / np.where(prob > 0, prob, 1.0)
                    predicted = self._transition_t @ posterior
        return out

    def optimal_cross_entropy(self, word_ids: np.ndarray) -> float:
        """Mean nats per predicted token (all positions after ``[BOS]``) of the Bayes-optimal predictor."""
        return float(-self.log_probs(word_ids).mean())

    def masked_log_probs(self, observed: np.ndarray, labels: np.ndarray, channel: "MaskingChannel") -> np.ndarray:
        """Exact Bayes-optimal ``log p(w_t = label_t | every observed token, t was selected)`` of a masked
        language model at each labelled position, in row-major order; shape ``[number of labels]``.

        ``observed`` ([n, L] word ids, column 0 ``[BOS]``) is what the model reads after the masking
        collator, with -1 for ``[MASK]`` and -2 for any other token the language never emits (a random
        replacement can draw one); ``labels`` holds the original word where the collator selected a
        position and -100 elsewhere. Every position is a noisy view of its word through ``channel``:
        unselected it shows the word; selected, ``[MASK]``, a uniformly random token or the word. Which
        other positions were selected is unknown to the model, so each contributes the marginal channel
        likelihood ``λ_s(w)`` to a forward-backward pass; the target's own view is read given that it was
        selected. The posterior is ``∝ Σ_z p(z_t = z | o_<t) β_t(z) e(z, w) · P(selected | w) ·
        P(o_t | w, selected)``.
        """
        observed, labels = np.asarray(observed, dtype=np.int64), np.asarray(labels, dtype=np.int64)
        if observed.ndim != 2 or observed.shape != labels.shape or observed.shape[1] < 2:
            raise ValueError(f"observed and labels must share a shape [n, length >= 2]; got {observed.shape}, {labels.shape}")
        selectable = channel.select_prob * channel.selectable.astype(float)  # P(selected | w)
        # Σ_w e(z, w) P(selected | w): the part of every state's emission that could have been replaced.
        replaceable = self.emission @ selectable
        n, length = observed.shape
        out = []
        transition = scipy.sparse.csr_matrix(self.transition)
        for lo in range(0, n, 256):
            obs, lab = observed[lo : lo + 256], labels[lo : lo + 256]
            m = obs.shape[0]
            # Marginal channel likelihood of each state at each position: [length, states, m].
            seen = np.where(obs >= 0, obs, 0)
            kept = np.where(obs >= 0, 1.0 - selectable[seen] * (1.0 - channel.keep_prob), 0.0)
            noise = channel.random_prob / channel.vocab_size + channel.mask_prob * (obs == -1)
            likelihood = self._emission_by_word[seen].transpose(1, 2, 0) * kept.T[:, None, :]
            likelihood = likelihood + noise.T[:, None, :] * replaceable[None, :, None]
            # Forward (predicted state distributions before each position) and scaled backward.
            predicted = np.empty((length, self.num_states, m))
            scale = np.empty((length, m))
            current = np.repeat(self.initial[:, None], m, axis=1)
            for t in range(1, length):
                predicted[t] = current
                joint = current * likelihood[t]
                scale[t] = joint.sum(axis=0)
                current = self._transition_t @ (joint / scale[t])
            backward = np.empty((length, self.num_states, m))
            backward[length - 1] = 1.0
            for t in range(length - 2, 0, -1):
                backward[t] = transition @ (likelihood[t + 1] * backward[t + 1]) / scale[t + 1]
            rows, cols = np.nonzero(lab[:, 1:] != -100)
            cols = cols + 1
            weights = predicted[cols, :, rows] * backward[cols, :, rows]  # [targets, states]
            words = (weights @ self.emission) * selectable[None, :]
            view = np.full(words.shape, channel.random_prob / channel.vocab_size)
            view += channel.mask_prob * (obs[rows, cols] == -1)[:, None]
            hit = obs[rows, cols] >= 0
            view[np.flatnonzero(hit), obs[rows, cols][hit]] += channel.keep_prob
            posterior = words * view
            target = lab[rows, cols]
            out.append(np.log(posterior[np.arange(len(target)), target]) - np.log(posterior.sum(axis=1)))
        return np.concatenate(out) if out else np.empty(0)

    def brute_force_masked_log_probs(
        self, observed: np.ndarray, labels: np.ndarray, channel: "MaskingChannel", max_paths: int = 2_000_000
    ) -> np.ndarray:
        """``masked_log_probs`` by summing over every hidden path and every original word at each
        position: ``p(w_t, o) = Σ_path p(path) Π_s Σ_w e(z_s, w) P(o_s | w)``; tiny configs only (tests)."""
        selectable = channel.select_prob * channel.selectable.astype(float)
        vocab = np.arange(self.vocab_size)
        out = []
        for obs, lab in zip(np.asarray(observed), np.asarray(labels)):
            length = len(obs)
            count = self.num_states ** (length - 1)
            if count > max_paths:
                raise ValueError(f"{count} hidden paths exceed max_paths={max_paths}; use a tiny config")

            def view(t: int, given_selected: bool) -> np.ndarray:
                """P(o_t | w) for every word w (selected or not, or given selected)."""
                random = channel.random_prob / channel.vocab_size + channel.mask_prob * (obs[t] == -1)
                replaced = random + channel.keep_prob * (vocab == obs[t])
                if given_selected:
                    return replaced
                return (1.0 - selectable) * (vocab == obs[t]) + selectable * replaced

            for t in range(1, length):
                if lab[t] == -100:
                    continue
                joint = np.zeros(self.vocab_size)
                for path in itertools.product(range(self.num_states), repeat=length - 1):
                    prob = self.initial[path[0]]
                    for k in range(1, length - 1):
                        prob *= self.transition[path[k - 1], path[k]]
                    if prob == 0.0:
                        continue
                    for s in range(1, length):
                        if s != t:
                            prob *= float(self.emission[path[s - 1]] @ view(s, False))
                    joint += prob * self.emission[path[t - 1]] * selectable * view(t, True)
                out.append(math.log(joint[lab[t]]) - math.log(math.fsum(joint.tolist())))
        return np.asarray(out)

    def brute_force_log_probs(self, word_ids: np.ndarray, max_paths: int = 2_000_000) -> np.ndarray:
        """``log_probs`` by summing over every hidden path; only for tiny configs (tests).

        Paths through a state that cannot emit the observed word have probability exactly zero, so
        enumerating the product of each position's emitting states is the full sum, just without
        the zero terms.
        """
        word_ids = self._check_word_ids(word_ids)
        n, length = word_ids.shape
        out = np.empty((n, length - 1))
        for i in range(n):
            supports = [np.flatnonzero(self.emission[:, w]) for w in word_ids[i, 1:]]
            previous_total = 1.0
            for t in range(1, length):
                prefix = supports[:t]
                count = math.prod(len(s) for s in prefix)
                if count > max_paths:
                    raise ValueError(f"{count} hidden paths exceed max_paths={max_paths}; use a tiny config")
                if count == 0:
                    out[i, t - 1 :] = -np.inf
                    break
                paths = np.array(list(itertools.product(*prefix)), dtype=np.int64).reshape(count, t)
                prob = self.initial[paths[:, 0]] * self.emission[paths[:, 0], word_ids[i, 1]]
                for k in range(1, t):
                    prob = prob * self.transition[paths[:, k - 1], paths[:, k]]
                    prob = prob * self.emission[paths[:, k], word_ids[i, k + 1]]
                total = math.fsum(prob.tolist())
                if total == 0.0:
                    out[i, t - 1 :] = -np.inf
                    break
                out[i, t - 1] = math.log(total) - math.log(previous_total)
                previous_total = total
        return out


# --------------------------------------------------------------------------------------------------
# n-gram baselines
# --------------------------------------------------------------------------------------------------

BASELINE_SMOOTHING = 0.01  # a fixed add-k constant: small enough not to flatten frequent words


def unigram_cross_entropy(
    train_ids: np.ndarray, test_ids: np.ndarray, vocab_size: int, k: float = BASELINE_SMOOTHING
) -> float:
    """Mean nats per token of an add-``k`` unigram model fitted on ``train_ids[:, 1:]``, scored on
    ``test_ids[:, 1:]`` (column 0, ``[BOS]``, is context only, as in ``log_probs``)."""
    return float(-unigram_log_probs(train_ids, vocab_size, k)[np.asarray(test_ids)[:, 1:]].mean())


def unigram_log_probs(train_ids: np.ndarray, vocab_size: int, k: float = BASELINE_SMOOTHING) -> np.ndarray:
    """Log-probabilities of the add-``k`` unigram model fitted on ``train_ids[:, 1:]``, shape ``[vocab_size]``."""
    counts = np.bincount(np.asarray(train_ids)[:, 1:].ravel(), minlength=vocab_size).astype(float)
    return np.log((counts + k) / (counts.sum() + k * vocab_size))


def masked_lm_floor(language: SyntheticLanguage, tokenizer, batches, train_input_ids: np.ndarray,
                    mask_prob: float, random_prob: float, select_prob: float) -> dict[str, float]:
    """The Bayes-optimal masked-token loss of evaluation ``batches`` (``(input_ids, labels)`` arrays as the
    masking collator made them, in the evaluation's order) and an add-k unigram baseline scored on the
    same labelled positions, both aggregated as the Trainer aggregates ``eval_loss``: each batch's mean
    over its labelled tokens, weighted by the batch's rows."""
    word_to_token, corpus_words = token_word_maps(language, tokenizer)
    unigram = unigram_log_probs(corpus_words[np.asarray(train_input_ids)], language.vocab_size)
    # The channel's view of a token: a language word, -1 for [MASK], -2 for another token it never emits.
    token_to_word = np.where(corpus_words >= 0, corpus_words, -2)
    token_to_word[tokenizer.mask_token_id] = -1
    special = set(tokenizer.all_special_ids)
    channel = MaskingChannel(
        select_prob=select_prob, mask_prob=mask_prob, random_prob=random_prob, vocab_size=len(tokenizer),
        selectable=np.array([int(t) not in special for t in word_to_token]),
    )
    totals = {"optimal": 0.0, "unigram": 0.0}
    rows = 0
    for input_ids, labels in batches:
        input_ids, labels = np.asarray(input_ids), np.asarray(labels)
        words = np.where(labels != -100, token_to_word[np.where(labels != -100, labels, 0)], -100)
        log_probs = language.masked_log_probs(token_to_word[input_ids], words, channel)
        if log_probs.size == 0:
            continue  # no labelled position in the whole batch: nothing to score
        totals["optimal"] += -log_probs.mean() * len(input_ids)
        totals["unigram"] += -unigram[words[words != -100]].mean() * len(input_ids)
        rows += len(input_ids)
    return {name: float(value / rows) for name, value in totals.items()}


def bigram_cross_entropy(
    train_ids: np.ndarray, test_ids: np.ndarray, vocab_size: int, k: float = BASELINE_SMOOTHING
) -> float:
    """Mean nats per token of an add-``k`` bigram model ``p(w_t | w_{t-1})`` fitted on ``train_ids``
    and scored on every position after ``[BOS]`` of ``test_ids`` (the first word is predicted from
    ``[BOS]``)."""
    train_ids, test_ids = np.asarray(train_ids), np.asarray(test_ids)
    pairs = train_ids[:, :-1].ravel() * vocab_size + train_ids[:, 1:].ravel()
    counts = np.bincount(pairs, minlength=vocab_size * vocab_size).astype(float)
    counts = counts.reshape(vocab_size, vocab_size)
    context = counts.sum(axis=1)
    prev, nxt = test_ids[:, :-1].ravel(), test_ids[:, 1:].ravel()
    probs = (counts[prev, nxt] + k) / (context[prev] + k * vocab_size)
    return float(-np.log(probs).mean())


# --------------------------------------------------------------------------------------------------
# The corpus
# --------------------------------------------------------------------------------------------------

SPECIAL_TOKENS: dict[str, str] = {
    "pad_token": "[PAD]",
    "unk_token": "[UNK]",
    "bos_token": "[BOS]",
    "eos_token": "[EOS]",
    "mask_token": "[MASK]",
    "cls_token": "[CLS]",
    "sep_token": "[SEP]",
}
LABEL_COLUMNS: tuple[str, ...] = ("domain", "word_class", "sense")


@dataclass
class SyntheticCorpus:
    """A built synthetic corpus: data, tokenizer, exact bounds and baselines.

    ``word_to_token[w]`` is the tokenizer id of generator word ``w`` (a bijection onto the
    non-special tokenizer ids plus ``[BOS]``); ``token_to_word`` inverts it, with -1 for tokenizer
    ids the language never produces (the other special tokens).
    """

    config: SyntheticCorpusConfig
    language: SyntheticLanguage
    dataset: Any  # datasets.DatasetDict
    tokenizer: Any  # transformers.PreTrainedTokenizerFast
    bounds: dict[str, dict[str, float]]
    baselines: dict[str, float]
    word_to_token: np.ndarray
    token_to_word: np.ndarray
    build_seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)

    def word_ids(self, input_ids: np.ndarray | Sequence[Sequence[int]]) -> np.ndarray:
        """Generator word ids of tokenizer ids (``ValueError`` on a token the language never emits)."""
        input_ids = np.asarray(input_ids, dtype=np.int64)
        if input_ids.size and (input_ids.min() < 0 or input_ids.max() >= len(self.token_to_word)):
            raise ValueError("input_ids contain ids outside the tokenizer's vocabulary.")
        words = self.token_to_word[input_ids]
        if np.any(words < 0):
            raise ValueError("input_ids contain special tokens the synthetic language never produces.")
        return words

    def optimal_log_probs(self, input_ids: np.ndarray | Sequence[Sequence[int]]) -> np.ndarray:
        """Exact Bayes-optimal ``log p(x_t | x_<t)`` for tokenizer-id examples starting with ``[BOS]``."""
        return self.language.log_probs(self.word_ids(input_ids))

    def homonym_token_ids(self) -> list[int]:
        """Tokenizer ids of surface forms that carry two senses (from two domains)."""
        return sorted(int(self.word_to_token[w]) for w in self.language.homonym_word_ids)

    def summary(self) -> dict[str, Any]:
        return {
            "kind": "decollapse-synthetic-corpus",
            "config": self.config.to_dict(),
            "vocab_size": len(self.tokenizer),
            "language_vocab_size": self.language.vocab_size,
            "num_states": self.language.num_states,
            "num_homonyms": len(self.language.homonym_word_ids),
            "domains": list(self.config.domain_subset),
            "bounds": self.bounds,
            "baselines": self.baselines,
            "baseline_smoothing_k": BASELINE_SMOOTHING,
            "build_seconds": self.build_seconds,
        }

    def to_json(self, path: str | Path | None = None) -> str:
        """The summary as JSON text, also written to ``path`` when given (e.g. next to a checkpoint)."""
        text = json.dumps(self.summary(), indent=2, sort_keys=True)
        if path is not None:
            Path(path).write_text(text + "\n", encoding="utf-8")
        return text


def split_rng(config: SyntheticCorpusConfig, split: str) -> np.random.Generator:
    """The random stream of one split; each split is its own draw, so splits never share examples
    by construction (beyond chance repeats, which at 127 words are astronomically unlikely). A domain
    subset has streams of its own, so two subsets' corpora are independent draws too."""
    if not config.restricts_domains:
        return np.random.default_rng([config.seed, _SPLIT_STREAMS[split]])
    # The subset as a bit mask: one non-zero integer per subset (SeedSequence reads [x, 0] as [x]).
    mask = sum(1 << domain for domain in config.domain_subset)
    return np.random.default_rng([config.seed, _SPLIT_STREAMS[split], _SUBSET_STREAM, mask])


def token_word_maps(language: SyntheticLanguage, tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """``word_to_token`` (the tokenizer id of each language word) and ``token_to_word`` (its inverse, -1
    for tokenizer ids the language never produces)."""
    word_to_token = np.array([tokenizer.convert_tokens_to_ids(w) for w in language.words], dtype=np.int64)
    token_to_word = np.full(len(tokenizer), -1, dtype=np.int64)
    token_to_word[word_to_token] = np.arange(language.vocab_size)
    return word_to_token, token_to_word


def _build_tokenizer(language: SyntheticLanguage, train_word_ids: np.ndarray):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(SPECIAL_TOKENS.values())
    tokenizer = Tokenizer(models.WordLevel(unk_token=SPECIAL_TOKENS["unk_token"]))
    # Split on whitespace only: the language's words are whitespace-separated and "[EOD]" and
    # punctuation must stay single tokens (the regex Whitespace pre-tokenizer would cut "[EOD]").
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # Every decoded word carries its leading space, as GPT-2's byte-level tokens do: generation
    # pipelines decode the continuation alone and append it to the prompt, which would otherwise glue
    # the first new word to the last prompt word. A decoded text therefore starts with a space.
    tokenizer.decoder = decoders.Replace(Regex("^"), " ")
    trainer = trainers.WordLevelTrainer(
        vocab_size=len(specials) + language.vocab_size,
        min_frequency=0,
        special_tokens=specials,
        show_progress=False,
    )
    surface = np.asarray(language.words, dtype=object)

    def texts():
        # The full lexicon first, so that words too rare to occur in train still get an id.
        yield " ".join(language.words[BOS_WORD_ID + 1 :])
        for row in surface[train_word_ids[:, 1:]]:
            yield " ".join(row)

    tokenizer.train_from_iterator(texts(), trainer=trainer)
    bos = SPECIAL_TOKENS["bos_token"]
    # tokenizer(text) then yields exactly the dataset's layout: [BOS] followed by the words.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, model_max_length=language.config.seq_len, **SPECIAL_TOKENS
    )
    return wrapped


def _arrow_lists(array: np.ndarray):
    import pyarrow as pa

    offsets = np.arange(0, array.size + 1, array.shape[1], dtype=np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.ascontiguousarray(array).reshape(-1)))


def build_synthetic_corpus(config: SyntheticCorpusConfig | None = None) -> SyntheticCorpus:
    """Generate the corpus of ``config`` (default config if None): splits, tokenizer, exact bounds
    on every split and the n-gram baselines on test. Deterministic in ``config``."""
    import datasets
    import pyarrow as pa

    config = SyntheticCorpusConfig() if config is None else config
    timings: dict[str, float] = {}
    start = clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = now - clock
        clock = now

    language = SyntheticLanguage(config)
    lap("language")
    sizes = {"train": config.num_train, "validation": config.num_validation, "test": config.num_test}
    samples = {split: language.sample(n, split_rng(config, split)) for split, n in sizes.items()}
    lap("sample")

    tokenizer_text = samples["train"]["word_ids"]
    if config.restricts_domains:
        # The word-level tokenizer numbers words by their train frequency: a subset's own train text
        # would renumber the vocabulary. Every subset keeps the full corpus's tokenizer, so a model
        # trained on one subset reads another.
        full = dataclasses.replace(config, domains=None)
        tokenizer_text = SyntheticLanguage(full).sample(full.num_train, split_rng(full, "train"))["word_ids"]
    tokenizer = _build_tokenizer(language, tokenizer_text)
    word_to_token, token_to_word = token_word_maps(language, tokenizer)
    one_to_one = len(np.unique(word_to_token)) == language.vocab_size
    if np.any(word_to_token == tokenizer.unk_token_id) or not one_to_one:
        raise AssertionError("the word-level tokenizer does not cover the synthetic lexicon one-to-one")
    lap("tokenizer")

    splits = {}
    for split, sample in samples.items():
        input_ids = word_to_token[sample["word_ids"]]
        assert not np.any(input_ids == tokenizer.unk_token_id), "[UNK] in synthetic data"
        columns = {"input_ids": _arrow_lists(input_ids)}
        columns.update({name: _arrow_lists(sample[name]) for name in LABEL_COLUMNS})
        splits[split] = datasets.Dataset(pa.table(columns))
    dataset = datasets.DatasetDict(splits)
    lap("dataset")

    bounds = {}
    for split, sample in samples.items():
        cross_entropy = language.optimal_cross_entropy(sample["word_ids"])
        bounds[split] = {"cross_entropy": cross_entropy, "perplexity": math.exp(cross_entropy)}
    lap("bounds")

    train_ids, test_ids = samples["train"]["word_ids"], samples["test"]["word_ids"]
    baselines = {
        "unigram_perplexity": math.exp(unigram_cross_entropy(train_ids, test_ids, language.vocab_size)),
        "bigram_perplexity": math.exp(bigram_cross_entropy(train_ids, test_ids, language.vocab_size)),
    }
    lap("baselines")
    total = time.perf_counter() - start
    logger.info(
        "synthetic corpus built in %.2fs (%s); optimal test perplexity %.3f, unigram %.3f, bigram %.3f",
        total,
        ", ".join(f"{k} {v:.2f}s" for k, v in timings.items()),
        bounds["test"]["perplexity"],
        baselines["unigram_perplexity"],
        baselines["bigram_perplexity"],
    )
    return SyntheticCorpus(
        config=config,
        language=language,
        dataset=dataset,
        tokenizer=tokenizer,
        bounds=bounds,
        baselines=baselines,
        word_to_token=word_to_token,
        token_to_word=token_to_word,
        build_seconds=total,
        timings=timings,
    )
