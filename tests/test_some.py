"""SoME: what its users rely on — the experts stay frozen and are computed exactly, only the router
learns by gradient, Knowledge Gravity does what each of its rules says once per optimizer step,
padding never counts, the key store survives save / load and resume, and two processes keep the same
key store as one process at the same global batch."""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import GenerationConfig, Trainer, TrainingArguments

from decollapse.cli import main
from decollapse.configuration.some import SomeConfig
from decollapse.modeling import some as some_module
from decollapse.modeling.some import SomeForCausalLM, SomeRouter
from decollapse.trainers import DecollapseTrainer, DecollapseTrainingArguments, StepUpdateCallback

from .conftest import tiny_config, tiny_model

REPO = Path(__file__).resolve().parents[1]


def _ids(seed=0, batch=4, length=12, vocab=61):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=g)


def _router(**overrides) -> SomeRouter:
    """A bare Knowledge Gravity router (forces off unless overridden, no balancer) over 4 experts with unit
    keys along the axes of a 4-d key space."""
    config = SomeConfig(
        **{"hidden_size": 4, "num_attention_heads": 1, "num_experts": 4, "num_experts_per_tok": 1, "key_size": 4,
           "key_update": "gravity", "balance": "none", "use_alpha": False, "use_beta": False, "use_delta": False,
           **overrides}
    )
    router = SomeRouter(config)
    router.reset_state()
    with torch.no_grad():
        router.key_store.copy_(torch.eye(4))
    return router


def _feed(router, queries, indices, gates=None, mask=None):
    """Accumulates statistics as a training forward would, with chosen queries and selections."""
    queries = F.normalize(torch.as_tensor(queries, dtype=torch.float32), dim=-1)
    indices = torch.as_tensor(indices)
    gates = torch.full(indices.shape, 1.0 / indices.shape[1]) if gates is None else torch.as_tensor(gates)
    scores = queries @ router.keys().T
    router._accumulate(queries, scores, indices, gates, mask)


# -- configuration -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"num_experts": 4, "num_experts_per_tok": 5},
         "num_experts_per_tok=5 is not allowed: expected a positive integer <= num_experts=4"),
        ({"init_sparsity": 1.0}, "init_sparsity=1.0 is not allowed: expected a number in [0.0, 1.0)"),
        ({"init_sparsity": -0.1}, "init_sparsity=-0.1"),
        ({"alpha_rule": "median"}, "alpha_rule='median' is not allowed: expected one of 'mean', 'damped_sum'"),
        ({"forget_rule": "prune"}, "forget_rule='prune' is not allowed: expected one of 'restart', 'shrink'"),
        ({"key_update": "sgd"}, "expected one of 'gravity', 'gradient', 'frozen'"),
        ({"balance": "aux_loss"}, "expected one of 'none', 'bias_sign'"),
        ({"query_network": "rnn"}, "query_network='rnn'"),
        ({"init_method": "xavier"}, "init_method='xavier'"),
        ({"router_temperature": 0.0}, "router_temperature=0.0"),
        ({"use_beta": "no"}, "use_beta='no' is not allowed: expected true or false"),
        ({"key_search": "annoy"}, "key_search='annoy' is not allowed: expected one of 'exact', 'faiss_flat'"),
        ({"key_search": "faiss_hnsw", "num_experts_per_tok": 1},
         "key_search='faiss_hnsw' is not allowed: expected 'exact' with num_experts_per_tok=1"),
        ({"key_search_nprobe": 0}, "key_search_nprobe=0 is not allowed: expected a positive integer"),
    ],
)
def test_config_names_the_bad_field_and_what_is_allowed(overrides, message):
    with pytest.raises(ValueError) as err:
        SomeConfig(**overrides)
    assert message in str(err.value)


