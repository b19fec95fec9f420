"""Batch collators for packed language modeling and for the denoising (TSDAE), masked-diffusion and
prefix-to-suffix generation objectives.

The original MrCogito collators (github.com/ksopyla/MrCogito) took every supplied id as content.
Because their pretraining data was padded to 512 with ``padding="max_length"``, pad tokens became
visible to the encoder and counted as reconstruction targets. Here the real tokens of a row are
exactly the positions where its own ``attention_mask`` is 1 (every position when a row has no mask),
and batches are padded dynamically to the longest real row, so padding is never content.

Both collators follow the Hugging Face convention: a dataclass called with a list of feature dicts
and returning ``torch.long`` tensors. Randomness comes from a private ``numpy.random.Generator``
seeded by ``seed``, so a seeded collator yields the same batches whatever else uses the global RNGs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from transformers import DataCollatorForLanguageModeling

from ..modeling.common import document_starts

__all__ = [
    "DataCollatorForMaskedDiffusion",
    "DataCollatorForPackedLanguageModeling",
    "DataCollatorForPrefixGeneration",
    "DataCollatorForTSDAE",
]

IGNORE_INDEX = -100


class DataCollatorForPackedLanguageModeling(DataCollatorForLanguageModeling):
    """transformers' language-modeling collator, for rows that may pack several documents.

    A row that packs documents carries ``position_ids`` restarting at each one (the text loader's
    default). Documents must not read each other, so for next-token prediction a document's first
    token is no target either: its label becomes -100, as in transformers' ``DataCollatorWithFlattening``.
    Otherwise the last position of one document would be scored on predicting the next, unrelated
    document, and the Trainer would count those targets in ``num_items_in_batch``. Masked-LM batches
    need nothing more (masked tokens are read within their own document); rows without
    ``position_ids`` are collated exactly as by the parent class.
    """

    def torch_call(self, examples):
        batch = super().torch_call(examples)
        positions = batch.get("position_ids")
        if not self.mlm and positions is not None:
            batch["labels"] = batch["labels"].masked_fill(document_starts(positions), IGNORE_INDEX)
        return batch


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))


def _is_int(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, np.integer))


class _CollatorBase:
    """Shared plumbing: argument checks, real-token extraction, right padding and the private RNG.

    Subclasses are dataclasses declaring ``tokenizer``, ``seed`` and ``pad_to_multiple_of`` fields
    (declared there rather than here so each keeps the documented positional order).
    """

    tokenizer: Any
    seed: int | None
    pad_to_multiple_of: int | None
    _rng: np.random.Generator | None
    _rng_key: Any

    def _fail(self, name: str, allowed: str) -> None:
        raise ValueError(f"{type(self).__name__}.{name}={getattr(self, name)!r} is not allowed: expected {allowed}.")

    def _check_common(self) -> None:
        if getattr(self.tokenizer, "pad_token_id", None) is None:
            raise ValueError(
                f"{type(self).__name__}.tokenizer has no pad token: set tokenizer.pad_token so padding can be written."
            )
        if self.seed is not None and not (_is_int(self.seed) and self.seed >= 0):
            self._fail("seed", "None or a non-negative integer")
        multiple = self.pad_to_multiple_of
        if multiple is not None and not (_is_int(multiple) and multiple >= 1):
            self._fail("pad_to_multiple_of", "None or a positive integer")
        self._special_ids = np.asarray(sorted(set(self.tokenizer.all_special_ids)), dtype=np.int64)

    def _generator(self) -> np.random.Generator:
        """The collator's generator, created lazily in the process that draws from it.

        Inside a ``DataLoader`` worker the stream is keyed by the worker's torch seed, which differs
        between workers and between epochs and is reproducible when the DataLoader is seeded.
        Reusing the main-process stream there would give every worker, in every epoch, the very same
        noise.
        """
        info = torch.utils.data.get_worker_info()
        key = None if info is None else info.seed
        if self._rng is None or self._rng_key != key:
            if self.seed is None:
                self._rng = np.random.default_rng()
            else:
                entropy = [self.seed] if key is None else [self.seed, key]
                self._rng = np.random.default_rng(np.random.SeedSequence(entropy))
            self._rng_key = key
        return self._rng

    def rng_state(self) -> dict | None:
        """The main-process generator's state (None before its first draw), for checkpoints."""
        rng = getattr(self, "_rng", None)  # collators that draw nothing never create one
        return None if rng is None or self._rng_key is not None else rng.bit_generator.state

    def set_rng_state(self, state: dict) -> None:
        """Continues the main-process stream from a ``rng_state()``."""
        self._generator().bit_generator.state = state

    def _real_rows(self, features: Sequence[dict[str, Any]]) -> list[np.ndarray]:
        """Each row's real token ids, in order: those where its ``attention_mask`` is 1 (all of
        them without a mask). Gathering rather than slicing also accepts left-padded rows."""
        if len(features) == 0:
            raise ValueError(f"{type(self).__name__} got an empty batch: expected at least one feature dict.")
        rows = []
        for i, feature in enumerate(features):
            if "input_ids" not in feature:
                raise ValueError(f"{type(self).__name__}: feature {i} has no 'input_ids'.")
            ids = np.asarray(feature["input_ids"], dtype=np.int64)
            if ids.ndim != 1:
                raise ValueError(f"{type(self).__name__}: feature {i} input_ids must be 1-D, got shape {ids.shape}.")
            mask = feature.get("attention_mask")
            if mask is not None:
                mask = np.asarray(mask, dtype=np.int64)
                if mask.shape != ids.shape:
                    raise ValueError(
                        f"{type(self).__name__}: feature {i} attention_mask shape {mask.shape} "
                        f"differs from input_ids shape {ids.shape}."
                    )
                if np.any((mask != 0) & (mask != 1)):
                    raise ValueError(f"{type(self).__name__}: feature {i} attention_mask holds values other than 0/1.")
                ids = ids[mask == 1]
            rows.append(ids)
        return rows

    def _padded_length(self, longest: int) -> int:
        multiple = self.pad_to_multiple_of
        return longest if multiple is None else int(math.ceil(longest / multiple) * multiple)

    def _right_pad(self, rows: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """``[B, L]`` ids (pad id after each row) and mask (1 over each row), L the longest row."""
        length = self._padded_length(max(len(row) for row in rows))
        ids = np.full((len(rows), length), self.tokenizer.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(rows), length), dtype=np.int64)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = row
            mask[i, : len(row)] = 1
        return ids, mask


