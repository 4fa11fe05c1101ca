"""Bidirectional vs causal, and packed documents attending only within themselves."""

import pytest
import torch
from helpers import tiny_config
from helpers import build_batch

from megatron_moca.models.vlm import MocaVLM

BACKENDS = ["sdpa", "local", "flex"]


def model_for(backend, mode):
    cfg = tiny_config()
    cfg.attention, cfg.attention_backend = mode, backend
    torch.manual_seed(0)
    return MocaVLM(cfg).eval()


@pytest.mark.parametrize("backend", BACKENDS)
def test_last_token_reaches_position_zero_only_when_bidirectional(megatron_runtime, backend):
    """Each mode as a model is BUILT from its config (model.attention), and as the other mode's model
    switched to it afterwards (set_attention): both give the mode's semantics and the same outputs."""
    switched = model_for(backend, "causal")
    ids, mask, pixels, grid = build_batch(switched.cfg, [[(1, 4, 4)], []], seed=1)  # row 1 is padded
    doc = torch.where(mask.bool(), 0, -1)
    last = int(mask[0].sum()) - 1
    changed = ids.clone()
    changed[0, last] = (changed[0, last] + 17) % 150000
    for mode, expect_change in (("bidirectional", True), ("causal", False)):
        built = model_for(backend, mode)
        switched.set_attention(mode)
        with torch.no_grad():
            a = built(ids, document_ids=doc, pixel_values=pixels, image_grid_thw=grid)
            b = built(changed, document_ids=doc, pixel_values=pixels, image_grid_thw=grid)
            assert torch.equal(a, switched(ids, document_ids=doc, pixel_values=pixels, image_grid_thw=grid))
        moved = (a[0, 0] - b[0, 0]).abs().max().item()
        assert (moved > 1e-4) == expect_change, (mode, moved)
        # padding never leaks into real tokens of the other row
        assert torch.equal(a[:, 1], b[:, 1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["bidirectional", "causal"])
def test_packed_documents_equal_documents_alone(megatron_runtime, backend, mode):
    model = model_for(backend, mode)
    cfg = model.cfg
    docs = [build_batch(cfg, [[(1, 6, 10)]], seed=3), build_batch(cfg, [[]], seed=4),
            build_batch(cfg, [[(1, 4, 4), (1, 2, 6)]], seed=5)]
    alone = []
    with torch.no_grad():
        for ids, _, pixels, grid in docs:
            alone.append(model(ids, pixel_values=pixels, image_grid_thw=grid)[:, 0])
        packed = torch.cat([d[0] for d in docs] + [torch.full((1, 5), cfg.tokens.pad_token_id)], dim=1)
        doc_ids = torch.cat([torch.full_like(d[0], i) for i, d in enumerate(docs)] + [torch.full((1, 5), -1)], dim=1)
        pixels = torch.cat([d[2] for d in docs if d[2] is not None])
        grid = torch.cat([d[3] for d in docs if d[3] is not None])
        out = model(packed, document_ids=doc_ids, pixel_values=pixels, image_grid_thw=grid)[:, 0]
    start = 0
    for single in alone:
        n = single.shape[0]
        assert (out[start:start + n] - single).abs().max().item() <= 1e-5
        start += n


def test_flex_and_dense_masks_agree_on_packed_documents():
    from megatron_moca.models.attention import _flex_attention, allowed_from_document_ids

    doc = torch.tensor([[0] * 5 + [1] * 7 + [2] * 3 + [-1] * 2, [0] * 10 + [1] * 7]).long()
    q, k, v = (torch.randn(2, 4, 17, 8) for _ in range(3))
    for causal in (False, True):
        dense = torch.nn.functional.scaled_dot_product_attention(q, k, v,
                                                                 attn_mask=allowed_from_document_ids(doc, causal))
        flex = _flex_attention(q, k, v, doc, causal, False)
        assert (dense - flex).abs().max().item() <= 1e-5


@pytest.mark.parametrize("vision_on_text_batches", [True, False])
def test_text_only_training_step_and_the_vision_tower(megatron_runtime, vision_on_text_batches):
    """With vision_on_text_batches, text-only batches keep the vision tower in the graph (zero
    gradients), so DDP buckets see the same parameters every step; without it the tower is skipped."""
    model = model_for("sdpa", "bidirectional").train()
    model.vision_on_text_batches = vision_on_text_batches
    ids, mask, _, _ = build_batch(model.cfg, [[], []], seed=1)
    hidden = model(ids, document_ids=torch.where(mask.bool(), 0, -1))
    model.logits(hidden).float().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    if vision_on_text_batches:
        assert missing == []
        assert all(float(p.grad.abs().max()) == 0.0 for p in model.vision.parameters())
    else:
        assert sorted(missing) == sorted(f"vision.{n}" for n, _ in model.vision.named_parameters())
    assert float(model.language.embedding.word_embeddings.weight.grad.abs().max()) > 0


def test_only_a_missing_kernel_falls_back_to_the_dense_mask_and_everything_else_is_raised(caplog):
    """The compiled flex kernel's failures: inductor's NoValidChoicesError (also wrapped, as dynamo's
    BackendCompilerFailed wraps it) falls back once for that shape, loudly; an out-of-memory or a compiler crash
    is raised - a transient failure must not turn into a permanent 5x slower attention."""
    from megatron_moca.models import attention

    class NoValidChoicesError(RuntimeError):
        pass

    class BackendCompilerFailed(RuntimeError):
        def __init__(self, inner):
            super().__init__(f"backend='inductor' raised:\n{type(inner).__name__}: no choices")
            self.inner_exception = inner

    calls = []

    def failing(error):
        def compiled(*args, **kwargs):
            calls.append(error)
            raise error
        return compiled

    attention._FLEX_UNSUPPORTED.clear()
    for key, error in ((("a",), NoValidChoicesError("no valid choices")),
                       (("b",), BackendCompilerFailed(NoValidChoicesError("x")))):
        assert attention.compiled_or_none(failing(error), key) is None
        assert attention.compiled_or_none(failing(error), key) is None  # remembered: not tried again
    assert len(calls) == 2 and sum("no kernel" in r.getMessage() for r in caplog.records) == 2
    for error in (torch.OutOfMemoryError("CUDA out of memory"), RuntimeError("inductor crashed"),
                  BackendCompilerFailed(ValueError("bad input"))):
        with pytest.raises(type(error)):
            attention.compiled_or_none(failing(error), ("c",))
    assert ("c",) not in attention._FLEX_UNSUPPORTED
    assert attention.compiled_or_none(lambda x: x + 1, ("d",), 1) == 2
    attention._FLEX_UNSUPPORTED.clear()
