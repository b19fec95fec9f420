"""Encoders for evaluation: load any decollapse checkpoint or HF model, pool it without parameters,
and wrap it as a ``SentenceTransformer``.

Pooling is parameter-free so zero-shot numbers involve no trained (or randomly initialised) weight:

- token models: ``e = Σ_t m_t h_t / Σ_t m_t`` over real tokens (``m`` = attention mask);
- concept models (``last_hidden_state`` holds C concept vectors, not tokens): ``e = (1/C) Σ_c z_c``.

A model declares which through its class attribute ``sentence_pooling`` (``"tokens"`` by default,
``"concepts"`` for the concept encoder, ``None`` for no pooling path); HF models pool tokens.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.modules.transformer import Transformer
from sentence_transformers.sentence_transformer.modules.pooling import Pooling
from transformers import AutoConfig, AutoModel, AutoTokenizer
from transformers.utils import logging as hf_logging

from .data import sha256_file
from .tasks import TaskError

logger = logging.getLogger(__name__)


class ModelError(TaskError):
    """The model cannot be evaluated (missing, no tokenizer, no pooling path); one line."""


@dataclass(frozen=True)
class ModelRef:
    """What to evaluate, as the user named it, plus what makes the result reproducible."""

    name: str  # a local folder or a Hub id
    revision: str | None = None
    trust_remote_code: bool = False

    @property
    def is_local(self) -> bool:
        return Path(self.name).expanduser().exists()

    @property
    def path(self) -> str:
        return str(Path(self.name).expanduser()) if self.is_local else self.name

    def load_kwargs(self) -> dict:
        kwargs = {"trust_remote_code": self.trust_remote_code}
        if self.revision is not None and not self.is_local:
            kwargs["revision"] = self.revision
        return kwargs

    def provenance(self) -> dict:
        """``path``, ``revision`` (the Hub commit) and, for a local folder, the sha256 of each weights file."""
        if self.is_local:
            weights = sorted(Path(self.path).glob("*.safetensors")) or sorted(Path(self.path).glob("*.bin"))
            return {"path": str(Path(self.path).resolve()), "revision": None,
                    "weights_sha256": {file.name: sha256_file(file) for file in weights}}
        try:
            commit = getattr(AutoConfig.from_pretrained(self.path, **self.load_kwargs()), "_commit_hash", None)
        except Exception:  # noqa: BLE001 - provenance is best effort; loading already succeeded
            commit = None
        return {"path": self.path, "revision": commit or self.revision, "weights_sha256": None}


def check_model_ref(ref: ModelRef) -> None:
    """Fail before any work when a local folder is not a model folder."""
    if ref.is_local and not (Path(ref.path) / "config.json").is_file():
        raise ModelError(f"{ref.path} is not a model folder: it has no config.json")


def load_tokenizer(ref: ModelRef):
    try:
        return AutoTokenizer.from_pretrained(ref.path, **ref.load_kwargs())
    except Exception as err:  # noqa: BLE001
        raise ModelError(f"{ref.path}: no tokenizer could be loaded ({type(err).__name__}: {_first_line(err)})") from None


def load_encoder(ref: ModelRef):
    """The base model (``AutoModel``) of a checkpoint, whatever head it was saved with.

    A checkpoint saved with a head (``…ForMaskedLM``) always has weights the base model does not use,
    so transformers' load report of unexpected keys is silenced; base weights missing from the
    checkpoint (left at random initialisation) are the ones worth a warning.
    """
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = AutoModel.from_pretrained(ref.path, output_loading_info=True, **ref.load_kwargs())
    except Exception as err:  # noqa: BLE001
        raise ModelError(f"{ref.path}: could not load it with AutoModel ({type(err).__name__}: {_first_line(err)})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        logger.warning("%s: %d base-model weight(s) not in the checkpoint, randomly initialised (e.g. %s)",
                       ref.path, len(missing), missing[0])
    pooling_mode(model)
    return model


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else ""


def pooling_mode(model) -> str:
    mode = getattr(model, "sentence_pooling", "tokens")
    if mode not in ("tokens", "concepts"):
        raise ModelError(
            f"{type(model).__name__} has no pooling path (sentence_pooling={mode!r}): it gives no per-token or "
            "per-concept states to average into a sentence embedding"
        )
    return mode


def hidden_states(output, model) -> torch.Tensor:
    hidden = getattr(output, "last_hidden_state", None)
    if hidden is None or hidden.dim() != 3:
        raise ModelError(
            f"{type(model).__name__} has no pooling path: its forward returns no last_hidden_state of shape "
            "[batch, tokens or concepts, hidden]"
        )
    return hidden


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None, mode: str) -> torch.Tensor:
    """Parameter-free sentence embedding ``[B, H]`` (see the module docstring for the formulas)."""
    if mode == "concepts" or attention_mask is None:
        return hidden.mean(dim=1)
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)


class ConceptPooling(Pooling):
    """Mean over concept vectors for ``SentenceTransformer``.

    The stock ``Pooling`` applies the token attention mask whenever its length equals the number of
    output vectors, so a concept model whose C happens to equal the padded length would silently mask
    concepts. This module never applies the token mask.
    """

    def __init__(self, embedding_dimension: int, pooling_mode: str = "mean", include_prompt: bool = True) -> None:
        if pooling_mode != "mean":
            raise ValueError("ConceptPooling averages concepts: pooling_mode must be 'mean'")
        super().__init__(embedding_dimension, "mean", include_prompt)

    def forward(self, features: dict, **kwargs) -> dict:
        concepts = features["token_embeddings"]
        features["sentence_embedding"] = concepts.mean(dim=1)
        return features


def to_sentence_transformer(ref: ModelRef, max_seq_length: int = 256, device: str = "cpu") -> SentenceTransformer:
    """``Transformer`` + parameter-free pooling built from the checkpoint's HF weights.

    A folder that is itself a sentence-transformers model is still wrapped from its weights, not its
    own modules: zero-shot means the parameter-free pooling above, for every model alike.
    """
    encoder = load_encoder(ref)  # fails early, with one line, when there is no pooling path
    mode = pooling_mode(encoder)
    width = encoder.config.hidden_size
    max_seq_length = effective_max_length(encoder.config, max_seq_length)
    del encoder
    kwargs = ref.load_kwargs()
    try:
        transformer = Transformer(
            ref.path,
            max_seq_length=max_seq_length,
            model_kwargs=dict(kwargs),
            processor_kwargs=dict(kwargs),
            config_kwargs=dict(kwargs),
        )
    except Exception as err:  # noqa: BLE001
        raise ModelError(f"{ref.path}: sentence-transformers could not load it ({type(err).__name__}: {_first_line(err)})") from None
    pooler = ConceptPooling(width) if mode == "concepts" else Pooling(width, "mean")
    return SentenceTransformer(modules=[transformer, pooler], device=device)


def effective_max_length(config, requested: int) -> int:
    """``requested`` capped at the model's position table: longer inputs are truncated, not crashed on."""
    limit = getattr(config, "max_position_embeddings", None)
    return min(requested, limit) if isinstance(limit, int) and limit > 0 else requested


def lora_target_modules(model) -> list[str] | None:
    """The modules LoRA adapts: the architecture's own choice for decollapse models (its class
    attribute ``lora_target_modules``), peft's per-model-type table for HF models (``None``)."""
    return getattr(model, "lora_target_modules", None)
