"""Packed stage-1 rows on the Transformer Engine spec: THD sequences (PackedSeqParams, cu_seqlens from the
document ids, mask type padding / padding_causal) through the real model code, TE's attention replaced by a
stand-in of its contract. A packed row equals each document run alone; `auto` never picks a backend that
refuses the run's rows, and an explicit one that would is refused before any process group."""

import math

import pytest
import torch

from helpers import build_batch, tiny_config
from megatron_moca.errors import UserError


def te_model(mode, seed=0):
    from megatron_moca.models.vlm import MocaVLM

    cfg = tiny_config()
    cfg.attention, cfg.attention_backend = mode, "te"
    torch.manual_seed(seed)
    return MocaVLM(cfg, mae_decoder=True).eval()


def standin_calls(model):
    layers = list(model.language.decoder.layers) + [model.mae_decoder.layer]
    calls = [layer.self_attention.core_attention.calls for layer in layers]
    return {fmt: sum(c[fmt] for c in calls) for fmt in ("sbhd", "thd")}


@pytest.mark.parametrize("mode", ["bidirectional", "causal"])
def test_a_packed_row_through_the_te_spec_equals_each_document_alone(megatron_runtime, mode):
    from megatron_moca.standins.te_attention import TEDotProductAttentionStandin

    model = te_model(mode)
    assert type(model.language.decoder.layers[0].self_attention.core_attention) is TEDotProductAttentionStandin
    cfg = model.cfg
    docs = [build_batch(cfg, [[(1, 6, 10)]], seed=3), build_batch(cfg, [[]], seed=4),
            build_batch(cfg, [[(1, 4, 4), (1, 2, 6)]], seed=5)]
    with torch.no_grad():
        alone = [model(ids, pixel_values=pixels, image_grid_thw=grid)[:, 0] for ids, _, pixels, grid in docs]
        assert standin_calls(model)["thd"] == 0  # rows of one document: sbhd with a key-padding mask
        packed = torch.cat([d[0] for d in docs] + [torch.full((1, 5), cfg.tokens.pad_token_id)], dim=1)
        doc_ids = torch.cat([torch.full_like(d[0], i) for i, d in enumerate(docs)] + [torch.full((1, 5), -1)], dim=1)
        pixels = torch.cat([d[2] for d in docs if d[2] is not None])
        grid = torch.cat([d[3] for d in docs if d[3] is not None])
        out = model(packed, document_ids=doc_ids, pixel_values=pixels, image_grid_thw=grid)[:, 0]
        mask, _, params = model.attention_context(packed, None, doc_ids, grid)
        select = torch.zeros_like(packed, dtype=torch.bool)
        select[0, ::3] = True
        mae = model.mae_predictions(out[:, None], select, packed, None, doc_ids, grid)
    layers = len(model.language.decoder.layers)
    assert standin_calls(model)["thd"] == layers + 1  # every LLM layer and the MAE decoder's took THD
    assert mask is None and params.qkv_format == "thd" and params.cu_seqlens_q.dtype == torch.int32
    lengths = [d[0].shape[1] for d in docs]
    assert params.cu_seqlens_q.tolist() == [0, lengths[0], sum(lengths[:2]), sum(lengths), sum(lengths) + 5]
    assert params.max_seqlen_q == max(lengths)
    start = 0
    for single in alone:
        n = single.shape[0]
        assert (out[start:start + n] - single).abs().max().item() <= 1e-5
        start += n
    # the same weights on the torch backend (dense document mask) give the same hidden states and MAE output
    from megatron_moca.models.vlm import MocaVLM

    sdpa_cfg = tiny_config()
    sdpa_cfg.attention, sdpa_cfg.attention_backend = mode, "sdpa"
    sdpa = MocaVLM(sdpa_cfg, mae_decoder=True).eval()
    sdpa.load_state_dict(model.state_dict())  # the same weights (TE's attention has none of its own)
    with torch.no_grad():
        reference = sdpa(packed, document_ids=doc_ids, pixel_values=pixels, image_grid_thw=grid)[:, 0]
    assert (out - reference).abs().max().item() <= 1e-5
    assert torch.isfinite(mae).all() and mae.shape == (int(select.sum()), 4 * 1176)


