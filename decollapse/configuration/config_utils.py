"""The base every decollapse configuration derives from.

Configurations are `transformers` dataclass configs (transformers >= 5): fields are annotated class
attributes and validation happens once, in ``__post_init__``. This module imports only the standard
library and ``transformers`` because it is copied into self-contained Hub bundles next to each
architecture's ``configuration_<arch>.py``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any, ClassVar

from transformers import PreTrainedConfig

OBJECTIVES = ("causal_lm", "masked_lm")


class DecollapseConfig(PreTrainedConfig):
    """Fields and checks shared by every decollapse architecture.

    Subclasses declare their own fields, call the ``check_*`` helpers in ``validate()`` and name
    their auxiliary (anti-collapse) losses in ``aux_loss_weight_fields``: a map from the term's name,
    as it appears in ``outputs.aux_losses``, to the config field holding its default weight. The
    model adds ``weight * term`` to ``outputs.loss`` for every term whose weight is non-zero, the
    convention Mixtral uses with ``router_aux_loss_coef``, so a plain ``transformers.Trainer`` trains
    with the regularizers too.
    """

    model_type = "decollapse"
    aux_loss_weight_fields: ClassVar[dict[str, str]] = {}
    # The objectives this architecture has heads for (the registry maps each to its model class).
    supported_objectives: ClassVar[tuple[str, ...]] = OBJECTIVES
    # Fields whose default changed after configurations were saved without them: field -> the value
    # such a saved configuration was trained with. Loading fills it in where the key is absent, so a
    # checkpoint keeps the model it was trained as; a configuration built in code gets the new default.
    saved_without_key_defaults: ClassVar[dict[str, Any]] = {}

    vocab_size: int = 4096
    hidden_size: int = 64
    num_hidden_layers: int = 2
    max_position_embeddings: int = 128
    objective: str = "causal_lm"
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-5
    hidden_dropout: float = 0.0
    tie_word_embeddings: bool = True
    use_cache: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self, **kwargs):
        # Shared fields first, so an architecture's validate() may derive values from them safely.
        self.check_positive("vocab_size", "hidden_size", "num_hidden_layers", "max_position_embeddings")
        self.check_choice("objective", self.supported_objectives)
        self.check_range("initializer_range", 0.0, 1.0, low_inclusive=False)
        self.check_range("hidden_dropout", 0.0, 1.0, high_inclusive=False)
        self.check_range("layer_norm_eps", 0.0, 1.0, low_inclusive=False)
        for field in self.aux_loss_weight_fields.values():
            self.check_range(field, 0.0, float("inf"))
        self.validate()
        super().__post_init__(**kwargs)
        # A causal LM needs the decoder flag so GenerationMixin and masking utilities treat it as one.
        self.is_decoder = self.objective == "causal_lm"

    def validate(self) -> None:
        """Architecture-specific checks and derived defaults; runs after the shared checks."""

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs):
        # The one door a saved configuration comes in by: `from_pretrained` and `AutoConfig` (local
        # or `trust_remote_code`) both end here, and building a config in code never does.
        absent = {k: v for k, v in cls.saved_without_key_defaults.items() if k not in config_dict}
        return super().from_dict({**absent, **config_dict}, **kwargs)

    # -- validation helpers: every error names the field, the value and what is allowed ----------
    def _fail(self, field: str, allowed: str) -> None:
        raise ValueError(
            f"{type(self).__name__}.{field}={getattr(self, field)!r} is not allowed: expected {allowed}."
        )

    def check_positive(self, *fields: str) -> None:
        for field in fields:
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                self._fail(field, "a positive integer")

    def check_choice(self, field: str, choices: Iterable[str]) -> None:
        choices = tuple(choices)
        if getattr(self, field) not in choices:
            self._fail(field, "one of " + ", ".join(repr(c) for c in choices))

    def check_range(
        self,
        field: str,
        low: float,
        high: float,
        *,
        low_inclusive: bool = True,
        high_inclusive: bool = True,
    ) -> None:
        value = getattr(self, field)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok:
            ok = (value >= low if low_inclusive else value > low) and (
                value <= high if high_inclusive else value < high
            )
        if not ok:
            lo = "[" if low_inclusive else "("
            hi = "]" if high_inclusive else ")"
            self._fail(field, f"a number in {lo}{low}, {high}{hi}")

    def check_divisible(self, field: str, by_field: str) -> None:
        if getattr(self, field) % getattr(self, by_field) != 0:
            self._fail(field, f"a multiple of {by_field}={getattr(self, by_field)}")

    @property
    def supports_packed_documents(self) -> bool:
        """Whether the model keeps packed documents apart: given ``position_ids`` that restart at each
        document of a row, no position reads another document (block-diagonal attention, and no pooling
        across the row). The text-corpus loader packs documents only for a model that says so, and
        gives the others one document per row."""
        return False

    @property
    def required_extras(self) -> dict[str, tuple[str, str]]:
        """Setting -> (importable module, ``decollapse`` extra) that this configuration needs beyond the
        base install; checked before a run starts so a missing extra is one line, not a failure later."""
        return {}

    # -- the auxiliary-loss contract --------------------------------------------------------------
    @property
    def aux_loss_weights(self) -> dict[str, float]:
        """Default weight of each auxiliary term, by the name the model reports it under."""
        return {term: float(getattr(self, field)) for term, field in self.aux_loss_weight_fields.items()}

    @classmethod
    def knobs(cls) -> dict[str, Any]:
        """Architecture-specific fields and their defaults (what ``decollapse list`` shows)."""
        own = {f.name for f in dataclasses.fields(DecollapseConfig)} | {
            f.name for f in dataclasses.fields(PreTrainedConfig)
        }
        out = {}
        for f in dataclasses.fields(cls):
            if f.name.startswith("_"):
                continue
            if f.name in own and f.name not in _SHARED_KNOBS:
                continue
            default = f.default if f.default is not dataclasses.MISSING else None
            out[f.name] = default
        return out


# Shared fields worth showing next to each architecture's own knobs in ``decollapse list``.
_SHARED_KNOBS = (
    "hidden_size",
    "num_hidden_layers",
    "max_position_embeddings",
    "objective",
    "hidden_dropout",
    "tie_word_embeddings",
)