@pytest.mark.parametrize(
    "settings, message",
    [
        (["num_experts=4", "num_experts_per_tok=8"],
         "num_experts_per_tok=8 is not allowed: expected a positive integer <= num_experts=4"),
        (["init_method=sparse", "init_sparsity=1.5"],
         "init_sparsity=1.5 is not allowed: expected a number in [0.0, 1.0)"),
        (["forget_rule=forget"], "forget_rule='forget' is not allowed: expected one of 'restart', 'shrink'"),
    ],
)
def test_cli_refuses_bad_some_settings_in_one_line_writing_nothing(tmp_path, capsys, settings, message):
    out = tmp_path / "run"
    assert main(["train", "some", "--set", *settings, "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_routing_knobs_are_not_generation_settings(tmp_path):
    config = SomeConfig(num_experts_per_tok=3, router_temperature=0.7)
    config.save_pretrained(tmp_path)
    generation = GenerationConfig.from_model_config(SomeConfig.from_pretrained(tmp_path))
    assert generation.top_k != 3 and generation.temperature != 0.7


def test_default_model_is_more_than_95_percent_frozen():
    config = SomeConfig(vocab_size=2273)  # the embedded corpus's vocabulary
    with torch.device("meta"):
        model = SomeForCausalLM(config)
    total = sum(p.numel() for p in model.parameters())
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert frozen / total > 0.95
    # a token runs 2 of the 128 experts of each layer: the trainable part plus 2/128 of the library
    assert model.num_active_parameters() == total - frozen + frozen * 2 // config.num_experts


# -- experts and routing ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["grouped_mm", "padded_bmm"])
def test_experts_compute_exactly_the_selected_ffns_and_their_input_gradient(path, monkeypatch):
    model = tiny_model("some")
    experts = model.model.layers[0].moe.experts
    # Force the path: no padding allowed (grouped matmul), or any padding allowed (one bmm).
    monkeypatch.setattr(some_module, "_MAX_PADDING_FACTOR", 0 if path == "grouped_mm" else float("inf"))
    x = torch.randn(10, 32, requires_grad=True)
    indices = torch.randint(0, experts.num_experts, (10, 2))
    counts = torch.bincount(indices.reshape(-1), minlength=experts.num_experts)
    assert experts.uses_padding(counts, x.dtype, x.device) == (path == "padded_bmm")
    got = experts(x, indices)
    upstream = torch.randn_like(got)
    (grad_got,) = torch.autograd.grad((got * upstream).sum(), x)
    want = torch.stack([
        torch.stack([
            F.gelu(x[t] @ experts.up_proj[i] + experts.up_bias[i], approximate="tanh") @ experts.down_proj[i]
            + experts.down_bias[i]
            for i in indices[t].tolist()
        ])
        for t in range(10)
    ])
    (grad_want,) = torch.autograd.grad((want * upstream).sum(), x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_got, grad_want, rtol=1e-5, atol=1e-5)


def test_a_collapsed_router_does_not_pad_the_expert_matmul_to_its_busiest_expert():
    experts = tiny_model("some").model.layers[0].moe.experts
    n = experts.num_experts
    collapsed = torch.zeros(n).index_fill_(0, torch.tensor([0]), 4 * n)  # padding would be n x the real rows
    balanced = torch.full((n,), 4)
    assert not experts.uses_padding(collapsed, torch.float32, torch.device("cpu"))
    assert experts.uses_padding(balanced, torch.float32, torch.device("cpu"))


@pytest.mark.parametrize("path", ["grouped_mm", "padded_bmm"])
def test_mixed_precision_training_step_runs_the_experts_in_one_dtype(path, monkeypatch):
    # Under bf16 autocast the expert inputs arrive in float32 (after the LayerNorm) and the experts must
    # run forward and backward in the one dtype they were given, whichever path computes them.
    monkeypatch.setattr(some_module, "_MAX_PADDING_FACTOR", 0 if path == "grouped_mm" else float("inf"))
    model = tiny_model("some")
    model.train()
    ids = _ids()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.model.layers[0].moe.router.query.parameters())


@pytest.mark.parametrize("k", [1, 2])
def test_only_the_router_and_backbone_learn_the_experts_and_gravity_keys_get_no_gradient(k):
    model = tiny_model("some", num_experts_per_tok=k)
    model.train()
    ids = _ids()
    model(input_ids=ids, labels=ids).loss.backward()
    for layer in model.model.layers:
        router = layer.moe.router
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in router.query.parameters()), (
            f"the query network got no language-model gradient with k={k}"
        )
        assert all(not p.requires_grad and p.grad is None for p in layer.moe.experts.parameters())
        assert "key_store" in dict(router.named_buffers())


