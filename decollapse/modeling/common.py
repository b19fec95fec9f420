"""Building blocks shared by every decollapse modeling file: masks, positions, LM losses and the
``PreTrainedModel`` base with the collapse-report contract.

Imports only torch, transformers and sibling modules, so the Hub export can copy it next to any
``modeling_<arch>.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils.deprecation import deprecate_kwarg

from .diagnostics import CollapseReport
from .outputs import DecollapseCausalLMOutput, DecollapseMaskedLMOutput, combine_losses

IGNORE_INDEX = -100


def position_ids_from_mask(
    attention_mask: torch.Tensor | None, seq_len: int, past_len: int, device: torch.device
) -> torch.Tensor:
    """Positions of the current ``seq_len`` tokens, shape (B or 1, T).

    With a 2-D padding mask covering past and current tokens, positions count real tokens only, so a
    left-padded prompt gets the same positions as the unpadded one (padding invariance).
    """
    if attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.all()):
        positions = attention_mask.long().cumsum(-1) - 1
        return positions.clamp_min(0)[:, -seq_len:]
    return torch.arange(past_len, past_len + seq_len, device=device).unsqueeze(0)


def document_starts(position_ids: torch.Tensor) -> torch.Tensor:
    """True where a packed document starts after the first position of its row, shape of ``position_ids``.

    A row may pack several documents, each with position ids restarting at 0 (the convention of
    transformers' ``DataCollatorWithFlattening``): a position id that does not continue the one before
    it starts a new document. Column 0 is never a start (nothing comes before it to separate from).
    """
    starts = torch.zeros_like(position_ids, dtype=torch.bool)
    starts[..., 1:] = position_ids[..., 1:] != position_ids[..., :-1] + 1
    return starts


def document_ids(position_ids: torch.Tensor | None, past_len: int = 0) -> torch.Tensor | None:
    """Which packed document each position belongs to, shape (B or 1, T), or None for one per row.

    Documents start where :func:`document_starts` says. Left padding reads the same way (each pad
    position is a document of its own, and the real tokens one document), so padded prompts keep
    working. Documents are a property of a whole sequence, so they cannot start inside a cached
    continuation.
    """
    if position_ids is None or position_ids.shape[-1] < 2:
        return None
    starts = document_starts(position_ids)
    if not bool(starts.any()):
        return None
    if past_len:
        raise ValueError(
            "position_ids restart inside the sequence (packed documents) while a cache holds earlier "
            "tokens: packed documents are read in one call without a cache."
        )
    return starts.long().cumsum(-1)


def selected_first(selected: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Indices along ``dim`` that put the True entries of ``selected`` first and the rest after, each
    group in its original order (a stable sort of the "not selected" flag): what packs the active
    (token, head) pairs of a routed attention, or the labelled positions of a decoder, to the front."""
    return torch.sort((~selected).to(torch.uint8), dim=dim, stable=True).indices


def attention_bias(
    attention_mask: torch.Tensor | None,
    q_len: int,
    past_len: int,
    causal: bool,
    device: torch.device,
    documents: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, bool]:
    """The ``attn_mask`` / ``is_causal`` pair for ``F.scaled_dot_product_attention``.

    Returns ``(None, causal)`` on the fast path (no padding, no packed documents, no cache offset) and
    otherwise a boolean mask of shape (B, 1, T, past + T) that is True where a query may attend. With
    ``documents`` (:func:`document_ids`) a query attends only within its own document: the mask is
    block-diagonal inside the causal one. Every query may always attend to itself: rows made only of
    padding would otherwise be all-False and SDPA returns NaN, which then leaks into gradients even
    though the loss ignores those positions.
    """
    k_len = past_len + q_len
    has_padding = attention_mask is not None and not bool(attention_mask.all())
    if not has_padding and documents is None and (past_len == 0 or not causal):
        # is_causal in SDPA aligns the triangle top-left, which is only right without a cache offset.
        return None, causal and q_len > 1
    query_pos = torch.arange(past_len, k_len, device=device).unsqueeze(-1)  # (T, 1)
    key_pos = torch.arange(k_len, device=device).unsqueeze(0)  # (1, K)
    allowed = key_pos <= query_pos if causal else torch.ones(q_len, k_len, dtype=torch.bool, device=device)
    allowed = allowed.unsqueeze(0).unsqueeze(0)  # (1, 1, T, K)
    if has_padding:
        keys = attention_mask[:, -k_len:].bool()[:, None, None, :]  # (B, 1, 1, K)
        allowed = allowed & keys
    if documents is not None:  # past_len is 0 here (document_ids refuses a cache offset)
        allowed = allowed & (documents[:, :, None] == documents[:, None, :]).unsqueeze(1)
    allowed = allowed | (key_pos == query_pos).unsqueeze(0).unsqueeze(0)
    return allowed, False


def loss_share(labels: torch.Tensor, num_items_in_batch, shifted: bool) -> torch.Tensor | float:
    """This batch's share of the labelled items of one optimizer step, ``n_batch / num_items_in_batch``.

    transformers' loss-kwargs convention: with gradient accumulation (or several processes) the Trainer
    counts the labelled items of the whole step (``num_items_in_batch``, over ``labels[..., 1:]`` for a
    next-token loss) and does *not* divide the loss by the accumulation steps itself. A head then returns
    ``share * (mean task loss + weighted auxiliary terms)``: the task part becomes the step's exact token
    mean (``sum / num_items_in_batch``) and each auxiliary term its item-weighted mean over the step.
    Without ``num_items_in_batch`` (a plain call) the share is 1.
    """
    if num_items_in_batch is None:
        return 1.0
    counted = labels[..., 1:] if shifted else labels
    return counted.ne(IGNORE_INDEX).sum() / num_items_in_batch


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy: logits at t predict labels at t + 1; -100 is ignored.

    The labels are shifted (and padded with -100) rather than the logits sliced: slicing would copy
    the whole (B, T, V) logits tensor forward and allocate a full-size gradient for it backward.
    """
    shift_labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), shift_labels.reshape(-1), ignore_index=IGNORE_INDEX
    )


def masked_lm_loss(predict, hidden_states: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the labelled (masked) positions only; -100 is ignored.

    ``predict`` maps selected hidden states (n, H) to logits (n, V). Only the labelled positions are
    projected, so the training step never materialises (B, T, V) logits. A batch with nothing labelled
    gives a zero loss that still has a graph (never NaN).
    """
    selected = labels != IGNORE_INDEX
    if not bool(selected.any()):
        return hidden_states.sum() * 0.0
    return F.cross_entropy(predict(hidden_states[selected]).float(), labels[selected])


class DecollapsePreTrainedModel(PreTrainedModel):
    """Base of every decollapse model: explicit initialisation of the standard modules and the
    collapse-report contract.

    Each architecture's base class overrides ``collapse_report`` to expose its collapse-prone units
    (blocks / neurons / experts / concepts / heads) through the shared diagnostics library.
    """

    base_model_prefix = "model"
    # The few collapse numbers a comparison table shows: label -> (metric-name pattern, reduction
    # over the matching metrics: "min", "max" or "mean"). Read by `decollapse ablate`.
    collapse_headline: dict[str, tuple[str, str]] = {}
    # What a sentence embedding averages: "tokens" (masked mean of last_hidden_state), "concepts"
    # (last_hidden_state holds concept vectors, not tokens) or None (no pooling path). Read by the
    # evaluation suites and the sentence-transformers wrapper.
    sentence_pooling: str | None = "tokens"
    # The nn.Linear names LoRA adapts when evaluation fine-tunes with `--peft lora`.
    lora_target_modules: list[str] | None = None
    supports_gradient_checkpointing = False
    _supports_sdpa = True
    # Whether forward() takes the Trainer's `num_items_in_batch` and normalises its loss by it (see
    # `loss_share`). transformers guesses True for any forward with **kwargs; a head that returns a
    # per-batch mean it cannot re-normalise must say False, or gradient accumulation scales its loss
    # by the number of accumulation steps.
    accepts_loss_kwargs = False
    # Writes the flat remote-code files and config.json's auto_map into a saved folder; set by the
    # decollapse registry (remote_code.write_remote_code) when it registers the architectures. Inside the package a
    # modeling file imports its configuration from another folder, which transformers' own code copy
    # (after `register_for_auto_class`) cannot follow. In an exported bundle this stays None: the
    # files there are flat already and transformers' copy works as is.
    _write_remote_code = None

    def save_pretrained(self, save_directory, *args, **kwargs):
        cls = type(self)
        writer = cls._write_remote_code
        if cls._auto_class is None or writer is None:
            return super().save_pretrained(save_directory, *args, **kwargs)
        # register_for_auto_class sets a class attribute, which transformers reads to decide on its copy.
        auto_class, cls._auto_class = cls._auto_class, None
        try:
            result = super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            cls._auto_class = auto_class
        writer(self, save_directory)
        return result

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)

    @torch.no_grad()
    def collapse_report(self, batch: dict[str, torch.Tensor]) -> CollapseReport:
        """Collapse diagnostics of this model's units on ``batch`` (``input_ids``, optional
        ``attention_mask`` and ground-truth label columns such as ``domain`` or ``sense``)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement collapse_report")

    def after_optimizer_step(self) -> dict[str, float]:
        """Moves the state that gradients do not train (e.g. SoME's key stores), once per optimizer
        step; returns scalars to log. Called by ``decollapse.trainers.StepUpdateCallback``, which
        ``DecollapseTrainer`` installs. Nothing to do by default."""
        return {}

    @property
    def aux_loss_weights(self) -> dict[str, float]:
        return self.config.aux_loss_weights

    @property
    def aux_label_columns(self) -> tuple[str, ...]:
        """Ground-truth label columns a training batch must carry (passed to ``forward`` by name), for
        architectures whose auxiliary terms are supervised (the configuration's ``aux_label_columns``).
        ``decollapse train`` keeps them in the training data and refuses a dataset that lacks one."""
        return tuple(getattr(self.config, "aux_label_columns", ()))


class TokenStemMixin:
    """The input stem of the token models (dense, dawn, moh): ``self.embed_tokens``, learned absolute
    ``self.embed_positions`` and ``self.dropout``, which the subclass builds in its ``__init__``."""

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def _embed(
        self,
        input_ids: torch.LongTensor | None,
        inputs_embeds: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        position_ids: torch.LongTensor | None,
        past_len: int,
        causal: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
        """``(hidden_states, attn_mask, is_causal)``: token plus position embeddings after dropout, and
        the SDPA mask pair of :func:`attention_bias`. Positions count real tokens only (padding
        invariance) and continue after ``past_len`` cached tokens; given ``position_ids`` that restart
        mark packed documents, which attend only within themselves."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        seq_len = inputs_embeds.shape[1]
        if past_len + seq_len > self.config.max_position_embeddings:
            raise ValueError(
                f"Sequence of {past_len + seq_len} tokens exceeds max_position_embeddings="
                f"{self.config.max_position_embeddings}."
            )
        documents = document_ids(position_ids, past_len)
        if documents is not None and not self.config.supports_packed_documents:
            raise ValueError(
                f"position_ids restart inside the sequence (packed documents), which {type(self).__name__} "
                "cannot keep apart with this configuration; pass one document per row."
            )
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask, seq_len, past_len, inputs_embeds.device)
        attn_mask, is_causal = attention_bias(
            attention_mask, seq_len, past_len, causal, inputs_embeds.device, documents
        )
        return self.dropout(inputs_embeds + self.embed_positions(position_ids)), attn_mask, is_causal


class CausalLMHeadMixin:
    """Tied next-token head on ``self.model`` (a token model that takes a KV cache and returns
    ``last_hidden_state``, ``cache`` and ``aux_losses``), as Llama's ``ForCausalLM``.

    A subclass (listing ``GenerationMixin`` among its bases) builds ``self.model`` and
    ``self.lm_head = nn.Linear(hidden, vocab, bias=False)``, then calls ``post_init()``.
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    accepts_loss_kwargs = True

    @deprecate_kwarg("past_key_values", version="6.0.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int = 0,
        num_items_in_batch: torch.Tensor | int | None = None,
        **kwargs,
    ) -> DecollapseCausalLMOutput:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        if logits_to_keep:
            hidden_states = hidden_states[:, -logits_to_keep:, :]
        logits = self.lm_head(hidden_states)  # (B, T, V)
        loss = task_loss = None
        if labels is not None:
            task_loss = causal_lm_loss(logits, labels)
            loss = loss_share(labels, num_items_in_batch, shifted=True) * combine_losses(
                task_loss, outputs.aux_losses, self.config.aux_loss_weights
            )
        return DecollapseCausalLMOutput(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            task_loss=task_loss,
            aux_losses=outputs.aux_losses,
        )


class MaskedLMHeadMixin:
    """BERT-style masked-LM head on ``self.model`` (a token model returning ``last_hidden_state`` and
    ``aux_losses``): ``logits = lm_head(LayerNorm(GELU(transform(h))))``, ``lm_head`` tied to the
    input embeddings.

    A subclass checks its config, builds ``self.model``, calls ``_init_masked_lm_head(config)`` and
    then ``post_init()``. With labels, only the masked positions are projected (``masked_lm_loss``)
    and training returns no logits.
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def _init_masked_lm_head(self, config) -> None:
        self.transform = nn.Linear(config.hidden_size, config.hidden_size)
        self.transform_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def _predict(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.transform_norm(F.gelu(self.transform(hidden_states))))

    accepts_loss_kwargs = True

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        num_items_in_batch: torch.Tensor | int | None = None,
        **kwargs,
    ) -> DecollapseMaskedLMOutput:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            output_hidden_states=output_hidden_states,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        loss = task_loss = None
        if labels is not None:
            task_loss = masked_lm_loss(self._predict, hidden_states, labels)
            loss = loss_share(labels, num_items_in_batch, shifted=False) * combine_losses(
                task_loss, outputs.aux_losses, self.config.aux_loss_weights
            )
        logits = None if (self.training and labels is not None) else self._predict(hidden_states)
        return DecollapseMaskedLMOutput(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            task_loss=task_loss,
            aux_losses=outputs.aux_losses,
        )
