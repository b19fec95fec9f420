"""Real text corpora, from local files or the Hugging Face Hub, as rows of token ids.

Every non-empty line (local files) or row (Hub datasets) is one document. Documents are tokenised,
each followed by ``[EOS]`` (or the given tokenizer's own end token). By default they are packed:
concatenated per split and cut into blocks of exactly ``block_size`` tokens (the incomplete tail of
each split is dropped), with ``position_ids`` restarting at every document so that the model attends
within documents only. A model that cannot keep packed documents apart gets one document per row.

Without a tokenizer, a byte-level BPE is trained on the train split only, so validation and test
text never shapes the vocabulary the model is scored with. Byte-level means there is no unknown
token on any input, which keeps perplexities comparable across corpora.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import zlib
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
# How documents become rows (see load_text_corpus).
PACKING: tuple[str, ...] = ("documents", "none", "concat")


@dataclass
class TextCorpus:
    """``dataset``: ``datasets.DatasetDict`` with splits train / validation / test and one column,
    ``input_ids``, every row exactly ``block_size`` long. ``num_tokens[split]`` counts the tokens
    kept in blocks; ``dropped_tokens[split]`` the tail that did not fill a block."""

    source: str
    dataset: Any
    tokenizer: Any
    block_size: int
    packing: str = "documents"
    streaming: bool = False
    num_tokens: dict[str, int] = field(default_factory=dict)
    dropped_tokens: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {
            "kind": "decollapse-text-corpus",
            "source": self.source,
            "block_size": self.block_size,
            "packing": self.packing,
            "streaming": self.streaming,
            "vocab_size": len(self.tokenizer),
            # A stream's train split has no length; its held-out splits are materialised.
            "num_blocks": {split: len(d) for split, d in self.dataset.items() if hasattr(d, "__len__")},
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


def _split_files(path: Path) -> dict[str, list[Path]]:
    """The files of each split of a local source. A single file is all train (the held-out splits are
    carved from it). In a folder, a file belongs to the split its name names, a file naming none is
    ignored with a warning, and a folder without a train file is an error unless it holds one file."""
    if path.is_file():
        return {"train": [path], "validation": [], "test": []}
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
            return {"train": files, "validation": [], "test": []}
        raise ValueError(
            f"Text corpus folder {path} has no train split: no file name contains 'train' "
            "(give a folder with a train file, or a single text file to split 90/5/5)."
        )
    return by_split


def _local_documents(path: Path, seed: int) -> dict[str, list[str]]:
    by_split = _split_files(path)
    documents = {split: [line for f in found for line in _read_lines(f)] for split, found in by_split.items()}
    if not documents["train"]:
        raise ValueError(
            f"Text corpus file {path} contains no text." if path.is_file()
            else f"Text corpus folder {path} has an empty train split."
        )
    missing = tuple(split for split in ("validation", "test") if not by_split[split])
    if missing:
        logger.info("%s has no %s file; carving it from train", path, " / ".join(missing))
        documents.update(_split_documents(documents["train"], seed, missing))
    for split in SPLITS:
        if not documents[split]:
            raise ValueError(f"Text corpus {path} has an empty {split} split.")
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


def _encode(documents: list[str], tokenizer, end_id: int) -> list[np.ndarray]:
    """Each document's token ids followed by the end token."""
    encoded = []
    for lo in range(0, len(documents), _ENCODE_BATCH):
        for ids in tokenizer(documents[lo : lo + _ENCODE_BATCH], add_special_tokens=False)["input_ids"]:
            encoded.append(np.asarray([*ids, end_id], dtype=np.int64))
    return encoded