def test_gradient_keys_are_parameters_that_learn():
    model = tiny_model("some", key_update="gradient")
    model.train()
    ids = _ids()
    model(input_ids=ids, labels=ids).loss.backward()
    key_store = model.model.layers[0].moe.router.key_store
    assert isinstance(key_store, torch.nn.Parameter) and key_store.grad.abs().sum() > 0


def test_gates_follow_the_temperature_of_the_mode():
    model = tiny_model("some", router_temperature=0.5, router_eval_temperature=2.0)
    router = model.model.layers[0].moe.router
    x = torch.randn(6, 32)
    for training, temperature in ((True, 0.5), (False, 2.0)):
        router.train(training)
        indices, gates, queries, scores = router(x)
        torch.testing.assert_close(gates, torch.softmax(scores.gather(-1, indices) / temperature, -1))
        assert torch.equal(indices, scores.topk(2, dim=-1).indices)


def test_bias_sign_balance_changes_selection_not_gates():
    model = tiny_model("some", balance="bias_sign")
    router = model.model.layers[0].moe.router
    router.eval()
    x = torch.randn(6, 32)
    router.balance_bias.copy_(torch.tensor([10.0] + [0.0] * 7))
    indices, gates, _, scores = router(x)
    assert (indices == 0).any(-1).all(), "a large bias must put its expert in every selection"
    torch.testing.assert_close(gates, torch.softmax(scores.gather(-1, indices) / 0.5, -1))


# -- Knowledge Gravity -----------------------------------------------------------------------------


def test_alpha_mean_moves_a_key_toward_the_gate_weighted_mean_query():
    router = _router(use_alpha=True, alpha=0.5)
    _feed(router, [[1.0, 1.0, 0, 0], [1.0, -1.0, 0, 0]], [[0], [0]], gates=[[0.75], [0.25]])
    router.apply_update()
    q = F.normalize(torch.tensor([[1.0, 1.0, 0, 0], [1.0, -1.0, 0, 0]]), dim=-1)
    mean = (0.75 * q[0] + 0.25 * q[1]) / 1.0
    want = F.normalize(torch.eye(4)[0] + 0.5 * (mean - torch.eye(4)[0]), dim=0)
    torch.testing.assert_close(router.key_store[0], want)
    torch.testing.assert_close(router.key_store[1:], torch.eye(4)[1:], msg="unselected keys must not move")


def test_alpha_damped_sum_is_the_public_online_k_means_step():
    router = _router(use_alpha=True, alpha=0.1, alpha_rule="damped_sum")
    usage_before = router.usage[0].item()
    queries = [[0.0, 1.0, 0, 0], [0.0, 0.0, 1.0, 0]]
    _feed(router, queries, [[0], [0]])
    router.apply_update()
    q = torch.tensor(queries)
    k = torch.eye(4)[0]
    step = 0.1 / (1 + usage_before * 2) * (q - k).sum(0)
    torch.testing.assert_close(router.key_store[0], F.normalize(k + step, dim=0))


def test_beta_pulls_co_selected_keys_together_and_does_nothing_at_k1():
    router = _router(use_beta=True, beta=0.2, num_experts_per_tok=2)
    _feed(router, [[1.0, 1.0, 0, 0]], [[0, 1]])
    router.apply_update()
    eye = torch.eye(4)
    torch.testing.assert_close(router.key_store[0], F.normalize(eye[0] + 0.2 * (eye[1] - eye[0]), dim=0))
    torch.testing.assert_close(router.key_store[1], F.normalize(eye[1] + 0.2 * (eye[0] - eye[1]), dim=0))
    single = _router(use_beta=True, beta=0.2)
    _feed(single, [[1.0, 1.0, 0, 0]], [[0]])
    single.apply_update()
    torch.testing.assert_close(single.key_store, eye)


