"""Real text corpora, from local files or the Hugging Face Hub, as fixed-size blocks of token ids.

Every non-empty line (local files) or row (Hub datasets) is one document. Documents are tokenised,
each followed by ``[EOS]`` (or the given tokenizer's own end token), concatenated per split and cut
into blocks of exactly ``block_size`` tokens; the incomplete tail of each split is dropped.

Without a tokenizer, a byte-level BPE is trained on the train split only, so validation and test
text never shapes the vocabulary the model is scored with. Byte-level means there is no unknown
token on any input, which keeps perplexities comparable across corpora.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .synthetic import SPECIAL_TOKENS

logger = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "validation", "test")
# Held-out shares when one file (or a train split alone) has to be divided.
HELD_OUT_FRACTION = 0.05
_SPLIT_PATTERNS = {
    "train": re.compile(r"(^|[^a-z])train"),
    "validation": re.compile(r"(^|[^a-z])(valid|validation|dev)([^a-z]|$)"),
    "test": re.compile(r"(^|[^a-z])test"),
}
_HUB_SPLIT_NAMES = {
    "train": ("train",),
    "validation": ("validation", "valid", "dev"),
    "test": ("test",),
}
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")
_ENCODE_BATCH = 1000


@dataclass
class TextCorpus:
    """``dataset``: ``datasets.DatasetDict`` with splits train / validation / test and one column,
    ``input_ids``, every row exactly ``block_size`` long. ``num_tokens[split]`` counts the tokens
    kept in blocks; ``dropped_tokens[split]`` the tail that did not fill a block."""

    source: str
    dataset: Any
    tokenizer: Any
    block_size: int
    num_tokens: dict[str, int] = field(default_factory=dict)
    dropped_tokens: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {
            "kind": "decollapse-text-corpus",
            "source": self.source,
            "block_size": self.block_size,
            "vocab_size": len(self.tokenizer),
            "num_blocks": {split: len(self.dataset[split]) for split in self.dataset},
            "num_tokens": self.num_tokens,
            "dropped_tokens": self.dropped_tokens,
        }

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.summary(), indent=2, sort_keys=True)
        if path is not None:
            Path(path).write_text(text + "\n", encoding="utf-8")
        return text


# --------------------------------------------------------------------------------------------------
# Reading documents
# --------------------------------------------------------------------------------------------------


def _read_lines(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"Text corpus file {path} could not be read as UTF-8 text ({exc}).") from exc
    # Leading whitespace is kept (indentation carries meaning in code); blank lines separate nothing.
    return [line.rstrip() for line in text.splitlines() if line.strip()]


def _split_documents(documents: list[str], seed: int, held_out: tuple[str, ...]) -> dict[str, list[str]]:
    """Divide documents into train plus the ``held_out`` splits (``HELD_OUT_FRACTION`` each).

    The assignment is a seeded permutation, so held-out text is spread over the whole source rather
    than being its last article or two; each split keeps the original document order.
    """
    order = np.random.default_rng(seed).permutation(len(documents))
    count = int(round(HELD_OUT_FRACTION * len(documents)))
    parts: dict[str, list[str]] = {}
    cursor = 0
    for split in held_out:
        chosen = np.sort(order[cursor : cursor + count])
        parts[split] = [documents[i] for i in chosen]
        cursor += count
    parts["train"] = [documents[i] for i in np.sort(order[cursor:])]
    return parts


def _classify(name: str) -> str | None:
    name = name.lower()
    for split in ("validation", "test", "train"):
        if _SPLIT_PATTERNS[split].search(name):
            return split
    return None


def _local_documents(path: Path, seed: int) -> dict[str, list[str]]:
    if path.is_file():
        documents = _read_lines(path)
        if not documents:
            raise ValueError(f"Text corpus file {path} contains no text.")
        return _split_documents(documents, seed, ("validation", "test"))

    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise ValueError(f"Text corpus folder {path} contains no files.")
    by_split: dict[str, list[Path]] = {split: [] for split in SPLITS}
    for file in files:
        split = _classify(file.relative_to(path).as_posix())
        if split is None:
            logger.warning("ignoring %s: its name names no split (train / valid / test)", file)
        else:
            by_split[split].append(file)

    if not by_split["train"]:
        if len(files) == 1:
            return _local_documents(files[0], seed)
        raise ValueError(
            f"Text corpus folder {path} has no train split: no file name contains 'train' "
            "(give a folder with a train file, or a single text file to split 90/5/5)."
        )
    documents = {split: [line for f in found for line in _read_lines(f)] for split, found in by_split.items()}
    if not documents["train"]:
        raise ValueError(f"Text corpus folder {path} has an empty train split.")
    missing = tuple(split for split in ("validation", "test") if not by_split[split])
    if missing:
        logger.info("%s has no %s file; carving it from train", path, " / ".join(missing))
        carved = _split_documents(documents["train"], seed, missing)
        documents.update(carved)
    for split in SPLITS:
        if not documents[split]:
            raise ValueError(f"Text corpus folder {path} has an empty {split} split.")
    return documents


def _hub_documents(source: str, hub_config: str | None, seed: int) -> dict[str, list[str]]:
    import datasets

    try:
        loaded = datasets.load_dataset(source, hub_config)
    except Exception as exc:  # the Hub client raises many types; the caller needs one
        raise ValueError(
            f"Text corpus source {source!r} is neither an existing local path "
            f"nor a loadable Hub dataset ({exc})."
        ) from exc
    if not isinstance(loaded, datasets.DatasetDict):
        loaded = datasets.DatasetDict({"train": loaded})

    documents: dict[str, list[str]] = {}
    for split, names in _HUB_SPLIT_NAMES.items():
        name = next((n for n in names if n in loaded), None)
        if name is None:
            continue
        part = loaded[name]
        column = "text" if "text" in part.column_names else None
        if column is None:
            text_types = ("string", "large_string")
            strings = [c for c, f in part.features.items() if getattr(f, "dtype", None) in text_types]
            column = strings[0] if strings else None
        if column is None:
            raise ValueError(f"Hub dataset {source!r} split {name!r} has no text column.")
        documents[split] = [t.rstrip() for t in part[column] if t and t.strip()]
    if not documents.get("train"):
        raise ValueError(f"Hub dataset {source!r} has no (non-empty) train split.")
    missing = tuple(split for split in ("validation", "test") if not documents.get(split))
    if missing:
        documents.update(_split_documents(documents["train"], seed, missing))
    return documents


# --------------------------------------------------------------------------------------------------
# Tokenising
# --------------------------------------------------------------------------------------------------


def train_bpe_tokenizer(documents: list[str], vocab_size: int):
    """A byte-level BPE with the package's special tokens, wrapped for ``transformers``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(SPECIAL_TOKENS.values())
    tokenizer = Tokenizer(models.BPE())
    # A prefix space makes a document's first word the same token as that word mid-text.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )

    def batches():
        for lo in range(0, len(documents), _ENCODE_BATCH):
            yield documents[lo : lo + _ENCODE_BATCH]

    tokenizer.train_from_iterator(batches(), trainer=trainer, length=len(documents))
    # Blocks are cut by this module, never by the tokenizer, so no length limit applies.
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=10**12, **SPECIAL_TOKENS)