@dataclass
class DataCollatorForTSDAE(_CollatorBase):
    """Token-deletion noise for TSDAE-style denoising autoencoders.

    Every real, non-special token is deleted with probability ``deletion_rate`` by zeroing its
    ``attention_mask``; ``input_ids`` keep the token, so the survivors keep their absolute
    positions and the decoder can be asked to reconstruct the clean row in place. Special tokens
    are never deleted (they carry no content and anchor the row), and each row that has a deletable
    token keeps at least one (a uniformly chosen one is restored if the draw deleted them all), so
    the encoder always sees some content.

    Returns ``input_ids`` (pad id at padding), ``attention_mask`` (0 at padding and deleted
    positions) and ``labels`` (the clean id at every real position, deleted or not; -100 at padding).
    """

    tokenizer: Any
    deletion_rate: float = 0.6
    seed: int | None = None
    pad_to_multiple_of: int | None = None
    _rng: np.random.Generator | None = field(default=None, init=False, repr=False, compare=False)
    _rng_key: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        rate = self.deletion_rate
        if not _is_number(rate) or not (math.isfinite(rate) and 0.0 <= rate < 1.0):
            self._fail("deletion_rate", "a number in [0, 1) (1 would delete every token)")
        self._check_common()

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        rows = self._real_rows(features)
        ids, real = self._right_pad(rows)
        deletable = (real == 1) & ~np.isin(ids, self._special_ids)
        rng = self._generator()
        delete = deletable & (rng.random(ids.shape) < self.deletion_rate)
        survivors = deletable & ~delete
        for i in np.flatnonzero(deletable.any(axis=1) & ~survivors.any(axis=1)):
            delete[i, rng.choice(np.flatnonzero(deletable[i]))] = False
        attention_mask = real * ~delete
        labels = np.where(real == 1, ids, IGNORE_INDEX)
        return {
            "input_ids": torch.from_numpy(ids),
            "attention_mask": torch.from_numpy(attention_mask.astype(np.int64)),
            "labels": torch.from_numpy(labels),
        }