def test_coselection_counts_every_pair_of_experts_a_token_selected_together():
    router = _router(use_beta=True, num_experts_per_tok=3)
    g = torch.Generator().manual_seed(0)
    indices = torch.stack([torch.randperm(4, generator=g)[:3] for _ in range(50)])
    _feed(router, torch.randn(50, 4, generator=g), indices)
    selected = torch.zeros(50, 4).scatter_(1, indices, 1.0)
    torch.testing.assert_close(router._pending.coselection, (selected.T @ selected).fill_diagonal_(0.0))


def test_restart_reseeds_a_forgotten_key_at_the_worst_served_query():
    router = _router(use_delta=True, forget_rule="restart", forgetting_threshold=0.5)
    router.usage.copy_(torch.tensor([0.25, 0.25, 0.25, 0.0]))  # expert 3 is dead
    worst = [0.6, 0.0, 0.0, -0.8]  # its best score (0.6) is the lowest of the batch
    _feed(router, [[1.0, 0, 0, 0], [0.0, 1.0, 0.1, 0], worst], [[0], [1], [0]])
    logs = router.apply_update()
    torch.testing.assert_close(router.key_store[3], F.normalize(torch.tensor(worst), dim=0))
    assert router.usage[3] == pytest.approx(0.25) and logs["forgotten"] == 1


def test_shrink_fades_a_forgotten_key():
    router = _router(use_delta=True, forget_rule="shrink", delta=0.25, forgetting_threshold=0.5)
    router.usage.copy_(torch.tensor([0.25, 0.25, 0.25, 0.0]))
    _feed(router, [[1.0, 0, 0, 0]], [[0]])
    router.apply_update()
    torch.testing.assert_close(router.key_store[3], 0.75 * torch.eye(4)[3])


def test_usage_is_an_ema_of_each_experts_share_of_tokens():
    router = _router(ema_decay=0.9)
    _feed(router, [[1.0, 0, 0, 0]] * 3 + [[0, 1.0, 0, 0]], [[0], [0], [0], [1]])
    router.apply_update()
    share = torch.tensor([0.75, 0.25, 0.0, 0.0])
    torch.testing.assert_close(router.usage, 0.9 * torch.full((4,), 0.25) + 0.1 * share)


@pytest.mark.parametrize("key_update", ["frozen", "gradient"])
def test_controls_never_move_keys_by_heuristics(key_update):
    router = _router(key_update=key_update, use_alpha=True, use_beta=True, use_delta=True)
    before = router.key_store.detach().clone()
    _feed(router, [[1.0, 1.0, 0, 0]], [[0]])
    router.apply_update()
    torch.testing.assert_close(router.key_store.detach(), before)


def test_bias_sign_moves_the_bias_against_the_load_error():
    router = _router(balance="bias_sign", balance_rate=0.01)
    _feed(router, [[1.0, 0, 0, 0]] * 3, [[0], [0], [1]])
    router.apply_update()
    # loads 2, 1, 0, 0 against a mean of 0.75: the two loaded experts go down, the idle two up
    torch.testing.assert_close(router.balance_bias, torch.tensor([-0.01, -0.01, 0.01, 0.01]))


@pytest.mark.parametrize("state", [{"key_update": "gravity", "balance": "none"}, {}], ids=["gravity", "defaults"])
def test_padding_never_counts_in_statistics_or_key_updates(state):
    torch.manual_seed(0)
    ids = _ids(batch=2, length=8)
    padded = torch.cat([torch.zeros(2, 4, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(2, 4, dtype=torch.long), torch.ones_like(ids)], dim=1)
    stores = []
    for batch in ({"input_ids": ids}, {"input_ids": padded, "attention_mask": mask}):
        model = tiny_model("some", **state)
        model.train()
        model(**batch)
        routers = [m for m in model.modules() if isinstance(m, SomeRouter)]
        assert routers[0]._pending.tokens.item() == ids.numel()
        model.after_optimizer_step()
        stores.append([(r.key_store.clone(), r.usage.clone(), r.balance_bias.clone()) for r in routers])
    for (keys_a, usage_a, bias_a), (keys_b, usage_b, bias_b) in zip(*stores):
        torch.testing.assert_close(keys_a, keys_b, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(usage_a, usage_b)
        torch.testing.assert_close(bias_a, bias_b)


def test_evaluation_and_generation_leave_the_key_store_alone():
    model = tiny_model("some")
    model.eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model(input_ids=_ids())
    model.generate(_ids(batch=1, length=4), max_new_tokens=3, do_sample=False)
    assert model.after_optimizer_step() == {}
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name]), name