def _blocks(documents: list[str], tokenizer, end_id: int, block_size: int) -> tuple[np.ndarray, int]:
    pieces = []
    for lo in range(0, len(documents), _ENCODE_BATCH):
        encoded = tokenizer(documents[lo : lo + _ENCODE_BATCH], add_special_tokens=False)["input_ids"]
        for ids in encoded:
            pieces.append(np.asarray(ids, dtype=np.int64))
            pieces.append(np.array([end_id], dtype=np.int64))
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    usable = (len(stream) // block_size) * block_size
    return stream[:usable].reshape(-1, block_size), len(stream) - usable


def load_text_corpus(
    source: str,
    *,
    hub_config: str | None = None,
    block_size: int = 128,
    tokenizer=None,
    vocab_size: int = 8000,
    seed: int = 0,
) -> TextCorpus:
    """Load ``source`` as train / validation / test blocks of ``block_size`` token ids.

    ``source`` is a text file, a folder of text files, or a Hub dataset id (loaded with
    ``datasets.load_dataset(source, hub_config)``). In a folder, a file belongs to the split its
    name names (``train``; ``valid``, ``validation`` or ``dev``; ``test``); a missing validation or
    test split is carved from train (5% of its lines each), and a folder without a train file is an
    error unless it holds exactly one file. A single file is split by lines 90/5/5. ``seed`` drives
    those splits. Without ``tokenizer``, a byte-level BPE of ``vocab_size`` tokens is trained on
    train. Raises ``ValueError`` for a missing path, unreadable or empty data, or a split too short
    to fill one block.
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size={block_size!r} is not allowed: expected a positive integer.")
    bad_vocab = isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 300
    if tokenizer is None and bad_vocab:
        raise ValueError(
            f"vocab_size={vocab_size!r} is not allowed: expected an integer >= 300 (256 bytes + specials)."
        )

    path = Path(source).expanduser()
    if path.exists():
        documents = _local_documents(path, seed)
    elif path.is_absolute() or str(source).startswith((".", "~")) or not _HUB_ID.match(str(source)):
        raise ValueError(f"Text corpus path {source} does not exist.")
    else:
        documents = _hub_documents(str(source), hub_config, seed)

    if tokenizer is None:
        tokenizer = train_bpe_tokenizer(documents["train"], vocab_size)
    end_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if end_id is None:
        raise ValueError("The given tokenizer has neither an eos_token nor a sep_token to end documents.")

    import datasets
    import pyarrow as pa

    splits, kept, dropped = {}, {}, {}
    for split in SPLITS:
        blocks, tail = _blocks(documents[split], tokenizer, end_id, block_size)
        if len(blocks) == 0:
            raise ValueError(
                f"Text corpus {source} has too little {split} text for one block of {block_size} tokens."
            )
        offsets = pa.array(np.arange(0, blocks.size + 1, block_size, dtype=np.int32))
        column = pa.ListArray.from_arrays(offsets, pa.array(blocks.reshape(-1)))
        splits[split] = datasets.Dataset(pa.table({"input_ids": column}))
        kept[split], dropped[split] = int(blocks.size), int(tail)
    logger.info("text corpus %s: %s tokens in blocks of %d", source, kept, block_size)
    return TextCorpus(
        source=str(source),
        dataset=datasets.DatasetDict(splits),
        tokenizer=tokenizer,
        block_size=block_size,
        num_tokens=kept,
        dropped_tokens=dropped,
    )