@dataclass
class DataCollatorForPrefixGeneration(_CollatorBase):
    """Splits each row into a prefix the encoder reads and a suffix the decoder must generate.

    A row's n real tokens are cut at ``k = round(U(min_prefix_fraction, max_prefix_fraction) * n)``,
    clamped to ``[1, n - 1]`` so both parts are non-empty. The fraction is drawn per row so the
    model cannot rely on a fixed prefix length. The suffix is right-padded from its own start,
    matching a decoder whose positions are counted from the start of the suffix.

    Returns ``input_ids`` / ``attention_mask`` (the prefix, right-padded with the pad id and mask 0)
    and ``labels``: the suffix, right-padded with -100 (the targets the decoder generates, the
    Hugging Face convention, so the Trainer reports an evaluation loss).
    """

    tokenizer: Any
    min_prefix_fraction: float = 0.3
    max_prefix_fraction: float = 0.5
    seed: int | None = None
    pad_to_multiple_of: int | None = None
    _rng: np.random.Generator | None = field(default=None, init=False, repr=False, compare=False)
    _rng_key: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        low, high = self.min_prefix_fraction, self.max_prefix_fraction
        if not _is_number(low) or not (math.isfinite(low) and 0.0 < low < 1.0):
            self._fail("min_prefix_fraction", "a number in (0, 1)")
        if not _is_number(high) or not (math.isfinite(high) and low <= high < 1.0):
            self._fail("max_prefix_fraction", f"a number in [min_prefix_fraction={low!r}, 1)")
        self._check_common()

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        rows = self._real_rows(features)
        for i, row in enumerate(rows):
            if len(row) < 2:
                raise ValueError(
                    f"{type(self).__name__}: feature {i} has {len(row)} real token(s); "
                    "a prefix/suffix split needs at least 2."
                )
        lengths = np.array([len(row) for row in rows])
        fractions = self._generator().uniform(self.min_prefix_fraction, self.max_prefix_fraction, size=len(rows))
        cuts = np.clip(np.rint(fractions * lengths).astype(np.int64), 1, lengths - 1)
        prefix_ids, prefix_mask = self._right_pad([row[:k] for row, k in zip(rows, cuts)])
        suffix_ids, suffix_mask = self._right_pad([row[k:] for row, k in zip(rows, cuts)])
        suffix_ids[suffix_mask == 0] = IGNORE_INDEX
        return {
            "input_ids": torch.from_numpy(prefix_ids),
            "attention_mask": torch.from_numpy(prefix_mask),
            "labels": torch.from_numpy(suffix_ids),
        }


@dataclass
class DataCollatorForMaskedDiffusion(_CollatorBase):
    """Dynamic right padding for masked diffusion: ``input_ids`` / ``attention_mask`` and ``labels``
    (the clean ids at every real position, -100 at padding). The noise itself is drawn by the model
    (``ConceptEncoderForMaskedDiffusion``), which owns the noise schedule and its evaluation grid.
    """

    tokenizer: Any
    pad_to_multiple_of: int | None = None
    seed = None  # nothing random here; _check_common reads it

    def __post_init__(self) -> None:
        self._check_common()

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids, mask = self._right_pad(self._real_rows(features))
        labels = np.where(mask == 1, ids, IGNORE_INDEX)
        return {
            "input_ids": torch.from_numpy(ids),
            "attention_mask": torch.from_numpy(mask),
            "labels": torch.from_numpy(labels),
        }