# -- training: once per optimizer step, checkpoints, resume -----------------------------------------


def _dataset(n=16, length=12):
    return Dataset.from_dict({"input_ids": _ids(seed=1, batch=n, length=length).tolist()})


def _collate(features):
    ids = torch.tensor([f["input_ids"] for f in features])
    return {"input_ids": ids, "labels": ids.clone()}


def _args(tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2, seed=0,
        save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, logging_steps=1,
        train_sampling_strategy="sequential",
    )
    values.update(overrides)
    return values


def _key_stores(model):
    return {name: value.detach().clone() for name, value in model.state_dict().items() if ".router." in name
            and not name.endswith(("weight", "bias"))}


def test_keys_move_once_per_optimizer_step_whatever_the_accumulation(tmp_path):
    stores = []
    for batch, accumulation in ((4, 1), (2, 2)):
        model = tiny_model("some", key_update="gravity", balance="bias_sign")
        trainer = Trainer(
            model=model, args=TrainingArguments(**_args(tmp_path / f"{batch}", per_device_train_batch_size=batch,
                                                        gradient_accumulation_steps=accumulation)),
            train_dataset=_dataset(), data_collator=_collate, callbacks=[StepUpdateCallback()],
        )
        trainer.train()
        routers = [m for m in model.modules() if isinstance(m, SomeRouter)]
        assert all(int(r.updates) == 4 for r in routers)
        stores.append(_key_stores(model))
    for name in stores[0]:
        torch.testing.assert_close(stores[0][name].float(), stores[1][name].float(), atol=1e-4, rtol=1e-4, msg=name)


def test_decollapse_trainer_moves_keys_and_logs_gravity(tmp_path):
    model = tiny_model("some", key_update="gravity", balance="none")
    before = _key_stores(model)
    trainer = DecollapseTrainer(
        model=model, args=DecollapseTrainingArguments(**_args(tmp_path)), train_dataset=_dataset(),
        data_collator=_collate,
    )
    trainer.train()
    after = _key_stores(model)
    moved = [name for name in before if name.endswith("key_store") and not torch.equal(before[name], after[name])]
    assert moved, "no key store moved in training"
    logged = [entry for entry in trainer.state.log_history if "gravity/key_shift" in entry]
    assert len(logged) == 4 and all(entry["gravity/key_shift"] > 0 for entry in logged)


def test_defaults_keep_the_keys_and_balance_the_load_logging_no_gravity(tmp_path):
    model = tiny_model("some")
    assert (model.config.key_update, model.config.balance) == ("frozen", "bias_sign")
    before = _key_stores(model)
    trainer = DecollapseTrainer(
        model=model, args=DecollapseTrainingArguments(**_args(tmp_path)), train_dataset=_dataset(),
        data_collator=_collate,
    )
    trainer.train()
    after = _key_stores(model)
    for name in before:
        if name.endswith("key_store"):
            assert torch.equal(before[name], after[name]), name
        if name.endswith("balance_bias"):
            assert not torch.equal(before[name], after[name]), name
    logged = [entry for entry in trainer.state.log_history if "routing/load_max_violation" in entry]
    assert len(logged) == 4 and all(entry["routing/load_max_violation"] >= 0 for entry in logged)
    assert not any(key.startswith("gravity/") for entry in trainer.state.log_history for key in entry)


def test_every_buffer_survives_save_and_from_pretrained(tmp_path):
    model = tiny_model("some", balance="bias_sign")
    trainer = DecollapseTrainer(
        model=model, args=DecollapseTrainingArguments(**_args(tmp_path / "t")), train_dataset=_dataset(),
        data_collator=_collate,
    )
    trainer.train()
    model.save_pretrained(tmp_path / "saved")
    loaded = SomeForCausalLM.from_pretrained(tmp_path / "saved")
    buffers = dict(model.named_buffers())
    assert {"key_store", "usage", "balance_bias", "updates"} <= {name.rsplit(".", 1)[-1] for name in buffers}
    for name, value in loaded.named_buffers():
        assert torch.equal(value, buffers[name]), name
    assert int(dict(loaded.named_buffers())["model.layers.0.moe.router.updates"]) == 4
    for name, value in loaded.named_parameters():
        assert torch.equal(value, dict(model.named_parameters())[name]), name


