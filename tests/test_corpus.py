"""Tests of the embedded synthetic corpus (exact bounds, labels, tokenizer) and the text-corpus loader."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest
from scipy import stats
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from decollapse.data import (
    WORD_CLASS_NAMES,
    SyntheticCorpusConfig,
    SyntheticLanguage,
    build_synthetic_corpus,
    load_text_corpus,
)
from decollapse.data.synthetic import (
    BOS_WORD_ID,
    EOD_WORD_ID,
    MaskingChannel,
    bigram_cross_entropy,
    unigram_cross_entropy,
)

SHARED_DATA = Path(__file__).parents[1].parent / "shared" / "data"

# Two domains, a handful of content words, short sentences and frequent switches and document ends:
# small enough to enumerate every hidden path, busy enough to cross [EOD] and domain switches.
TINY = dict(
    num_domains=2,
    nouns=3,
    verbs=2,
    adjectives=2,
    homonym_rate=0.5,
    homonym_class_change=0.5,
    p_switch=0.5,
    p_end=0.5,
    num_train=10,
    num_validation=2,
    num_test=2,
)
SMALL = dict(num_train=300, num_validation=40, num_test=40, seq_len=64)
# The same tiny language with a third domain, restricted to two of them: documents start and switch
# only among domains 0 and 2, so the bound must come from the restricted process, not the full one.
TINY_SUBSET = {**TINY, "num_domains": 3, "domains": "0,2"}


@pytest.fixture(scope="module")
def default_corpus():
    return build_synthetic_corpus(SyntheticCorpusConfig())


def _column(dataset, name):
    """A list column of equal-length rows as one [rows, length] array, straight from Arrow."""
    column = dataset.data.column(name).combine_chunks()
    lengths = np.asarray(pc.list_value_length(column))
    assert (lengths == lengths[0]).all(), f"{name} rows differ in length"
    return np.asarray(column.flatten()).reshape(len(dataset), int(lengths[0]))


# --------------------------------------------------------------------------------------------------
# Exactness of the bound
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tiny", [TINY, TINY_SUBSET], ids=["all-domains", "domain-subset"])
def test_forward_equals_brute_force_enumeration(tiny):
    language = SyntheticLanguage(SyntheticCorpusConfig(seq_len=7, **tiny))
    sample = language.sample(1000, np.random.default_rng(3))["word_ids"]
    supports = (language.emission[:, sample[:, 1:]] > 0).sum(axis=0)  # [n, 6] emitting states
    cheap = np.prod(supports, axis=1) <= 50_000
    crossing = (sample == EOD_WORD_ID).any(axis=1)
    cheap = np.concatenate([sample[cheap & crossing][:20], sample[cheap & ~crossing][:20]])
    homonyms = np.isin(cheap, language.homonym_word_ids).any(axis=1)
    assert (cheap == EOD_WORD_ID).any(axis=1).sum() >= 3, "the check must cross document boundaries"
    assert homonyms.sum() >= 3, "the check must include homonyms"
    # A word no state can produce at that point (a second [BOS]) must be -inf in both.
    impossible = cheap[:1].copy()
    impossible[0, 3] = BOS_WORD_ID
    words = np.concatenate([cheap, impossible])

    forward = language.log_probs(words)
    brute = language.brute_force_log_probs(words)
    finite = np.isfinite(brute)
    assert np.array_equal(finite, np.isfinite(forward))
    assert not finite[-1, 2:].any()
    np.testing.assert_allclose(forward[finite], brute[finite], rtol=0, atol=1e-10)


@pytest.mark.parametrize("tiny", [TINY, TINY_SUBSET], ids=["all-domains", "domain-subset"])
def test_probabilities_of_all_sequences_sum_to_one(tiny):
    language = SyntheticLanguage(SyntheticCorpusConfig(seq_len=4, **tiny))
    every = np.array(list(itertools.product(range(language.vocab_size), repeat=3)))
    every = np.concatenate([np.full((len(every), 1), BOS_WORD_ID), every], axis=1)
    joint = np.exp(language.log_probs(every).sum(axis=1))
    assert math.isclose(math.fsum(joint.tolist()), 1.0, abs_tol=1e-10)
    assert (joint > 0).sum() > 100  # the sum is not carried by a few sequences


@pytest.mark.parametrize("tiny", [TINY, TINY_SUBSET], ids=["all-domains", "domain-subset"])
def test_sampler_draws_from_the_model_it_scores(tiny):
    """The bound is only the floor of the corpus if the sampler draws from the model the forward
    algorithm scores; for a domain subset, both must be the restricted process."""
    language = SyntheticLanguage(SyntheticCorpusConfig(seq_len=3, **tiny))
    draws = language.sample(200_000, np.random.default_rng(11))
    pairs, counts = np.unique(draws["word_ids"][:, 1:], axis=0, return_counts=True)
    every = np.array(list(itertools.product(range(language.vocab_size), repeat=2)))
    every = np.concatenate([np.full((len(every), 1), BOS_WORD_ID), every], axis=1)
    expected = np.exp(language.log_probs(every).sum(axis=1))
    observed = np.zeros(len(every))
    observed[pairs[:, 0] * language.vocab_size + pairs[:, 1]] = counts
    assert observed[expected == 0].sum() == 0, "sampled a sequence the model calls impossible"
    expected *= len(draws["word_ids"])
    big = expected >= 5
    obs = np.r_[observed[big], observed[~big & (expected > 0)].sum()]
    exp = np.r_[expected[big], expected[~big & (expected > 0)].sum()]
    obs, exp = obs[exp > 0], exp[exp > 0]
    assert stats.chisquare(obs, exp).pvalue > 1e-4

    # Labels are those of the drawn sense.
    sense = draws["sense"][:, 1:]
    assert np.array_equal(language.sense_word[sense], draws["word_ids"][:, 1:])
    assert np.array_equal(language.sense_class[sense], draws["word_class"][:, 1:])
    content = language.sense_domain[sense] >= 0
    assert np.array_equal(language.sense_domain[sense][content], draws["domain"][:, 1:][content])


# --------------------------------------------------------------------------------------------------
# The default corpus: bounds, hardness, labels, tokenizer
# --------------------------------------------------------------------------------------------------


def test_bound_is_below_the_baselines_and_the_corpus_is_hard(default_corpus):
    corpus = default_corpus
    optimum = corpus.bounds["test"]["perplexity"]
    assert corpus.baselines["bigram_perplexity"] >= 1.3 * optimum
    assert corpus.baselines["unigram_perplexity"] >= 2.0 * optimum
    for split in ("train", "validation", "test"):
        bound = corpus.bounds[split]
        assert math.isclose(bound["perplexity"], math.exp(bound["cross_entropy"]))
        assert 2.0 < bound["cross_entropy"] < 5.0


def test_bound_is_computed_on_the_dataset_tokens(default_corpus):
    corpus = default_corpus
    input_ids = _column(corpus.dataset["test"], "input_ids")
    ce = -corpus.optimal_log_probs(input_ids).mean()
    assert ce == pytest.approx(corpus.bounds["test"]["cross_entropy"], abs=1e-12)
    # A predictor that believes the wrong switching rate is worse on the same tokens.
    wrong = SyntheticLanguage(SyntheticCorpusConfig(p_switch=0.3))
    assert wrong.words == corpus.language.words
    assert wrong.optimal_cross_entropy(corpus.word_ids(input_ids)) > ce + 1e-3


def test_ngram_baselines_never_beat_the_optimum():
    language = SyntheticLanguage(SyntheticCorpusConfig(**SMALL))
    train = language.sample(2000, np.random.default_rng(1))["word_ids"]
    test = language.sample(300, np.random.default_rng(2))["word_ids"]
    optimum = language.optimal_cross_entropy(test)
    bigram = bigram_cross_entropy(train, test, language.vocab_size)
    unigram = unigram_cross_entropy(train, test, language.vocab_size)
    assert optimum < bigram < unigram


def test_labels_are_aligned(default_corpus):
    corpus = default_corpus
    language = corpus.language
    for split in ("train", "validation", "test"):
        dataset = corpus.dataset[split]
        assert dataset.column_names == ["input_ids", "domain", "word_class", "sense"]
        columns = {name: _column(dataset, name) for name in dataset.column_names}
        for name, values in columns.items():
            assert values.shape == (len(dataset), corpus.config.seq_len), name
        ids, domain, word_class, sense = (columns[k] for k in ("input_ids", "domain", "word_class", "sense"))
        assert (ids[:, 0] == corpus.tokenizer.bos_token_id).all()
        assert (domain[:, 0] == -1).all() and (sense[:, 0] == -1).all()
        assert (word_class[:, 0] == WORD_CLASS_NAMES.index("BOS")).all()
        words = corpus.word_ids(ids)[:, 1:]
        assert np.array_equal(language.sense_word[sense[:, 1:]], words)
        assert np.array_equal(language.sense_class[sense[:, 1:]], word_class[:, 1:])
        assert ((domain[:, 1:] >= 0) & (domain[:, 1:] < corpus.config.num_domains)).all()
        assert (word_class[:, 1:][words == EOD_WORD_ID] == WORD_CLASS_NAMES.index("EOD")).all()


def test_tokenizer_special_ids_round_trip_and_no_unk(default_corpus, tmp_path):
    corpus = default_corpus
    tokenizer = corpus.tokenizer
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    expected = {"pad": 0, "unk": 1, "bos": 2, "eos": 3, "mask": 4, "cls": 5, "sep": 6}
    assert {k: getattr(tokenizer, f"{k}_token_id") for k in expected} == expected
    assert "[EOD]" not in tokenizer.all_special_tokens
    assert tokenizer.convert_tokens_to_ids("[EOD]") == corpus.word_to_token[EOD_WORD_ID]
    assert len(np.unique(corpus.word_to_token)) == corpus.language.vocab_size  # bijection
    assert len(tokenizer) == corpus.language.vocab_size + 6  # specials other than [BOS]

    for split in ("train", "validation", "test"):
        assert not (_column(corpus.dataset[split], "input_ids") == tokenizer.unk_token_id).any()
    rows = _column(corpus.dataset["validation"], "input_ids")[:20]
    texts = [tokenizer.decode(row, skip_special_tokens=True) for row in rows]
    assert np.array_equal(np.asarray(tokenizer(texts)["input_ids"]), rows)
    assert texts[0] == " " + corpus.language.decode(corpus.word_ids(rows[0])[1:])

    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded.get_vocab() == tokenizer.get_vocab()
    assert reloaded(texts)["input_ids"] == tokenizer(texts)["input_ids"]
    assert reloaded.pad_token_id == 0 and reloaded.bos_token_id == 2

    summary = json.loads(corpus.to_json(tmp_path / "corpus.json"))
    assert summary["bounds"] == corpus.bounds and summary["vocab_size"] == len(tokenizer)
    assert json.loads((tmp_path / "corpus.json").read_text()) == summary


# --------------------------------------------------------------------------------------------------
# Homonyms
# --------------------------------------------------------------------------------------------------


def test_homonyms_occur_with_two_senses_and_domain_specific_continuations(default_corpus):
    corpus = default_corpus
    language = corpus.language
    homonyms = corpus.homonym_token_ids()
    assert len(homonyms) == round(0.08 * 8 * (150 + 80 + 60) / 2)
    train = corpus.dataset["train"]
    ids, domain, sense = (_column(train, k) for k in ("input_ids", "domain", "sense"))
    assert not np.isin(ids[:, 0], homonyms).any()
    # Next words are binned for the test of homogeneity: a function word is its own bin, a content
    # word falls in the bin of its domain(s), so rare domain words still count as evidence.
    bins = np.empty(len(corpus.token_to_word), dtype=np.int64)
    for token, word in enumerate(corpus.token_to_word):
        domains = {e.domain for e in language.senses_of(int(word))} if word >= 0 else {-1}
        bins[token] = token if domains == {-1} else -sum(1 << d for d in domains)

    seen_in_two_domains, p_values = 0, []
    for token in homonyms:
        senses = language.senses_of(int(corpus.token_to_word[token]))
        assert len(senses) == 2 and senses[0].domain != senses[1].domain
        rows, cols = np.nonzero(ids == token)
        seen = {(int(s), int(d)) for s, d in zip(sense[rows, cols], domain[rows, cols], strict=True)}
        assert seen <= {(e.sense, e.domain) for e in senses}
        seen_in_two_domains += len(seen) == 2

        keep = cols + 1 < ids.shape[1]
        following, where = bins[ids[rows[keep], cols[keep] + 1]], domain[rows[keep], cols[keep]]
        by_domain = [following[where == e.domain] for e in senses]
        if min(len(f) for f in by_domain) < 100:
            continue
        outcomes = np.unique(following)
        table = np.array([[np.sum(f == o) for o in outcomes] for f in by_domain])
        p_values.append(stats.chi2_contingency(table).pvalue)
    assert seen_in_two_domains >= 0.9 * len(homonyms)
    assert len(p_values) >= 20
    # Same next-word distribution in both domains would make these p-values uniform on [0, 1].
    assert max(p_values) < 1e-4


# --------------------------------------------------------------------------------------------------
# Determinism and configuration
# --------------------------------------------------------------------------------------------------


def test_same_seed_same_corpus_other_seed_other_corpus():
    first = build_synthetic_corpus(SyntheticCorpusConfig(**SMALL))
    again = build_synthetic_corpus(SyntheticCorpusConfig(**SMALL))
    other = build_synthetic_corpus(SyntheticCorpusConfig(seed=1, **SMALL))
    for split in ("train", "validation", "test"):
        for name in ("input_ids", "domain", "word_class", "sense"):
            assert np.array_equal(_column(first.dataset[split], name), _column(again.dataset[split], name))
    assert first.bounds == again.bounds and first.baselines == again.baselines
    assert first.tokenizer.get_vocab() == again.tokenizer.get_vocab()

    assert first.language.words != other.language.words
    assert first.bounds != other.bounds
    train_ids = _column(first.dataset["train"], "input_ids")
    assert not np.array_equal(train_ids, _column(other.dataset["train"], "input_ids"))

    rows = {split: {tuple(r) for r in _column(first.dataset[split], "input_ids")} for split in first.dataset}
    assert not rows["train"] & rows["validation"]
    assert not rows["train"] & rows["test"]
    assert not rows["validation"] & rows["test"]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("num_domains", 1),
        ("nouns", 0),
        ("verbs", 2.5),
        ("adjectives", True),
        ("zipf_exponent", -1.0),
        ("zipf_exponent", float("nan")),
        ("homonym_rate", 1.5),
        ("homonym_class_change", -0.1),
        ("p_switch", 2.0),
        ("p_end", "0.1"),
        ("seq_len", 1),
        ("num_train", 0),
        ("num_validation", -3),
        ("num_test", None),
        ("seed", -1),
    ],
)
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=rf"SyntheticCorpusConfig\.{field}="):
        SyntheticCorpusConfig(**{field: value})


def test_impossible_homonym_share_is_rejected():
    with pytest.raises(ValueError, match="homonym_rate"):
        SyntheticLanguage(
            SyntheticCorpusConfig(
                num_domains=2, nouns=3, verbs=1, adjectives=1, homonym_rate=1.0, homonym_class_change=1.0
            )
        )


# --------------------------------------------------------------------------------------------------
# Domain subsets
# --------------------------------------------------------------------------------------------------

# sha256 over the int64 bytes of input_ids, domain, word_class and sense (in that order) of each split
# of the default corpus, recorded before domain subsets existed (commit f8fe236): the README's and
# CORPUS.md's numbers were measured on exactly these examples.
DEFAULT_CORPUS_SHA256 = {
    "train": "a43853ca03908800d1001c81a5f22524022b9b4c7207c4e47fbf99e8f06bb982",
    "validation": "73b079e6763eabf76cad0d256b0389729fa6ea2a4f642e62f3f2bca71469f990",
    "test": "8cfd84718a1b68ccdceca7540d3ed69dd3ee9133cb54a1b6978976f95d73d66d",
}


def _split_sha256(dataset) -> str:
    digest = hashlib.sha256()
    for name in ("input_ids", "domain", "word_class", "sense"):
        digest.update(_column(dataset, name).astype(np.int64).tobytes())
    return digest.hexdigest()


def test_default_corpus_is_unchanged(default_corpus):
    assert {split: _split_sha256(default_corpus.dataset[split]) for split in DEFAULT_CORPUS_SHA256} == (
        DEFAULT_CORPUS_SHA256
    )
    assert default_corpus.bounds["test"]["cross_entropy"] == pytest.approx(3.4033008803091405, abs=1e-12)
    assert default_corpus.config.domain_subset == tuple(range(8)) and not default_corpus.config.restricts_domains


@pytest.mark.parametrize(
    ("text", "domains"),
    [("0-3", (0, 1, 2, 3)), ("0,2,5", (0, 2, 5)), ("4", (4,)), ("5, 0-1", (0, 1, 5)), ("0-7", tuple(range(8)))],
)
def test_domain_subset_forms(text, domains):
    config = SyntheticCorpusConfig(domains=text)
    assert config.domain_subset == domains
    assert config.restricts_domains == (len(domains) < 8)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("0-9", "9 is out of range"),
        ("8", "8 is out of range"),
        ("3-1", "the range 3-1 runs backwards"),
        ("a", "'a' is not an index or a range"),
        ("", "'' is not an index or a range"),
        ("1,,2", "'' is not an index or a range"),
        ("-1", "'-1' is not an index or a range"),
        ("0-2,2", "domain 2 is named twice"),
    ],
)
def test_bad_domain_subset_names_the_field_the_value_and_what_is_allowed(text, problem):
    with pytest.raises(ValueError) as caught:
        SyntheticCorpusConfig(domains=text)
    message = str(caught.value)
    assert message.startswith(f"SyntheticCorpusConfig.domains={text!r} is not allowed: expected domain indices in 0-7")
    assert "0-3" in message and "0,2,5" in message and problem in message and "\n" not in message


def test_domain_subset_corpus_holds_only_its_domains_in_the_same_language():
    full = build_synthetic_corpus(SyntheticCorpusConfig(**SMALL))
    first = build_synthetic_corpus(SyntheticCorpusConfig(domains="1,3", **SMALL))
    other = build_synthetic_corpus(SyntheticCorpusConfig(domains="4-5", **SMALL))
    language = first.language
    assert language.words == full.language.words
    assert first.tokenizer.get_vocab() == full.tokenizer.get_vocab() == other.tokenizer.get_vocab()
    assert np.array_equal(first.word_to_token, full.word_to_token)
    label_classes = {"domain": 8, "word_class": len(WORD_CLASS_NAMES), "sense": len(language.lexicon)}
    assert first.config.label_classes == label_classes

    for split in ("train", "validation", "test"):
        dataset = first.dataset[split]
        ids, domain, sense = (_column(dataset, k) for k in ("input_ids", "domain", "sense"))
        assert set(np.unique(domain[:, 1:]).tolist()) == {1, 3}
        content = language.sense_domain[sense[:, 1:]]
        assert set(np.unique(content).tolist()) == {-1, 1, 3}, "content words come from the subset's domains only"
        # The stored floor is the restricted process's, on these very tokens, and it is the optimum:
        # the full language's predictor (uniform over all 8 domains) scores the same tokens worse.
        ce = -first.optimal_log_probs(ids).mean()
        assert ce == pytest.approx(first.bounds[split]["cross_entropy"], abs=1e-12)
        assert full.language.optimal_cross_entropy(first.word_ids(ids)) > ce + 1e-3
    assert set(np.unique(_column(other.dataset["train"], "domain")[:, 1:]).tolist()) == {4, 5}
    # Each subset draws from its own streams: on shared ones, the grammar of 4-5 would copy that of 1,3.
    grammar = [_column(corpus.dataset["train"], "word_class") for corpus in (first, other)]
    assert not np.array_equal(*grammar)


# --------------------------------------------------------------------------------------------------
# Real text corpora
# --------------------------------------------------------------------------------------------------


def _write_lines(path: Path, rng: np.random.Generator, language: SyntheticLanguage, count: int) -> None:
    words = language.sample(count, rng, seq_len=24)["word_ids"][:, 1:]
    path.write_text("\n\n".join(language.decode(row) for row in words) + "\n", encoding="utf-8")


def test_text_corpus_from_a_local_folder(tmp_path):
    language = SyntheticLanguage(SyntheticCorpusConfig(**SMALL))
    rng = np.random.default_rng(0)
    _write_lines(tmp_path / "corpus.train.txt", rng, language, 300)
    _write_lines(tmp_path / "corpus.valid.txt", rng, language, 30)
    _write_lines(tmp_path / "corpus.test.txt", rng, language, 30)

    corpus = load_text_corpus(str(tmp_path), block_size=32, vocab_size=600)
    assert list(corpus.dataset) == ["train", "validation", "test"]
    for split in corpus.dataset:
        blocks = _column(corpus.dataset[split], "input_ids")
        assert blocks.shape[1] == 32 and len(blocks) >= 5
        assert corpus.num_tokens[split] == blocks.size
    tokenizer = corpus.tokenizer
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 2, 3)
    assert 300 < len(tokenizer) <= 600  # merges were learned beyond the byte alphabet
    train = _column(corpus.dataset["train"], "input_ids")
    assert (train == tokenizer.eos_token_id).sum() >= 20  # documents are separated
    first_line = (tmp_path / "corpus.train.txt").read_text().splitlines()[0]
    encoded = tokenizer(first_line, add_special_tokens=False)["input_ids"]
    assert train.reshape(-1)[: len(encoded)].tolist() == encoded
    assert tokenizer.decode(encoded).strip() == first_line


def test_text_corpus_rejects_missing_empty_and_trainless_sources(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_text_corpus(str(tmp_path / "nowhere"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=str(empty)):
        load_text_corpus(str(empty))
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="contains no text"):
        load_text_corpus(str(blank))
    trainless = tmp_path / "trainless"
    trainless.mkdir()
    (trainless / "a.valid.txt").write_text("some words here\n", encoding="utf-8")
    (trainless / "a.test.txt").write_text("other words there\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no train split"):
        load_text_corpus(str(trainless))


WIKITEXT_VALID = SHARED_DATA / "WikiText-2" / "wiki.valid.tokens"


@pytest.mark.skipif(not WIKITEXT_VALID.exists(), reason="WikiText-2 is not in shared/data")
def test_wikitext_valid_file_loads_as_a_single_file_corpus():
    path = WIKITEXT_VALID
    corpus = load_text_corpus(str(path), block_size=128, vocab_size=4000)
    sizes = {split: len(corpus.dataset[split]) for split in corpus.dataset}
    assert set(sizes) == {"train", "validation", "test"}
    assert sizes["train"] > 10 * sizes["validation"] > 0 and sizes["test"] > 0
    assert all(len(row) == 128 for row in corpus.dataset["test"]["input_ids"])
    assert len(corpus.tokenizer) == 4000
    again = load_text_corpus(str(path), block_size=128, tokenizer=corpus.tokenizer)
    assert again.dataset["test"]["input_ids"] == corpus.dataset["test"]["input_ids"]


def test_hub_source_goes_through_load_dataset(monkeypatch):
    # No network in tests: stand in for the Hub with an in-memory DatasetDict and check the mapping of
    # split names, the text column and the carving of a missing test split.
    import datasets

    language = SyntheticLanguage(SyntheticCorpusConfig(**SMALL))
    lines = [language.decode(row[1:]) for row in language.sample(400, np.random.default_rng(4))["word_ids"]]
    calls = []

    def fake_load_dataset(path, name=None):
        calls.append((path, name))
        return datasets.DatasetDict(
            {
                "train": datasets.Dataset.from_dict({"id": list(range(360)), "text": lines[:360]}),
                "valid": datasets.Dataset.from_dict({"id": list(range(40)), "text": lines[360:]}),
            }
        )

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    corpus = load_text_corpus("someone/tiny-corpus", hub_config="plain", block_size=32, vocab_size=500)
    assert calls == [("someone/tiny-corpus", "plain")]
    assert {split: len(corpus.dataset[split]) > 0 for split in corpus.dataset} == {
        "train": True,
        "validation": True,
        "test": True,
    }
    assert corpus.num_tokens["train"] > 10 * corpus.num_tokens["test"]


def test_text_generation_pipeline_keeps_the_space_between_prompt_and_continuation():
    from transformers import pipeline

    from .conftest import tiny_model

    corpus = build_synthetic_corpus(SyntheticCorpusConfig(num_train=8, num_validation=4, num_test=4))
    tokenizer = corpus.tokenizer
    model = tiny_model("dense", vocab_size=len(tokenizer), max_position_embeddings=64).eval()
    prompt = corpus.language.decode(corpus.word_ids(corpus.dataset["train"][0]["input_ids"])[1:6])
    generated = pipeline("text-generation", model=model, tokenizer=tokenizer)(
        prompt, max_new_tokens=3, do_sample=False
    )[0]["generated_text"]
    assert generated.startswith(prompt + " ")
    words = generated.split()
    assert len(words) == len(prompt.split()) + 3, generated
    assert all(word in tokenizer.get_vocab() for word in words)


# --------------------------------------------------------------------------------------------------
# The masked-LM floor
# --------------------------------------------------------------------------------------------------


def _corrupt(language, words, rng, select=0.5):
    """Labels and what a BERT-style collator shows the model, with every kind of view: [MASK] (-1), a
    random token the language never emits (-2), a random word ([BOS] included) and the word kept."""
    observed, labels = words.copy(), np.full(words.shape, -100)
    for i, t in itertools.product(range(words.shape[0]), range(1, words.shape[1])):
        if rng.random() < select:
            labels[i, t] = words[i, t]
            u = rng.random()
            observed[i, t] = -1 if u < 0.6 else int(rng.integers(-2, language.vocab_size)) if u < 0.85 else words[i, t]
    return observed, labels


@pytest.mark.parametrize("tiny", [TINY, TINY_SUBSET], ids=["all-domains", "domain-subset"])
def test_masked_floor_equals_brute_force_enumeration(tiny):
    language = SyntheticLanguage(SyntheticCorpusConfig(seq_len=5, **tiny))
    rng = np.random.default_rng(0)
    words = language.sample(8, rng, seq_len=4)["word_ids"]
    observed, labels = _corrupt(language, words, rng)
    selectable = np.ones(language.vocab_size, dtype=bool)
    selectable[BOS_WORD_ID] = False
    channel = MaskingChannel(select_prob=0.3, mask_prob=0.8, random_prob=0.1, vocab_size=language.vocab_size + 7,
                             selectable=selectable)
    fast = language.masked_log_probs(observed, labels, channel)
    brute = language.brute_force_masked_log_probs(observed, labels, channel)
    assert len(fast) == (labels != -100).sum() >= 8
    np.testing.assert_allclose(fast, brute, rtol=0, atol=1e-10)
    # The floor reads the context: masking every other position makes the targets harder to guess.
    blind = observed.copy()
    blind[:, 1:][labels[:, 1:] == -100] = -1
    assert -language.masked_log_probs(blind, labels, channel).mean() > -fast.mean()


def test_masked_lm_runs_report_the_exact_floor_at_the_evaluations_own_masks(tmp_path, monkeypatch, capsys):
    import torch
    from transformers import DataCollatorForLanguageModeling

    from decollapse.cli import main

    seen = []
    collate = DataCollatorForLanguageModeling.__call__

    def recording(self, features, *args, **kwargs):
        out = collate(self, features, *args, **kwargs)
        seen.append((out["input_ids"].clone(), out["labels"].clone()))
        return out

    monkeypatch.setattr(DataCollatorForLanguageModeling, "__call__", recording)
    out = tmp_path / "run"
    assert main(["train", "dense", "--max-steps", "20", "--output-dir", str(out), "--no-progress", "--set",
                 "objective=masked_lm", "corpus.num_train=64", "corpus.num_validation=24", "corpus.num_test=24",
                 "corpus.seq_len=24", "eval_steps=100", "eval_batch_size=16"]) == 0
    # The last collations: evaluate(validation), evaluate(test), then the floor of each: same masks.
    evaluation, floor = seen[-8:-4], seen[-4:]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(evaluation, floor))
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    for split in ("validation", "test"):
        optimal, unigram = metrics[f"{split}_optimal_loss"], metrics[f"{split}_unigram_loss"]
        assert 0 < optimal < unigram < metrics[f"{split}_loss"]
        assert metrics[f"{split}_loss_ratio"] == pytest.approx(metrics[f"{split}_loss"] / optimal)
    printed = capsys.readouterr().out
    assert f"validation masked_lm loss {metrics['validation_loss']:.4f}  (Bayes-optimal {metrics['validation_optimal_loss']:.4f}" in printed
    assert "Bayes-optimal loss" in (out / "report.md").read_text()
