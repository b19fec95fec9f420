"""Tests of the TSDAE and prefix-generation collators: padding is never content, the noise has the
requested statistics, special tokens survive, and seeded collators are reproducible."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from decollapse.data import (
    DataCollatorForPrefixGeneration,
    DataCollatorForTSDAE,
    SyntheticCorpusConfig,
    build_synthetic_corpus,
)

PAD, UNK, BOS, EOS, MASK, CLS, SEP = range(7)
SPECIALS = (PAD, UNK, BOS, EOS, MASK, CLS, SEP)


@pytest.fixture(scope="module")
def corpus():
    # A small corpus of the default language: its tokenizer still covers the full lexicon, and it
    # builds in a fraction of the default corpus's time.
    return build_synthetic_corpus(SyntheticCorpusConfig(num_train=300, num_validation=10, num_test=10))


@pytest.fixture(scope="module")
def tokenizer(corpus):
    tok = corpus.tokenizer
    names = ("[PAD]", "[UNK]", "[BOS]", "[EOS]", "[MASK]", "[CLS]", "[SEP]")
    assert [tok.convert_tokens_to_ids(t) for t in names] == list(SPECIALS)
    assert sorted(tok.all_special_ids) == sorted(SPECIALS)
    return tok


@pytest.fixture(scope="module")
def rows(corpus) -> list[list[int]]:
    """Clean 128-token rows, exactly as the corpus yields them (``input_ids`` only)."""
    return [list(r) for r in corpus.dataset["train"][:200]["input_ids"]]


def mixed_batch(rows: list[list[int]]) -> tuple[list[dict], list[list[int]]]:
    """Rows of different real lengths in every format a dataset may hand over, with their real tokens:
    a full row without mask, a row padded to 128 the way the original pipeline padded (mask given),
    a left-padded row, a short row without mask as a tensor, and a short padded row as numpy."""
    a, b, c, d, e = (rows[i] for i in range(5))
    real = [a, b[:40], c[:20], d[:30], e[:7]]
    features = [
        {"input_ids": a},
        {"input_ids": b[:40] + [PAD] * 88, "attention_mask": [1] * 40 + [0] * 88},
        {"input_ids": [PAD] * 44 + c[:20], "attention_mask": [0] * 44 + [1] * 20},
        {"input_ids": torch.tensor(d[:30])},
        {"input_ids": np.array(e[:7] + [PAD] * 3), "attention_mask": np.array([1] * 7 + [0] * 3)},
    ]
    return features, real


def check_right_padded(ids: torch.Tensor, mask: torch.Tensor, real: list[list[int]]) -> None:
    for i, tokens in enumerate(real):
        n = len(tokens)
        assert ids[i, :n].tolist() == tokens
        assert torch.all(ids[i, n:] == PAD)
        assert torch.all(mask[i, n:] == 0)


# --------------------------------------------------------------------------------------------------
# TSDAE
# --------------------------------------------------------------------------------------------------


def test_tsdae_padding_is_never_content(tokenizer, rows):
    features, real = mixed_batch(rows)
    batch = DataCollatorForTSDAE(tokenizer, seed=0)(features)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(t.dtype == torch.long and t.shape == (5, 128) for t in batch.values())
    check_right_padded(batch["input_ids"], batch["attention_mask"], real)
    for i, tokens in enumerate(real):
        n = len(tokens)
        assert batch["labels"][i, :n].tolist() == tokens  # clean targets at every real position
        assert torch.all(batch["labels"][i, n:] == -100)
    # Pads of a row are never attended, and the only real positions hidden are deletions of content.
    hidden = (batch["attention_mask"] == 0) & (batch["labels"] != -100)
    assert not torch.any(hidden & torch.isin(batch["input_ids"], torch.tensor(SPECIALS)))


def test_tsdae_pads_dynamically_not_to_the_stored_length(tokenizer, rows):
    features, _ = mixed_batch(rows)
    short = features[1:]  # longest real row is 40 tokens although one row arrives padded to 128
    assert DataCollatorForTSDAE(tokenizer, seed=0)(short)["input_ids"].shape == (4, 40)
    batch = DataCollatorForTSDAE(tokenizer, seed=0, pad_to_multiple_of=16)(short)
    assert batch["input_ids"].shape == (4, 48)
    assert torch.all(batch["labels"][:, 40:] == -100) and torch.all(batch["attention_mask"][:, 40:] == 0)


def test_tsdae_deletion_rate_is_respected(tokenizer, rows):
    batch = DataCollatorForTSDAE(tokenizer, seed=1)([{"input_ids": r} for r in rows])
    deletable = (batch["labels"] != -100) & ~torch.isin(batch["input_ids"], torch.tensor(SPECIALS))
    assert deletable.sum() > 20_000
    deleted = (deletable & (batch["attention_mask"] == 0)).sum() / deletable.sum()
    assert abs(deleted.item() - 0.6) < 0.02  # standard error ~0.003
    assert torch.all(batch["input_ids"] == torch.tensor(rows))  # ids unchanged: survivors keep positions

    for rate in (0.0, 0.3):
        out = DataCollatorForTSDAE(tokenizer, deletion_rate=rate, seed=2)([{"input_ids": r} for r in rows])
        share = ((out["attention_mask"] == 0) & deletable).sum() / deletable.sum()
        assert abs(share.item() - rate) < 0.02


def test_tsdae_never_deletes_special_tokens(tokenizer, rows):
    rng = np.random.default_rng(0)
    spiked = []
    for r in rows[:50]:
        r = np.array(r)
        positions = rng.choice(np.arange(1, 128), size=30, replace=False)
        r[positions] = rng.choice([UNK, BOS, EOS, MASK, CLS, SEP], size=30)
        spiked.append({"input_ids": r})
    collator = DataCollatorForTSDAE(tokenizer, deletion_rate=0.95, seed=3)
    for _ in range(3):
        batch = collator(spiked)
        special = torch.isin(batch["input_ids"], torch.tensor(SPECIALS))
        assert special.sum() >= 50 * 31
        assert torch.all(batch["attention_mask"][special] == 1)


def test_tsdae_keeps_at_least_one_token(tokenizer, rows):
    w = rows[0][1:6]  # five content tokens
    features = [
        {"input_ids": [BOS, w[0], EOS]},
        {"input_ids": [BOS] + w},
        {"input_ids": [w[1]]},
        {"input_ids": [BOS, EOS]},  # nothing deletable: nothing to keep, nothing deleted
    ]
    collator = DataCollatorForTSDAE(tokenizer, deletion_rate=0.99, seed=4)
    kept_counts = torch.zeros(6)
    for _ in range(200):
        batch = collator(features)
        content = (batch["labels"] != -100) & ~torch.isin(batch["input_ids"], torch.tensor(SPECIALS))
        kept = content & (batch["attention_mask"] == 1)
        assert torch.all(kept[:3].sum(dim=1) >= 1)
        assert batch["attention_mask"][3, :2].tolist() == [1, 1]
        kept_counts += kept[1].float()
    # The rescued token is drawn uniformly, not always the first one (which would bias the encoder).
    share = kept_counts[1:] / kept_counts.sum()
    assert kept_counts[0] == 0 and share.min() > 0.1 and share.max() < 0.3


def test_tsdae_seed_reproducibility(tokenizer, rows):
    features = [{"input_ids": r} for r in rows[:16]]
    first, second = DataCollatorForTSDAE(tokenizer, seed=7), DataCollatorForTSDAE(tokenizer, seed=7)
    a1, a2 = first(features), first(features)
    b1, b2 = second(features), second(features)
    for key in a1:
        assert torch.equal(a1[key], b1[key]) and torch.equal(a2[key], b2[key])
    assert not torch.equal(a1["attention_mask"], a2["attention_mask"])  # the stream advances per batch
    other = DataCollatorForTSDAE(tokenizer, seed=8)(features)
    assert not torch.equal(a1["attention_mask"], other["attention_mask"])
    unseeded = [DataCollatorForTSDAE(tokenizer)(features)["attention_mask"] for _ in range(2)]
    assert not torch.equal(*unseeded)


def test_tsdae_dataloader_workers_draw_distinct_reproducible_noise(tokenizer, rows):
    dataset = [{"input_ids": rows[0]}] * 8
    collator = DataCollatorForTSDAE(tokenizer, seed=5)

    def epochs() -> list[torch.Tensor]:
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=1, num_workers=2, collate_fn=collator, generator=torch.Generator().manual_seed(0)
        )
        return [torch.cat([b["attention_mask"] for b in loader]) for _ in range(2)]

    run = epochs()
    masks = run[0]
    assert len({tuple(m.tolist()) for m in masks}) == len(masks)  # workers do not repeat each other
    assert not torch.equal(run[0], run[1])  # nor does an epoch repeat the last one
    again = epochs()
    assert all(torch.equal(x, y) for x, y in zip(run, again))


@pytest.mark.parametrize("rate", [1.0, -0.1, 1.5, math.nan, "0.5", True, None])
def test_tsdae_rejects_bad_deletion_rate(tokenizer, rate):
    with pytest.raises(ValueError, match="deletion_rate"):
        DataCollatorForTSDAE(tokenizer, deletion_rate=rate)


@pytest.mark.parametrize(
    "kwargs, name", [({"seed": -1}, "seed"), ({"seed": 1.5}, "seed"), ({"pad_to_multiple_of": 0}, "pad_to_multiple_of")]
)
def test_collators_reject_bad_common_arguments(tokenizer, kwargs, name):
    for cls in (DataCollatorForTSDAE, DataCollatorForPrefixGeneration):
        with pytest.raises(ValueError, match=name):
            cls(tokenizer, **kwargs)


def test_collators_need_a_pad_token():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, "[UNK]")))
    for cls in (DataCollatorForTSDAE, DataCollatorForPrefixGeneration):
        with pytest.raises(ValueError, match="pad"):
            cls(tok)


def test_collators_reject_malformed_batches(tokenizer):
    for collator in (DataCollatorForTSDAE(tokenizer), DataCollatorForPrefixGeneration(tokenizer)):
        with pytest.raises(ValueError, match="empty"):
            collator([])
        with pytest.raises(ValueError, match="attention_mask"):
            collator([{"input_ids": [BOS, 10, 11], "attention_mask": [1, 1]}])


# --------------------------------------------------------------------------------------------------
# Prefix generation
# --------------------------------------------------------------------------------------------------


def test_prefix_and_suffix_restore_the_real_tokens(tokenizer, rows):
    features, real = mixed_batch(rows)
    batch = DataCollatorForPrefixGeneration(tokenizer, seed=0)(features)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(t.dtype == torch.long for t in batch.values())
    for i, tokens in enumerate(real):
        k = int(batch["attention_mask"][i].sum())
        m = int((batch["labels"] != -100).long()[i].sum())
        assert k + m == len(tokens) and k >= 1 and m >= 1
        assert batch["attention_mask"][i, :k].tolist() == [1] * k
        assert (batch["labels"] != -100).long()[i, :m].tolist() == [1] * m  # suffix counted from its start
        assert batch["input_ids"][i, :k].tolist() + batch["labels"][i, :m].tolist() == tokens
        assert torch.all(batch["input_ids"][i, k:] == PAD) and torch.all(batch["labels"][i, m:] == -100)
    assert batch["input_ids"].shape[1] == batch["attention_mask"].sum(1).max()
    assert batch["labels"].shape[1] == (batch["labels"] != -100).long().sum(1).max()

    padded = DataCollatorForPrefixGeneration(tokenizer, seed=0, pad_to_multiple_of=16)(features)
    assert padded["input_ids"].shape[1] % 16 == 0 and padded["labels"].shape[1] % 16 == 0
    assert torch.equal(padded["attention_mask"].sum(1), batch["attention_mask"].sum(1))


@pytest.mark.parametrize("low, high", [(0.3, 0.5), (0.1, 0.9), (0.4, 0.4)])
def test_prefix_fraction_lies_in_range(tokenizer, rows, low, high):
    collator = DataCollatorForPrefixGeneration(tokenizer, low, high, seed=1)
    n = 128
    fractions = np.concatenate(
        [collator([{"input_ids": r} for r in rows])["attention_mask"].sum(1).numpy() / n for _ in range(3)]
    )
    assert fractions.min() >= low - 0.5 / n and fractions.max() <= high + 0.5 / n
    if low < high:  # the draw covers the range rather than sitting at one end
        assert fractions.min() < low + 0.05 and fractions.max() > high - 0.05
    else:
        assert np.all(fractions == round(low * n) / n)


def test_prefix_split_is_clamped_to_non_empty_parts(tokenizer, rows):
    w = rows[0][1:4]
    for low, high, expected in [(0.01, 0.01, 1), (0.99, 0.99, 2)]:
        batch = DataCollatorForPrefixGeneration(tokenizer, low, high, seed=0)([{"input_ids": w}, {"input_ids": w[:2]}])
        assert batch["attention_mask"].sum(1).tolist() == [expected, 1]
        assert (batch["labels"] != -100).long().sum(1).tolist() == [3 - expected, 1]


def test_prefix_rejects_rows_too_short_to_split(tokenizer):
    collator = DataCollatorForPrefixGeneration(tokenizer, seed=0)
    with pytest.raises(ValueError, match="at least 2"):
        collator([{"input_ids": [BOS, 10, 11]}, {"input_ids": [BOS]}])
    with pytest.raises(ValueError, match="at least 2"):  # padding does not count towards the length
        collator([{"input_ids": [BOS, PAD, PAD, PAD], "attention_mask": [1, 0, 0, 0]}])


def test_prefix_seed_reproducibility(tokenizer, rows):
    features = [{"input_ids": r} for r in rows[:32]]
    a = DataCollatorForPrefixGeneration(tokenizer, seed=3)(features)
    b = DataCollatorForPrefixGeneration(tokenizer, seed=3)(features)
    c = DataCollatorForPrefixGeneration(tokenizer, seed=4)(features)
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert not torch.equal(a["attention_mask"], c["attention_mask"])


@pytest.mark.parametrize(
    "low, high, name",
    [
        (0.0, 0.5, "min_prefix_fraction"),
        (-0.2, 0.5, "min_prefix_fraction"),
        (1.0, 1.0, "min_prefix_fraction"),
        (math.nan, 0.5, "min_prefix_fraction"),
        (0.3, 1.0, "max_prefix_fraction"),
        (0.6, 0.5, "max_prefix_fraction"),
        (0.3, "0.5", "max_prefix_fraction"),
    ],
)
def test_prefix_rejects_bad_fractions(tokenizer, low, high, name):
    with pytest.raises(ValueError, match=name):
        DataCollatorForPrefixGeneration(tokenizer, min_prefix_fraction=low, max_prefix_fraction=high)


def test_masked_diffusion_collator_pads_without_making_padding_a_target(tokenizer, rows):
    from decollapse.data import DataCollatorForMaskedDiffusion

    features, real = mixed_batch(rows)
    batch = DataCollatorForMaskedDiffusion(tokenizer)(features)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    for i, tokens in enumerate(real):
        n = len(tokens)
        assert batch["input_ids"][i, :n].tolist() == tokens == batch["labels"][i, :n].tolist()
        assert batch["attention_mask"][i].sum() == n
        assert torch.all(batch["labels"][i, n:] == -100) and torch.all(batch["input_ids"][i, n:] == PAD)