def test_resume_from_checkpoint_continues_the_key_store(tmp_path):
    def trainer(folder, **overrides):
        torch.manual_seed(0)
        return DecollapseTrainer(
            model=tiny_model("some", key_update="gravity", balance="bias_sign"),
            args=DecollapseTrainingArguments(**_args(folder, **overrides)),
            train_dataset=_dataset(), data_collator=_collate,
        )

    straight = trainer(tmp_path / "straight", save_strategy="steps", save_steps=2)
    straight.train()
    # A fresh process would start from a fresh model: the key store must come from the checkpoint.
    resumed = trainer(tmp_path / "resumed", save_strategy="steps", save_steps=2)
    resumed.train(resume_from_checkpoint=str(tmp_path / "straight" / "checkpoint-2"))
    want, got = _key_stores(straight.model), _key_stores(resumed.model)
    assert int(got["model.layers.0.moe.router.updates"]) == 4
    for name in want:
        torch.testing.assert_close(got[name].float(), want[name].float(), atol=1e-5, rtol=1e-5, msg=name)


# -- data parallel -----------------------------------------------------------------------------------

DDP_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from datasets import Dataset
    import decollapse
    from decollapse.registry import ARCHITECTURES
    from decollapse.trainers import DecollapseTrainer, DecollapseTrainingArguments

    out, batch = sys.argv[1], int(sys.argv[2])
    arch = ARCHITECTURES["some"]
    torch.manual_seed(0)
    # Gravity keys and the sign-of-load bias: both states that move outside the optimizer.
    config = arch.config_class(hidden_size=32, num_hidden_layers=2, max_position_embeddings=32, vocab_size=61,
                               key_update="gravity", balance="bias_sign", **arch.tiny)
    model = arch.model_for_objective("causal_lm")(config)
    g = torch.Generator().manual_seed(1)
    data = Dataset.from_dict({"input_ids": torch.randint(3, 61, (16, 12), generator=g).tolist()})

    def collate(features):
        ids = torch.tensor([f["input_ids"] for f in features])
        return {"input_ids": ids, "labels": ids.clone()}

    args = DecollapseTrainingArguments(
        output_dir=out, max_steps=3, per_device_train_batch_size=batch, learning_rate=1e-2, seed=0,
        save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, train_sampling_strategy="sequential",
    )
    trainer = DecollapseTrainer(model=model, args=args, train_dataset=data, data_collator=collate)
    trainer.train()
    state = {k: v for k, v in model.state_dict().items() if ".router." in k and not k.endswith(("weight", "bias"))}
    torch.save(state, f"{out}/rank{args.process_index}.pt")
    if torch.distributed.is_initialized():  # as decollapse's CLI does: a group left to teardown can abort
        torch.distributed.destroy_process_group()
    """
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_processes_keep_identical_key_stores_equal_to_one_process_at_the_same_global_batch(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    runs = [
        [sys.executable, str(script), str(one), "4"],
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
         str(script), str(two), "2"],
    ]
    for command in runs:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    single = torch.load(one / "rank0.pt")
    rank0, rank1 = torch.load(two / "rank0.pt"), torch.load(two / "rank1.pt")
    assert single["model.layers.0.moe.router.updates"] == 3
    for name in single:
        assert torch.equal(rank0[name], rank1[name]), f"{name} differs between the two ranks"
        torch.testing.assert_close(rank0[name].float(), single[name].float(), atol=1e-5, rtol=1e-4, msg=name)


# -- what is measured ---------------------------------------------------------------------------------


def test_collapse_report_names_the_headline_metrics_and_keeps_the_key_map():
    model = tiny_model("some")
    ids = _ids()
    report = model.collapse_report(
        {"input_ids": ids, "domain": torch.randint(0, 3, ids.shape), "word_class": torch.randint(0, 5, ids.shape)}
    )
    for i in range(2):
        for name in ("usage_gini", "usage_gini_mass", "dead_share", "max_violation", "normalized_entropy",
                     "nmi_domain", "nmi_word_class", "query_silhouette", "effective_rank_entropy", "mean_abs_cosine"):
            assert f"layer{i}.experts.{name}" in report.metrics, name
        assert report.points[f"layer{i}.experts.key_store"].shape == (8, 32)
        labels = report.point_labels[f"layer{i}.experts.key_store"]
        assert labels.shape == (8,) and labels.min() >= -1 and labels.max() < 3


def test_training_usage_gini_reads_the_load_the_router_was_trained_under():
    model = tiny_model("some")
    router = model.model.layers[0].moe.router
    router.usage.copy_(torch.tensor([2.0, 0, 0, 0, 0, 0, 0, 0]))  # every selection went to expert 0 (Σ = k)
    ids = _ids()
    report = model.collapse_report({"input_ids": ids})
    assert report.metrics["layer0.experts.training_usage_gini"] == pytest.approx(7 / 8)
    assert report.metrics["layer1.experts.training_usage_gini"] == pytest.approx(0.0)  # a new layer: uniform


@pytest.mark.slow
def test_train_writes_frozen_share_headline_names_and_the_key_map(tmp_path):
    out = tmp_path / "run"
    argv = ["train", "some", "--max-steps", "6", "--output-dir", str(out), "--no-progress", "--set",
            "corpus.num_train=64", "corpus.num_validation=16", "corpus.num_test=16", "corpus.seq_len=32",
            "eval_steps=6", "num_experts=16", "expert_intermediate_size=32"]
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    share = metrics["metrics"]["frozen_parameter_share"]
    assert 0 < share < 1 and metrics["trainable_parameters"] == round(metrics["num_parameters"] * (1 - share))
    names = json.loads((out / "diagnostics.json").read_text())["metrics"]
    for i in range(2):
        for name in ("usage_gini", "usage_gini_mass", "dead_share", "max_violation"):
            assert f"layer{i}.experts.{name}" in names
    assert (out / "plots" / "layer0_experts_key_store.png").is_file()
    assert (out / "plots" / "layer0_experts_usage_share.png").is_file()


# -- key search by an index (inference only) --------------------------------------------------------


def _routings(model, input_ids):
    """Each layer's (indices, gates) of one forward."""
    found = {}
    hooks = [layer.moe.register_forward_hook(lambda m, a, out, i=i: found.__setitem__(i, out[1]))
             for i, layer in enumerate(model.base_model.layers)]
    try:
        logits = model(input_ids=input_ids).logits
    finally:
        for hook in hooks:
            hook.remove()
    return logits, [(found[i].indices, found[i].gates) for i in sorted(found)]