def _rows(encoded: list[np.ndarray], block_size: int, packing: str) -> tuple[dict[str, list[np.ndarray]], int, int]:
    """The rows of one split as ``{column: [row, ...]}``, with the tokens kept and dropped.

    ``concat`` and ``documents`` cut the concatenated documents into full blocks (the tail that does
    not fill one is dropped); ``documents`` adds ``position_ids`` that restart at every document
    start, and at the start of each block, where a document cut by the previous block continues as a
    document of its own. ``none`` gives every document rows of its own: chunks of at most
    ``block_size`` tokens, padded by the collator; a one-token chunk teaches nothing and is dropped.
    """
    if packing == "none":
        rows = [doc[lo : lo + block_size] for doc in encoded for lo in range(0, len(doc), block_size)]
        kept = [row for row in rows if len(row) > 1]
        dropped = sum(len(row) for row in rows) - sum(len(row) for row in kept)
        return {"input_ids": kept}, sum(len(row) for row in kept), dropped
    stream = np.concatenate(encoded) if encoded else np.zeros(0, dtype=np.int64)
    usable = (len(stream) // block_size) * block_size
    blocks = stream[:usable].reshape(-1, block_size)
    columns = {"input_ids": list(blocks)}
    if packing == "documents":
        lengths = np.array([len(doc) for doc in encoded], dtype=np.int64)
        starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
        positions = (np.arange(len(stream)) - starts)[:usable].reshape(-1, block_size)
        document = np.repeat(np.arange(len(encoded)), lengths)[:usable].reshape(-1, block_size)
        continues = document == document[:, :1]  # the document the block opens with, maybe cut
        positions = np.where(continues, positions - positions[:, :1], positions)
        columns["position_ids"] = list(positions)
    return columns, int(usable), len(stream) - usable


def _arrow_rows(rows: list[np.ndarray]):
    import pyarrow as pa

    lengths = np.array([len(row) for row in rows], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    values = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


def _check_options(block_size, tokenizer, vocab_size, packing: str) -> None:
    """The options both loaders take, each against what it can mean (ValueError naming the first bad one)."""
    if packing not in PACKING:
        raise ValueError(f"packing={packing!r} is not allowed: expected one of {', '.join(PACKING)}.")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size={block_size!r} is not allowed: expected a positive integer.")
    bad_vocab = isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 300
    if tokenizer is None and bad_vocab:
        raise ValueError(
            f"vocab_size={vocab_size!r} is not allowed: expected an integer >= 300 (256 bytes + specials)."
        )


def _end_id(tokenizer) -> int:
    """The token that ends each document: the tokenizer's eos, else its sep."""
    end_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if end_id is None:
        raise ValueError("The given tokenizer has neither an eos_token nor a sep_token to end documents.")
    return end_id


def load_text_corpus(
    source: str,
    *,
    hub_config: str | None = None,
    block_size: int = 128,
    tokenizer=None,
    vocab_size: int = 8000,
    seed: int = 0,
    packing: str = "documents",
) -> TextCorpus:
    """Load ``source`` as train / validation / test blocks of ``block_size`` token ids.

    ``source`` is a text file, a folder of text files, or a Hub dataset id (loaded with
    ``datasets.load_dataset(source, hub_config)``). In a folder, a file belongs to the split its
    name names (``train``; ``valid``, ``validation`` or ``dev``; ``test``); a missing validation or
    test split is carved from train (5% of its lines each), and a folder without a train file is an
    error unless it holds exactly one file. A single file is split by lines 90/5/5. ``seed`` drives
    those splits. Without ``tokenizer``, a byte-level BPE of ``vocab_size`` tokens is trained on
    train. ``packing`` (:data:`PACKING`) says how documents become rows: ``documents`` packs them into
    full blocks with ``position_ids`` restarting at each document, so a model that keeps documents
    apart (``config.supports_packed_documents``) never attends across them; ``none`` gives each
    document rows of its own (padded when batched); ``concat`` packs without position ids, attention
    crossing document boundaries (GPT-2's recipe). Raises ``ValueError`` for a missing path,
    unreadable or empty data, an unknown packing, or a split too short to fill one row.

    A local corpus is tokenised once: the rows and the tokenizer are saved with ``datasets`` under
    :func:`text_cache_root`, and read back (memory-mapped) by every later call with the same files
    and settings.
    """
    _check_options(block_size, tokenizer, vocab_size, packing)

    path = Path(source).expanduser()
    cache = _cache_folder(path, block_size, tokenizer, vocab_size, seed, packing) if path.exists() else None
    if cache is not None and (cache / "corpus.json").is_file():
        try:
            return _load_cached(cache, str(source))
        except (OSError, ValueError, KeyError) as err:  # a damaged entry is rebuilt, never trusted
            logger.warning("rebuilding the cached corpus %s (%s)", cache, err)
    if path.exists():
        documents = _local_documents(path, seed)
    elif path.is_absolute() or str(source).startswith((".", "~")) or not _HUB_ID.match(str(source)):
        raise ValueError(f"Text corpus path {source} does not exist.")
    else:
        documents = _hub_documents(str(source), hub_config, seed)

    if tokenizer is None:
        tokenizer = train_bpe_tokenizer(documents["train"], vocab_size)
    end_id = _end_id(tokenizer)

    import datasets
    import pyarrow as pa

    splits, kept, dropped = {}, {}, {}
    for split in SPLITS:
        columns, kept[split], dropped[split] = _rows(_encode(documents[split], tokenizer, end_id), block_size, packing)
        if not columns["input_ids"]:
            raise ValueError(
                f"Text corpus {source} has too little {split} text for one block of {block_size} tokens."
            )
        splits[split] = datasets.Dataset(pa.table({name: _arrow_rows(rows) for name, rows in columns.items()}))
    logger.info("text corpus %s: %s tokens in blocks of %d", source, kept, block_size)
    corpus = TextCorpus(
        source=str(source),
        dataset=datasets.DatasetDict(splits),
        tokenizer=tokenizer,
        block_size=block_size,
        packing=packing,
        num_tokens=kept,
        dropped_tokens=dropped,
    )
    if cache is not None:
        _save_cached(corpus, cache)
    return corpus


# --------------------------------------------------------------------------------------------------
# The cache of tokenised local corpora
# --------------------------------------------------------------------------------------------------


def text_cache_root() -> Path:
    """Where tokenised local corpora are kept: ``$DECOLLAPSE_TEXT_CACHE``, else ``decollapse-text`` in
    the ``datasets`` cache (``$HF_DATASETS_CACHE``)."""
    if os.environ.get("DECOLLAPSE_TEXT_CACHE"):
        return Path(os.environ["DECOLLAPSE_TEXT_CACHE"]).expanduser()
    import datasets

    return Path(datasets.config.HF_DATASETS_CACHE) / "decollapse-text"


def _cache_folder(path: Path, block_size: int, tokenizer, vocab_size: int, seed: int, packing: str) -> Path:
    """The cache entry of a local corpus: named by a hash of everything the rows depend on — each
    file's path, size and modification time, the tokenizer (its full serialisation) or the BPE's
    vocabulary size, the split seed, block size and packing — so a changed input never meets a stale
    entry."""
    files = [f for found in _split_files(path).values() for f in found]
    key = {
        "format": 1,
        "files": [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files],
        "tokenizer": None if tokenizer is None else hashlib.sha256(
            tokenizer.backend_tokenizer.to_str().encode("utf-8")
        ).hexdigest() if hasattr(tokenizer, "backend_tokenizer") else repr(tokenizer),
        "vocab_size": vocab_size if tokenizer is None else None,
        "seed": seed,
        "block_size": block_size,
        "packing": packing,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode("utf-8")).hexdigest()[:24]
    return text_cache_root() / f"{path.name}-{digest}"


def _save_cached(corpus: TextCorpus, folder: Path) -> None:
    """Writes the entry beside its final name and renames it into place: a reader never sees half of
    one, and two runs building the same entry at once leave one."""
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    except OSError as err:  # a read-only cache only costs the next run its tokenising
        logger.warning("not caching the corpus in %s (%s)", folder.parent, err)
        return
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    quiet = are_progress_bars_disabled()
    disable_progress_bars()  # a cache write is bookkeeping, not progress the user waits for
    try:
        corpus.dataset.save_to_disk(str(staging / "data"))
        corpus.tokenizer.save_pretrained(str(staging / "tokenizer"))
        (staging / "corpus.json").write_text(json.dumps({
            "block_size": corpus.block_size, "packing": corpus.packing,
            "num_tokens": corpus.num_tokens, "dropped_tokens": corpus.dropped_tokens,
        }) + "\n")
        os.replace(staging, folder)
    except OSError as err:
        logger.warning("not caching the corpus in %s (%s)", folder, err)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if not quiet:
            enable_progress_bars()


def _load_cached(folder: Path, source: str) -> TextCorpus:
    import datasets
    from transformers import AutoTokenizer

    meta = json.loads((folder / "corpus.json").read_text())
    logger.info("text corpus %s: read from the cache %s", source, folder)
    return TextCorpus(
        source=source,
        dataset=datasets.load_from_disk(str(folder / "data")),
        tokenizer=AutoTokenizer.from_pretrained(str(folder / "tokenizer")),
        block_size=meta["block_size"],
        packing=meta["packing"],
        num_tokens=meta["num_tokens"],
        dropped_tokens=meta["dropped_tokens"],
    )


# --------------------------------------------------------------------------------------------------
# Streaming
# --------------------------------------------------------------------------------------------------

# Documents of the train stream a tokenizer is trained on when none is given.
TOKENIZER_DOCUMENTS = 10_000
# Documents tokenised and packed together; at most one block's tail per group is dropped.
_STREAM_GROUP = 1000
_SHUFFLE_BUFFER = 10_000


def _held_out_share(text: str) -> str:
    """The split a document of a stream without held-out splits goes to: 5% validation, 5% test, by a
    hash of its text, so the assignment needs no pass over the data and no shard can disagree."""
    bucket = zlib.crc32(text.encode("utf-8")) % 20
    return "validation" if bucket == 0 else "test" if bucket == 1 else "train"


def _stream_splits(source: str, hub_config: str | None) -> dict[str, Any]:
    """``{split: IterableDataset of documents in a "text" column}``, held-out splits carved by hash when
    the source has none."""
    import datasets

    path = Path(source).expanduser()
    if path.exists():
        data_files = {split: [str(f) for f in found] for split, found in _split_files(path).items() if found}
        loaded = datasets.load_dataset("text", data_files=data_files, streaming=True)
        names = {split: (split,) for split in SPLITS}
    else:
        try:
            loaded = datasets.load_dataset(source, hub_config, streaming=True)
        except Exception as exc:  # the Hub client raises many types; the caller needs one
            raise ValueError(f"Text corpus source {source!r} could not be streamed from the Hub ({exc}).") from exc
        names = _HUB_SPLIT_NAMES
    found = {}
    for split, candidates in names.items():
        name = next((n for n in candidates if n in loaded), None)
        if name is None:
            continue
        part = loaded[name]
        features = part.features or {}  # a text stream may not know its features before reading
        strings = [c for c, f in features.items() if getattr(f, "dtype", None) in ("string", "large_string")]
        column = "text" if "text" in features or not features else (strings[0] if strings else None)
        if column is None:
            raise ValueError(f"{source!r} split {name!r} has no text column.")
        if column != "text":
            part = part.rename_column(column, "text")
        found[split] = part.filter(lambda row: bool(row["text"] and row["text"].strip()))
    if "train" not in found:
        raise ValueError(f"Text corpus {source!r} has no train split.")
    carved = tuple(split for split in ("validation", "test") if split not in found)
    documents = found["train"]
    for split in carved:
        found[split] = documents.filter(lambda row, s=split: _held_out_share(row["text"]) == s)
    if carved:
        found["train"] = documents.filter(lambda row: _held_out_share(row["text"]) not in carved)
    return found


def stream_text_corpus(
    source: str,
    *,
    hub_config: str | None = None,
    block_size: int = 128,
    tokenizer=None,
    vocab_size: int = 8000,
    seed: int = 0,
    packing: str = "documents",
    held_out_rows: int = 2000,
    rank: int = 0,
    world_size: int = 1,
) -> TextCorpus:
    """``source`` (a Hub dataset id, a local text file or folder) as a stream, for corpora that do not
    fit in memory: the train split an ``IterableDataset`` that tokenises and packs documents as it is
    read (``packing`` as in :func:`load_text_corpus`), shuffled in a buffer of 10,000 documents.

    With ``world_size`` > 1, each rank trains on its own part of the train stream
    (``datasets.distributed.split_dataset_by_node``: whole files when the stream has a multiple of
    ``world_size`` files; otherwise every rank reads and packs the whole stream and keeps every
    ``world_size``-th row, disjoint from the others' and together all of them). Validation and test are their
    first ``held_out_rows`` rows, read in full by every rank. A source without held-out splits gives 5%
    of its documents to each, chosen by a hash of the text. Without ``tokenizer``, a byte-level BPE is
    trained on the first 10,000 (``TOKENIZER_DOCUMENTS``) documents of the train stream.
    """
    _check_options(block_size, tokenizer, vocab_size, packing)
    import datasets
    from datasets.distributed import split_dataset_by_node

    splits = _stream_splits(source, hub_config)
    if tokenizer is None:
        sample = [row["text"].rstrip() for row in splits["train"].take(TOKENIZER_DOCUMENTS)]
        if not sample:
            raise ValueError(f"Text corpus {source} has an empty train split.")
        tokenizer = train_bpe_tokenizer(sample, vocab_size)
    end_id = _end_id(tokenizer)

    def pack(batch: dict[str, list]) -> dict[str, list]:
        columns, _, _ = _rows(_encode([t.rstrip() for t in batch["text"]], tokenizer, end_id), block_size, packing)
        return {name: [row.tolist() for row in rows] for name, rows in columns.items()}

    def packed(stream):
        names = list(stream.column_names or ["text"])
        return stream.map(pack, batched=True, batch_size=_STREAM_GROUP, remove_columns=names)

    held_out, kept = {}, {}
    for split in ("validation", "test"):
        rows = list(packed(splits[split]).take(held_out_rows))
        if not rows:
            raise ValueError(f"Text corpus {source} has too little {split} text for one block of {block_size} tokens.")
        held_out[split] = datasets.Dataset.from_list(rows)
        kept[split] = int(sum(len(row["input_ids"]) for row in rows))
    train = splits["train"].shuffle(seed=seed, buffer_size=_SHUFFLE_BUFFER)
    if world_size > 1:
        train = split_dataset_by_node(train, rank=rank, world_size=world_size)
    return TextCorpus(
        source=str(source),
        dataset={"train": packed(train), **held_out},
        tokenizer=tokenizer,
        block_size=block_size,
        packing=packing,
        streaming=True,
        num_tokens=kept,
    )