def test_the_standin_follows_tes_contract_for_layouts_masks_and_gqa():
    """thd over cu_seqlens equals sbhd on each sequence; padding masks (True = masked out) in sbhd; causal
    is top-left; 2 key/value heads serve 4 query heads; thd refuses non-padding mask types."""
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_moca.standins.te_attention import TEDotProductAttentionStandin

    class Config:
        context_parallel_size, window_size = 1, None

    attn = TEDotProductAttentionStandin.__new__(TEDotProductAttentionStandin)
    torch.nn.Module.__init__(attn)
    attn.attn_mask_type, attn.softmax_scale, attn.calls = AttnMaskType.padding, None, {"sbhd": 0, "thd": 0}
    g = torch.Generator().manual_seed(0)
    lengths = [3, 5, 2]
    q, k, v = torch.randn(10, 4, 8, generator=g), torch.randn(10, 2, 8, generator=g), torch.randn(10, 2, 8, generator=g)
    cu = torch.tensor([0, 3, 8, 10], dtype=torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=5, max_seqlen_kv=5)
    for mask_type, causal in ((AttnMaskType.padding, False), (AttnMaskType.padding_causal, True)):
        out = attn(q, k, v, None, mask_type, packed_seq_params=params)
        assert out.shape == (10, 32)
        start = 0
        for n in lengths:  # by hand: softmax(q k^T / sqrt(d)) v per sequence and query head
            for head in range(4):
                scores = q[start:start + n, head] @ k[start:start + n, head // 2].T / math.sqrt(8)
                if causal:
                    scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
                expected = torch.softmax(scores, -1) @ v[start:start + n, head // 2]
                assert torch.allclose(out[start:start + n, head * 8:(head + 1) * 8], expected, atol=1e-6)
            start += n
    # sbhd: the same three sequences as rows of 5 with key padding give the same outputs at the real tokens
    rows = torch.zeros(5, 3, 4, 8), torch.zeros(5, 3, 2, 8), torch.zeros(5, 3, 2, 8)
    pad = torch.ones(3, 1, 1, 5, dtype=torch.bool)
    for i, (s, n) in enumerate(zip(cu[:-1].tolist(), lengths)):
        for t, src in zip(rows, (q, k, v)):
            t[:n, i] = src[s:s + n]
        pad[i, 0, 0, :n] = False
    sbhd = attn(*rows, pad, AttnMaskType.padding).reshape(5, 3, 32)
    thd = attn(q, k, v, None, AttnMaskType.padding, packed_seq_params=params)
    for i, (s, n) in enumerate(zip(cu[:-1].tolist(), lengths)):
        assert torch.allclose(sbhd[:n, i], thd[s:s + n], atol=1e-6)
    with pytest.raises(ValueError, match="thd takes attn_mask_type padding or padding_causal, not causal"):
        attn(q, k, v, None, AttnMaskType.causal, packed_seq_params=params)
    with pytest.raises(ValueError, match="int32"):
        attn(q, k, v, None, AttnMaskType.padding, packed_seq_params=PackedSeqParams(
            qkv_format="thd", cu_seqlens_q=cu.long(), cu_seqlens_kv=cu.long()))


@pytest.fixture()
def gpu_with_te(monkeypatch):
    """A machine where CUDA is up and transformer_engine imports (flex too, flash-attn absent)."""
    from megatron_moca.models import specs

    monkeypatch.setattr(specs, "available_kernels", lambda: {"cuda": True, "te": True, "flash": False, "flex": True,
                                                            "sdpa": True, "local": True, "te_standin": False})


def test_auto_picks_te_only_where_it_takes_the_rows_and_an_explicit_te_that_cannot_is_refused(gpu_with_te):
    from megatron_moca.models.specs import resolve_backend

    assert resolve_backend("auto", packed_micro_batch=None) == "te"
    assert resolve_backend("auto", packed_micro_batch=1) == "te"
    assert resolve_backend("auto", packed_micro_batch=2) == "flex"
    with pytest.raises(UserError, match="train.micro_batch_size=2: set train.micro_batch_size=1"):
        resolve_backend("te", packed_micro_batch=2)


@pytest.mark.parametrize("recipe, world", [("pretrain_qwen25vl_3b.yaml", 1), ("pretrain_qwen25vl_7b.yaml", 2)])
def test_the_3b_and_7b_recipes_resolve_to_a_runnable_backend_before_any_process_group(gpu_with_te, recipe, world,
                                                                                         tmp_path, monkeypatch):
    import os

    import torch.distributed as dist

    from helpers import REPO

    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: pytest.fail("a process group was started"))
    from megatron_moca.config.pretrain import load_pretrain_config

    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "manifest.json").write_text('{"shards": []}')
    base = [f"data.paths={shards}", f"checkpoint.save={tmp_path / 'run'}"]
    path = os.path.join(REPO, "examples", recipe)
    cfg = load_pretrain_config(path, base)
    cfg.validate(world_size=world)
    assert cfg.model.attention_backend == "te"
    two = load_pretrain_config(path, base + ["train.micro_batch_size=2", "train.global_batch_size=1408"])
    two.validate(world_size=world)
    assert two.model.attention_backend == "flex"  # auto: TE would refuse packed rows of 2 per micro-batch
    explicit = load_pretrain_config(path, base + ["model.attention_backend=te", "train.micro_batch_size=2",
                                                  "train.global_batch_size=1408"])
    with pytest.raises(UserError, match="attention_backend='te': Transformer Engine takes packed documents as one THD"):
        explicit.validate(world_size=world)
    fp8 = load_pretrain_config(path, base + ["model.fp8=hybrid", "train.micro_batch_size=2",
                                             "train.global_batch_size=1408"])
    with pytest.raises(UserError, match="model.fp8='hybrid' needs Transformer Engine"):
        fp8.validate(world_size=world)
