"""Homonyms in real English: do a causal LM's contextual states tell the senses of a word apart?

The SOSM repository (github.com/PlanetDestroyyer/Self-Organizing-State-Model) tested five homonyms
(bank, bat, java, lead, python) with one sentence per sense, scored on context-free embedding rows,
and judged "disambiguation" from nucleus-sampled continuations. Here, on any causal LM:

* the state of a word is the **last hidden state at its last sub-token**, read in its sentence: in a
  causal model that is the first state that has read the whole word (and everything before it, but
  nothing after it);
* the separation of the sense centroids is reported beside the baselines of
  :func:`decollapse.modeling.diagnostics.homonym_report` (the same-sense split, which says what
  separation looks like with no sense difference at all, and the between-word distance), because
  contextual states are anisotropic (Ethayarajh, EMNLP 2019) and a bare ``1 − cos`` means little;
* continuations are greedy (``do_sample=False``), so two runs print the same text.

The default sentences (``decollapse/data/homonym_contexts.json``) are decollapse's own, four per
sense, with the words that settle the sense *before* the homonym: a causal state cannot see the rest
of its sentence.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from importlib import resources
from pathlib import Path

import torch

from .modeling.diagnostics import homonym_report, homonym_separation

logger = logging.getLogger(__name__)

DEFAULT_CONTEXTS = "homonym_contexts.json"

__all__ = ["DEFAULT_CONTEXTS", "homonym_states", "load_contexts", "score_homonym_contexts", "word_span"]


def _default_text() -> str:
    # importlib.resources, not a path beside __file__: the file is package data and may live in a wheel.
    return resources.files("decollapse.data").joinpath(DEFAULT_CONTEXTS).read_text(encoding="utf-8")


def _word_pattern(word: str) -> re.Pattern:
    # Lookarounds rather than \b, so a word that starts or ends with a non-word character still
    # matches only as a whole word.
    return re.compile(rf"(?<!\w){re.escape(word)}(?!\w)", re.IGNORECASE)


def word_span(sentence: str, word: str) -> tuple[int, int] | None:
    """Character span of the first whole-word, case-insensitive occurrence of ``word``; None if absent."""
    match = _word_pattern(word).search(sentence)
    return match.span() if match else None


def _validate(data, where: str) -> list[dict]:
    """The ``words`` list of a contexts document, or ValueError naming the first problem."""
    if not isinstance(data, dict) or "words" not in data:
        raise ValueError(f'{where}: no "words" list at the top level')
    words = data["words"]
    if not isinstance(words, list) or not words:
        raise ValueError(f'{where}: "words" must be a non-empty list')
    seen: set[str] = set()
    out: list[dict] = []
    for i, entry in enumerate(words):
        if not isinstance(entry, dict) or not isinstance(entry.get("word"), str) or not entry["word"].strip():
            raise ValueError(f'{where}: words[{i}] needs a non-empty string "word"')
        word = entry["word"].strip()
        if word.lower() in seen:
            # Two entries for one word would give it two surface ids and split its senses.
            raise ValueError(f"{where}: word {word!r} is listed twice")
        seen.add(word.lower())
        senses = entry.get("senses")
        if not isinstance(senses, dict) or len(senses) < 2:
            count = len(senses) if isinstance(senses, dict) else 0
            raise ValueError(f'{where}: word {word!r} has {count} sense(s) in "senses"; a homonym needs at least 2')
        for sense, sentences in senses.items():
            # Two sentences at least: the same-sense baseline splits each sense in two halves.
            if not isinstance(sentences, list) or len(sentences) < 2:
                raise ValueError(
                    f"{where}: sense {sense!r} of {word!r} needs a list of at least 2 sentences "
                    "(the same-sense baseline splits each sense in two halves)"
                )
            for sentence in sentences:
                if not isinstance(sentence, str) or word_span(sentence, word) is None:
                    raise ValueError(
                        f"{where}: sentence {sentence!r} (sense {sense!r}) does not contain the word {word!r}"
                    )
        out.append({"word": word, "senses": {str(k): list(v) for k, v in senses.items()}})
    return out


def load_contexts(path: str | Path | None = None) -> list[dict]:
    """The homonym contexts of ``path`` (default: the package's own file), validated.

    Format: ``{"words": [{"word": "bank", "senses": {"finance": [sentence, ...], "river": [...]}}, ...]}``;
    other top-level keys are ignored. Each word needs ``≥ 2`` senses, each sense ``≥ 2`` sentences,
    and each sentence must contain its word (whole word, any case).

    Raises:
        ValueError: one line naming the problem (unreadable file, not JSON, a missing ``words`` list,
            too few senses or sentences, a sentence without its word).
    """
    if path is None:
        where, text = f"decollapse/data/{DEFAULT_CONTEXTS}", _default_text()
    else:
        where = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f"{where}: cannot read the contexts file ({err.__class__.__name__}: {err})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not JSON ({err})") from None
    return _validate(data, where)


def _device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _encode(tokenizer, sentence: str, word: str) -> tuple[torch.Tensor, int]:
    """Token ids of ``sentence`` (with the tokenizer's own special tokens, as the model was trained)
    and the index of the word's last sub-token."""
    start, end = word_span(sentence, word)
    try:
        enc = tokenizer(sentence, return_offsets_mapping=True)
    except (NotImplementedError, TypeError, ValueError) as err:
        raise ValueError(
            f"{type(tokenizer).__name__} gives no offset mapping ({str(err).splitlines()[0] if str(err) else err!r}); "
            "finding the word's tokens needs a fast tokenizer"
        ) from None
    offsets = enc.get("offset_mapping")
    if offsets is None:
        raise ValueError(f"{type(tokenizer).__name__} gives no offset mapping; finding the word's tokens needs a fast tokenizer")
    # Special tokens have empty (0, 0) spans; a token belongs to the word when its span overlaps it.
    inside = [i for i, (s, e) in enumerate(offsets) if e > s and s < end and e > start]
    if not inside:
        raise ValueError(f"no token of {sentence!r} covers {word!r} (characters {start}-{end})")
    return torch.tensor([enc["input_ids"]], dtype=torch.long), inside[-1]


@torch.no_grad()
def homonym_states(model, tokenizer, contexts: list[dict]) -> dict:
    """One state per sentence: ``hidden_states[-1]`` at the last sub-token of the first occurrence
    of the word, each sentence run alone (batch 1, no padding, so no mask can leak into a state).

    Returns ``{"hidden": [N, d] float32 on CPU, "surface_ids": [N], "sense_ids": [N], "rows": [...]}``,
    where ``surface_ids`` is the word's index and ``sense_ids`` a global (word, sense) index, and each
    row holds ``word, sense, sentence, input_ids`` (the sentence's ids up to and including that
    sub-token) and ``prefix`` (the sentence's text up to the end of the word).
    """
    contexts = _validate({"words": contexts}, "contexts")
    device = _device(model)
    states, surfaces, senses, rows = [], [], [], []
    sense_index = 0
    for w, entry in enumerate(contexts):
        word = entry["word"]
        for sense, sentences in entry["senses"].items():
            for sentence in sentences:
                ids, last = _encode(tokenizer, sentence, word)
                ids = ids.to(device)
                out = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
                hidden = getattr(out, "hidden_states", None)
                if not hidden:
                    raise ValueError(f"{type(model).__name__} returns no hidden_states (output_hidden_states=True)")
                states.append(hidden[-1][0, last].float().cpu())
                surfaces.append(w)
                senses.append(sense_index)
                rows.append({
                    "word": word, "sense": sense, "sentence": sentence,
                    "prefix": sentence[: word_span(sentence, word)[1]],
                    # The generation prefix is the scored sequence itself, cut after the word, not a
                    # re-tokenised text: a tokenizer that appends an end token ([SEP]) would otherwise
                    # make the model continue after it.
                    "input_ids": ids[:, : last + 1],
                })
            sense_index += 1
    return {
        "hidden": torch.stack(states),
        "surface_ids": torch.tensor(surfaces, dtype=torch.long),
        "sense_ids": torch.tensor(senses, dtype=torch.long),
        "rows": rows,
    }


def _contexts_label(contexts) -> tuple[list[dict], str]:
    if contexts is None:
        return load_contexts(), f"decollapse/data/{DEFAULT_CONTEXTS} (default)"
    if isinstance(contexts, (str, Path)):
        return load_contexts(contexts), str(contexts)
    return contexts, f"{len(contexts)} words given in memory"


@torch.no_grad()
def score_homonym_contexts(model, tokenizer, contexts=None, max_new_tokens: int = 8) -> dict:
    """Sense separation of homonyms in a causal LM's contextual states, with its baselines, and
    greedy continuations after each homonym.

    Args:
        model: a causal LM (``output_hidden_states`` support; ``generate`` for continuations).
        tokenizer: a fast tokenizer (the word's tokens are found through its offset mapping).
        contexts: the list :func:`load_contexts` returns, a path to such a file, or None (the default file).
        max_new_tokens: tokens generated per sentence; 0 skips continuations.

    Returns:
        A JSON-able dict: ``metrics`` (:func:`~decollapse.modeling.diagnostics.homonym_report`:
        separation, same_sense_baseline, random_pair_baseline, margin, homonyms, same_sense_groups),
        ``per_word`` (word -> mean ``1 − cos`` between its sense centroids), ``continuations``
        (word, sense, sentence, prefix, continuation), ``continuations_skipped`` (why there are none,
        or None), ``model``, ``contexts`` (where the sentences came from), ``contexts_sha256``,
        ``sentences`` and ``max_new_tokens``. Deterministic: no sampling, no dropout.

    Raises:
        ValueError: bad contexts, a tokenizer without offsets, a model without hidden states.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    contexts, label = _contexts_label(contexts)
    was_training = model.training
    model.eval()  # dropout off: the same sentence must give the same state
    try:
        states = homonym_states(model, tokenizer, contexts)
        metrics = homonym_report(states["hidden"], states["surface_ids"], states["sense_ids"])
        per_word = {}
        for w, entry in enumerate(contexts):
            rows = states["surface_ids"] == w
            per_word[entry["word"]] = homonym_separation(
                states["hidden"][rows], states["surface_ids"][rows], states["sense_ids"][rows]
            )
        continuations, skipped = [], None
        if max_new_tokens == 0:
            skipped = "max_new_tokens=0"
        elif not callable(getattr(model, "generate", None)):
            skipped = f"{type(model).__name__} has no generate()"
            logger.warning("continuations skipped: %s", skipped)
        else:
            continuations = _continuations(model, tokenizer, states["rows"], max_new_tokens)
    finally:
        model.train(was_training)
    canonical = json.dumps(contexts, sort_keys=True, ensure_ascii=False).encode("utf-8")
    name = getattr(model, "name_or_path", "") or ""
    logger.info("scored %d sentences of %d words: separation %.4f", len(states["rows"]), len(contexts),
                metrics["separation"])
    return {
        "metrics": metrics,
        "per_word": per_word,
        "continuations": continuations,
        "continuations_skipped": skipped,
        "model": f"{type(model).__name__} ({name})" if name else type(model).__name__,
        "contexts": label,
        "contexts_sha256": hashlib.sha256(canonical).hexdigest(),
        "sentences": len(states["rows"]),
        "max_new_tokens": max_new_tokens,
    }


def _continuations(model, tokenizer, rows: list[dict], max_new_tokens: int) -> list[dict]:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    for row in rows:
        ids = row["input_ids"]
        generated = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
            pad_token_id=pad,
        )
        text = tokenizer.decode(generated[0, ids.shape[1]:].tolist(), skip_special_tokens=True)
        out.append({k: row[k] for k in ("word", "sense", "sentence", "prefix")} | {"continuation": text})
    return out
