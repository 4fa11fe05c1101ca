"""Stage-1 heads and loss (models/heads.py, objectives/reconstruction.py): the MAE decoder starts as LLM
layer L//2, predictions pair with the data pipeline's targets, the MLM term equals CE on full logits at
the masked positions, and the joint loss trains every part of the model."""

import os

import pytest
import torch
import torch.nn.functional as F
from helpers import packed_real_row, tiny_config

from megatron_moca.errors import UserError
from megatron_moca.models.heads import MAE_INIT_STD, initialize_mae_decoder
from megatron_moca.models.vlm import MocaVLM
from megatron_moca.objectives.masking import IGNORE_INDEX
from megatron_moca.objectives.reconstruction import (ReconstructionConfig, mae_loss_sum, mlm_loss_sum,
                                                     reconstruction_loss)


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    return MocaVLM(tiny_config(), mae_decoder=True, **kw)


@pytest.fixture(scope="module")
def packed_inputs():
    """One packed row of real documents (two with an image, one text-only), as the loader gives it."""
    row = packed_real_row(max_length=700, pack_length=1600)
    return dict(row.model_inputs(), clean_pixels=row.pixel_frames)


def _forward(model, inputs):
    return model(inputs["input_ids"], position_ids=inputs["position_ids"], document_ids=inputs["document_ids"],
                 pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"])


def test_mae_decoder_starts_as_llm_layer_half_depth(megatron_runtime):
    model = _model()
    decoder = model.mae_decoder
    width = model.cfg.vision.merge_unit * model.cfg.vision.patch_dim
    assert decoder.predict.out_features == width == 4 * 1176
    assert abs(float(decoder.predict.weight.detach().std()) - MAE_INIT_STD) < 0.1 * MAE_INIT_STD
    assert bool((decoder.predict.bias == 0).all())
    source = model.language.decoder.layers[model.cfg.language.num_layers // 2]
    assert not torch.equal(decoder.layer.mlp.linear_fc1.weight, source.mlp.linear_fc1.weight)

    assert initialize_mae_decoder(model) == model.cfg.language.num_layers // 2
    theirs = source.state_dict()
    ours = decoder.layer.state_dict()
    assert ours.keys() == theirs.keys()
    for name, value in ours.items():
        assert torch.equal(value, theirs[name]) if torch.is_tensor(value) else value == theirs[name], name
    # the same function, not just the same numbers: one input through both layers
    x = torch.randn(12, 1, model.cfg.language.hidden_size)
    ids = torch.randint(0, 1000, (1, 12))
    mask, rotary, _ = model.attention_context(ids)
    with torch.no_grad():
        ours, _ = decoder.layer(hidden_states=x, attention_mask=mask, rotary_pos_emb=rotary)
        ref, _ = source(hidden_states=x, attention_mask=mask, rotary_pos_emb=rotary)
    assert torch.equal(ours, ref)


def test_mlm_term_is_cross_entropy_of_full_logits_at_masked_positions(megatron_runtime):
    model = _model(1).eval()
    ids = torch.randint(0, 1000, (2, 20))
    labels = torch.full((2, 20), IGNORE_INDEX)
    labels[0, [1, 5, 7]] = torch.tensor([11, 12, 13])
    labels[1, [0, 19]] = torch.tensor([21, 22])
    hidden = model(ids).detach().requires_grad_()
    total, count = mlm_loss_sum(model, hidden, labels)
    full = model.logits(hidden).transpose(0, 1)  # [b, s, v], every position
    masked = labels != IGNORE_INDEX
    ref = F.cross_entropy(full[masked].float(), labels[masked], reduction="sum")
    assert count == 5
    torch.testing.assert_close(total, ref, rtol=1e-5, atol=1e-5)
    total.backward()
    unmasked_grad = hidden.grad.transpose(0, 1)[~masked]
    assert bool((unmasked_grad == 0).all()) and bool(hidden.grad.ne(0).any())

    none, zero = mlm_loss_sum(model, hidden, torch.full((2, 20), IGNORE_INDEX))
    assert zero == 0 and float(none.detach()) == 0.0


def test_mae_predictions_pair_with_the_loaders_targets(megatron_runtime, packed_inputs):
    from megatron_moca.data.pixels import frames_to_pixels

    inputs = packed_inputs
    model = _model(2).eval()
    initialize_mae_decoder(model)
    select = inputs["mae_token_mask"]
    n = int(select.sum())
    assert n > 0 and inputs["mae_targets"].shape == (n, 4 * 1176)
    with torch.no_grad():
        hidden = _forward(model, inputs)
        predictions = model.mae_predictions(hidden, select, inputs["input_ids"], inputs["position_ids"],
                                            inputs["document_ids"], inputs["image_grid_thw"])
        mask, rotary, packed = model.attention_context(inputs["input_ids"], inputs["position_ids"],
                                                       inputs["document_ids"])
        everywhere = model.mae_decoder(hidden, mask, rotary, packed_seq_params=packed)  # [b, s, 4704]
    assert predictions.shape == (n, 4 * 1176)
    assert torch.equal(predictions, everywhere[select])
    # the targets are the clean pixels of exactly the noised merge groups, in token order; the model saw
    # noise there and the clean pixels everywhere else
    groups = select[inputs["input_ids"] == model.cfg.tokens.image_token_id]
    clean = frames_to_pixels(inputs["clean_pixels"], dtype=torch.float32).view(-1, 4 * 1176)
    seen = inputs["pixel_values"].view(-1, 4 * 1176)
    assert torch.equal(inputs["mae_targets"], clean[groups])
    assert torch.equal(seen[~groups], clean[~groups]) and not bool((seen[groups] == clean[groups]).all(-1).any())
    total, count = mae_loss_sum(predictions, inputs["mae_targets"])
    assert count == n * 4 * 1176
    torch.testing.assert_close(total / count, F.mse_loss(predictions, inputs["mae_targets"]))
    with pytest.raises(ValueError, match="do not belong together"):
        mae_loss_sum(predictions[1:], inputs["mae_targets"])


def test_joint_loss_trains_every_part(megatron_runtime, packed_inputs):
    model = _model(3).train()
    initialize_mae_decoder(model)
    inputs = packed_inputs
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    history = []
    for step in range(6):
        opt.zero_grad(set_to_none=True)
        loss, parts = reconstruction_loss(model, _forward(model, inputs), inputs, ReconstructionConfig(mae_weight=0.5))
        torch.testing.assert_close(loss.detach(), parts["mlm_loss"] + 0.5 * parts["mae_loss"])
        loss.backward()
        if step == 0:
            no_grad = [n for n, p in model.named_parameters() if p.grad is None or not bool(p.grad.ne(0).any())]
            assert not no_grad, no_grad[:5]
        opt.step()
        history.append((float(parts["mlm_loss"]), float(parts["mae_loss"])))
    assert parts["mlm_count"] == int((inputs["labels"] != IGNORE_INDEX).sum()) > 0
    assert parts["mae_count"] == inputs["mae_targets"].numel()
    assert history[-1][0] < history[0][0] and history[-1][1] < history[0][1], history


def test_text_only_batch_keeps_the_decoder_in_the_graph_when_asked(megatron_runtime):
    ids = torch.randint(0, 1000, (1, 24))
    labels = torch.where(torch.rand(1, 24) < 0.4, ids, IGNORE_INDEX)
    labels[0, 0] = ids[0, 0]
    batch = {"input_ids": ids, "labels": labels, "mae_token_mask": torch.zeros(1, 24, dtype=torch.bool),
             "mae_targets": None}
    for keep in (False, True):
        model = _model(4, vision_on_text_batches=keep).train()
        loss, parts = reconstruction_loss(model, model(ids), batch)
        loss.backward()
        assert parts["mae_count"] == 0 and float(parts["mae_loss"]) == 0.0
        torch.testing.assert_close(loss.detach(), parts["mlm_loss"])
        grads = [p.grad for p in model.mae_decoder.parameters()]
        assert all((g is not None and not bool(g.ne(0).any())) for g in grads) if keep else all(g is None for g in grads)


def test_backbone_checkpoint_loads_into_a_stage1_model(megatron_runtime, tmp_path):
    from megatron_moca.checkpointing import load_model, save_model

    backbone = MocaVLM(tiny_config())
    backbone_dir = save_model(backbone, backbone.cfg, str(tmp_path / "backbone"), 0)
    model = _model(5)
    with pytest.raises(UserError, match="has no MAE decoder"):
        load_model(model, backbone_dir)  # the decoder's tensors are not there
    load_model(model, backbone_dir, without=("mae_decoder.",))
    for (name, ours), theirs in zip(model.language.named_parameters(), backbone.language.parameters()):
        assert torch.equal(ours, theirs), name
    initialize_mae_decoder(model)
    stage1_dir = save_model(model, model.cfg, str(tmp_path / "stage1"), 0)
    again = _model(6)
    load_model(again, stage1_dir)
    for (name, ours), theirs in zip(again.named_parameters(), model.parameters()):
        assert torch.equal(ours, theirs), name


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp", [(1, 4), (2, 2)], ids=["pp4", "tp2pp2"])
def test_mae_decoder_under_pipeline_and_tensor_parallelism(tmp_path, tp, pp):
    """pp4: the tiny model's layer L//2 = 2 lives on stage 2, the decoder on stage 3 (a broadcast);
    tp2pp2: each TP rank copies its own shard; the replicated output linear is the same on both ranks."""
    from helpers import REPO, run_torchrun

    proc = run_torchrun(tp * pp, os.path.join(REPO, "tests", "cpu", "mae_init_worker.py"), str(tmp_path), str(tp))
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    for rank in range(tp):
        source, before, after = (torch.load(tmp_path / f"{f}_tp{rank}.pt") for f in ("source", "decoder_before", "decoder"))
        assert source.keys() == after.keys() and len(after) > 5
        assert not torch.equal(before["mlp.linear_fc1.weight"], source["mlp.linear_fc1.weight"])
        for name, value in after.items():
            assert torch.equal(value, source[name]), name
    predict = [torch.load(tmp_path / f"predict_tp{rank}.pt") for rank in range(tp)]
    assert all(torch.equal(p["weight"], predict[0]["weight"]) for p in predict)
    if tp == 2:
        shards = [torch.load(tmp_path / f"decoder_tp{rank}.pt")["mlp.linear_fc1.weight"] for rank in range(2)]
        assert not torch.equal(shards[0], shards[1])  # TP shards, not copies


def test_step_shape_of_a_packed_row(packed_inputs):
    from megatron_moca.training.flops import step_shape_of

    inputs = packed_inputs
    shape = step_shape_of(inputs)
    docs = inputs["document_ids"][0]
    assert shape.documents == [int((docs == i).sum()) for i in range(3)]  # two image documents + one text
    assert sum(shape.documents) == int((docs >= 0).sum()) < docs.numel()  # the padding is not counted
    assert shape.logit_tokens == int((inputs["labels"] != IGNORE_INDEX).sum()) > 0
    assert shape.image_grids == [tuple(g) for g in inputs["image_grid_thw"].tolist()] and len(shape.image_grids) == 2
    assert shape.mae_tokens == inputs["mae_targets"].shape[0] and not shape.causal
    assert step_shape_of(inputs, causal=True, mae_decoder=False).mae_tokens == -1