def _biased_tiny_model(**overrides):
    model = tiny_model("some", num_experts=48, **overrides)
    with torch.no_grad():  # a bias large enough to change which keys win, as a balanced router's does
        for layer in model.base_model.layers:
            layer.moe.router.balance_bias.normal_(std=0.3, generator=torch.Generator().manual_seed(1))
    return model.eval()


@pytest.mark.parametrize("backend", ["faiss_flat", "faiss_ivf", "faiss_hnsw"])
def test_an_index_selects_the_experts_the_exact_search_selects_bias_included(backend):
    pytest.importorskip("faiss")
    model = _biased_tiny_model()
    ids = _ids(batch=3, length=16)
    exact_logits, exact = _routings(model, ids)
    model.config.key_search = backend
    # 48 keys: the inverted lists number min(4√N, N/39) = 1 and HNSW's efSearch (64) exceeds N, so at
    # this size every backend is exhaustive and must agree exactly; benchmarks/some_search.py measures
    # the recall where they are not.
    logits, indexed = _routings(model, ids)
    for (i_exact, g_exact), (i_index, g_index) in zip(exact, indexed):
        assert torch.equal(i_exact.sort(-1).values, i_index.sort(-1).values)
    torch.testing.assert_close(logits, exact_logits, rtol=1e-5, atol=1e-5)
    assert all(layer.moe.router._search_index is not None for layer in model.base_model.layers)


