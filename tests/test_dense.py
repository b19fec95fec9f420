"""The dense control model: what a user of a plain transformer relies on."""

import pytest
import torch

from decollapse.configuration.dense import DenseConfig
from decollapse.modeling.dense import DenseForCausalLM, DenseForMaskedLM

from .conftest import tiny_model


def test_generate_from_left_padded_prompts_matches_unpadded():
    model = tiny_model("dense").eval()
    short = torch.randint(3, 61, (1, 4))
    long = torch.randint(3, 61, (1, 7))
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), long])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [1] * 7])
    out = model.generate(batch, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    alone = model.generate(short, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(out[0, 3:], alone[0])


def test_embeddings_are_tied_and_stay_tied_after_loading(tmp_path):
    model = tiny_model("dense")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(tmp_path)
    loaded = DenseForCausalLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_head_contributions_add_up_to_the_attention_output():
    model = tiny_model("dense").eval()
    attn = model.model.layers[0].attn
    x = torch.randn(2, 5, 32)
    out, heads = attn(x, None, True)
    total = attn.head_contributions(heads).sum(dim=2) + attn.o_proj.bias
    torch.testing.assert_close(total, out, rtol=1e-5, atol=1e-5)


def test_head_similarity_term_reaches_attention_weights():
    model = tiny_model("dense", head_diversity_weight=1.0)
    ids = torch.randint(3, 61, (2, 10))
    out = model(input_ids=ids)
    out.aux_losses["head_similarity"].backward()
    assert model.model.layers[0].attn.qkv_proj.weight.grad.abs().sum() > 0
    assert model.model.layers[0].attn.o_proj.weight.grad.abs().sum() > 0


def test_masked_lm_loss_counts_only_masked_positions():
    model = tiny_model("dense", objective="masked_lm").eval()
    ids = torch.randint(3, 61, (2, 10))
    labels = torch.full_like(ids, -100)
    labels[0, 3] = ids[0, 3]
    labels[1, 7] = ids[1, 7]
    out = model(input_ids=ids, labels=labels)
    logits = model(input_ids=ids).logits
    expected = torch.nn.functional.cross_entropy(logits[labels != -100], labels[labels != -100])
    torch.testing.assert_close(out.task_loss, expected)
    nothing_masked = model(input_ids=ids, labels=torch.full_like(ids, -100))
    assert nothing_masked.task_loss.item() == 0.0


def test_heads_refuse_the_other_objective():
    with pytest.raises(ValueError, match="objective"):
        DenseForCausalLM(DenseConfig(objective="masked_lm"))
    with pytest.raises(ValueError, match="objective"):
        DenseForMaskedLM(DenseConfig(objective="causal_lm"))


def test_too_long_input_is_refused_clearly():
    model = tiny_model("dense")
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(input_ids=torch.zeros(1, 33, dtype=torch.long))