def test_the_index_is_rebuilt_when_keys_or_bias_move_and_only_then():
    pytest.importorskip("faiss")
    model = _biased_tiny_model(key_search="faiss_flat")
    router = model.base_model.layers[0].moe.router
    ids = _ids(batch=2, length=16)
    model(input_ids=ids)
    built = router._search_index
    model(input_ids=ids)
    assert router._search_index is built  # nothing moved: the same index serves
    for move in (lambda: router.key_store.copy_(torch.roll(router.key_store, 1, 0)),
                 lambda: router.balance_bias.add_(torch.linspace(-1, 1, router.balance_bias.numel()))):
        with torch.no_grad():
            move()
        _, indexed = _routings(model, ids)
        assert router._search_index is not built
        built = router._search_index
        model.config.key_search = "exact"
        _, exact = _routings(model, ids)
        model.config.key_search = "faiss_flat"
        assert torch.equal(indexed[0][0].sort(-1).values, exact[0][0].sort(-1).values)


def test_training_searches_exactly_whatever_key_search_says():
    model = _biased_tiny_model(key_search="faiss_hnsw").train()
    model(input_ids=_ids(), labels=_ids())
    router = model.base_model.layers[0].moe.router
    assert router._search_index is None and router._pending is not None  # statistics from the exact selection


def test_a_missing_faiss_is_one_line_naming_the_extra(tmp_path, capsys, monkeypatch):
    import importlib
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "faiss" else real(name, *a))
    out = tmp_path / "run"
    assert main(["train", "some", "--set", "key_search=faiss_ivf", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "key_search=faiss_ivf: needs faiss" in err and "decollapse[ann]" in err, err
    assert list(tmp_path.iterdir()) == []

    import_module = importlib.import_module

    def no_faiss(name, *args):
        if name == "faiss":
            raise ImportError("No module named 'faiss'")
        return import_module(name, *args)

    monkeypatch.setattr(importlib, "import_module", no_faiss)
    model = _biased_tiny_model(key_search="faiss_hnsw")
    with pytest.raises(ImportError, match=r"pip install 'decollapse\[ann\]'"):
        model(input_ids=_ids())


def test_a_trained_checkpoint_served_through_an_index_scores_as_the_exact_search(tmp_path):
    pytest.importorskip("faiss")
    from decollapse.data import build_synthetic_corpus
    from decollapse.runner import TrainJob, evaluate_checkpoint, plan

    out = tmp_path / "run"
    settings = ["corpus.num_train=64", "corpus.num_validation=16", "corpus.num_test=16", "corpus.seq_len=32",
                "eval_steps=4", "num_experts=48", "expert_intermediate_size=16"]
    assert main(["train", "some", "--max-steps", "4", "--output-dir", str(out), "--no-progress", "--set", *settings]) == 0
    job = TrainJob(arch="some", output_dir=tmp_path / "unused", settings=dict(s.split("=") for s in settings))
    parts = plan(job)
    corpus = build_synthetic_corpus(parts["corpus_config"])
    scores = {
        search: evaluate_checkpoint(parts, out, corpus.dataset, corpus.tokenizer, corpus.summary(),
                                    show_progress=False, inference={"key_search": search})
        for search in ("exact", "faiss_flat")
    }
    assert scores["exact"]["validation_loss"] == pytest.approx(scores["faiss_flat"]["validation_loss"], rel=1e-6)
    assert scores["exact"]["test_loss"] == pytest.approx(scores["faiss_flat"]["test_loss"], rel=1e-6)


def test_the_search_benchmark_runs_and_states_a_crossover(capsys):
    pytest.importorskip("faiss")
    import importlib.util

    spec = importlib.util.spec_from_file_location("some_search", REPO / "benchmarks" / "some_search.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--sizes", "64,256", "--rounds", "1", "--repeats", "1", "--warmup", "1", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "| 256 |" in out and "crossover:" in out
    assert bench.main(["--backends", "faiss_hnsw"]) == 2
