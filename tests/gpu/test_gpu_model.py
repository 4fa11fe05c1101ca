"""GPU checks (skipped without CUDA): HF parity on the GPU kernels, packed documents with the compiled
flex_attention kernel, bf16 agreement. Speed is measured by tools/bench_gpu.py, never asserted here."""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _cuda_batch(cfg, rows, seed):
    from helpers import build_batch

    ids, mask, pixels, grid = build_batch(cfg, rows, seed=seed)
    return ids.cuda(), mask.cuda(), (pixels.cuda() if pixels is not None else None), \
        (grid.cuda() if grid is not None else None)


@pytest.mark.parametrize("mode", ["causal", "bidirectional"])
@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_fp32_parity_on_gpu(megatron_runtime, mode, backend):
    from helpers import tiny_config
    from helpers import hf_model, ours_from_hf

    from megatron_moca.conversion.verification import hf_logits, ours_logits

    cfg = tiny_config()
    cfg.attention, cfg.attention_backend = mode, backend
    hf = hf_model(cfg, seed=1)
    ours = ours_from_hf(cfg, hf).cuda()
    hf = hf.cuda()
    ids, mask, pixels, grid = _cuda_batch(cfg, [[(1, 6, 10), (1, 4, 4)], [(1, 20, 18)], []], seed=3)
    torch.backends.cuda.matmul.allow_tf32 = False
    ref = hf_logits(hf, ids, mask, pixels, grid, cfg.tokens.image_token_id, mode == "bidirectional")
    got = ours_logits(ours, ids, mask, pixels, grid)
    valid = mask.bool()
    assert (ref[valid] - got[valid]).abs().max().item() <= 1e-3


def test_packed_documents_with_compiled_flex(megatron_runtime):
    from helpers import build_batch, tiny_config

    from megatron_moca.models.attention import _FLEX_UNSUPPORTED
    from megatron_moca.models.vlm import MocaVLM

    cfg = tiny_config()
    cfg.attention_backend, cfg.params_dtype = "flex", "bfloat16"
    torch.manual_seed(0)
    model = MocaVLM(cfg).cuda().eval()
    docs = [build_batch(cfg, [[(1, 6, 10)]], seed=3), build_batch(cfg, [[]], seed=4)]
    _FLEX_UNSUPPORTED.clear()  # earlier tests may have met shapes without a kernel
    with torch.no_grad():
        alone = [model(d[0].cuda(), pixel_values=None if d[2] is None else d[2].cuda(),
                       image_grid_thw=None if d[3] is None else d[3].cuda())[:, 0].float() for d in docs]
        packed = torch.cat([d[0] for d in docs], dim=1).cuda()
        doc_ids = torch.cat([torch.full_like(d[0], i) for i, d in enumerate(docs)], dim=1).cuda()
        out = model(packed, document_ids=doc_ids, pixel_values=docs[0][2].cuda(),
                    image_grid_thw=docs[0][3].cuda())[:, 0].float()
    assert not _FLEX_UNSUPPORTED, f"the compiled flex kernel fell back to dense masks for {_FLEX_UNSUPPORTED}"
    n = alone[0].shape[0]
    assert (out[:n] - alone[0]).abs().max().item() <= 5e-2
    assert (out[n:] - alone[1]).abs().max().item() <= 5e-2


def test_compiled_blocks_match_eager_with_inductor(megatron_runtime):
    from helpers import build_batch, hidden_and_grads, tiny_config, two_documents_in_row0

    from megatron_moca.models.compile import compile_model
    from megatron_moca.models.vlm import MocaVLM

    cfg = tiny_config()
    cfg.attention, cfg.attention_backend = "bidirectional", "flex"
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False
    model = MocaVLM(cfg).cuda()
    ids, mask, pixels, grid = build_batch(cfg, [[(1, 6, 10)], [(1, 4, 4)]], seed=3)
    packed = two_documents_in_row0(cfg, ids, mask).cuda()
    ids, pixels, grid = ids.cuda(), pixels.cuda(), grid.cuda()
    eager = hidden_and_grads(model, ids, pixels, grid, document_ids=packed)
    compile_model(model)
    h1, g1 = hidden_and_grads(model, ids, pixels, grid, document_ids=packed)
    h0, g0 = eager
    assert (h0 - h1).abs().max().item() <= 1e-4
    for name in g0:
        assert (g0[name] - g1[name]).abs().max().item() <= 1e-4 * max(1.0, g0[name].abs().max().item()), name


def test_exact_resize_on_gpu_equals_pillow():
    import numpy as np
    from PIL import Image

    from megatron_moca.data.resize import resize_bicubic

    rng = np.random.default_rng(0)
    for h, w, out_h, out_w in [(1411, 1411, 896, 896), (500, 741, 504, 728), (102, 102, 476, 476),
                               (872, 1000, 812, 952), (300, 451, 392, 560), (191, 384, 336, 644)]:
        for channels in (1, 3):
            image = rng.integers(0, 256, size=(h, w, channels), dtype=np.uint8)
            got = resize_bicubic(torch.from_numpy(image).cuda(), out_h, out_w).cpu().numpy()
            pil = Image.fromarray(image[..., 0] if channels == 1 else image)
            ref = np.asarray(pil.resize((out_w, out_h), resample=Image.BICUBIC)).reshape(out_h, out_w, channels)
            assert np.array_equal(got, ref), (h, w, channels)


def test_rms_norm_is_one_fused_kernel_each_way_and_matches_hf_math():
    """models/norms.py counts on torch's fused CUDA rms_norm (torch >= 2.9) for its launch savings."""
    from helpers import OpNames

    from megatron_moca.models.norms import RMSNorm

    norm = RMSNorm(None, 1280, 1e-6).cuda()
    with torch.no_grad():
        norm.weight.copy_(torch.randn(1280))
    norm = norm.to(torch.bfloat16)
    x = torch.randn(4096, 1280, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with OpNames() as ops:
        out = norm(x)
        out.float().sum().backward()
    assert "_fused_rms_norm" in ops.names and "_fused_rms_norm_backward" in ops.names, ops.names
    assert "rsqrt" not in ops.names and "pow" not in ops.names, ops.names
    h = x.detach().float()
    ref = norm.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)  # bf16 rounding steps at most


def test_stage1_loss_on_gpu_equals_cpu(megatron_runtime, device="cuda", gpu_backend="flex"):
    """The stage-1 joint loss (MLM at masked positions + MAE decoder) on the GPU kernels (flex, packed
    documents) equals the CPU's (sdpa) in fp32, and its backward reaches the decoder."""
    import copy

    from helpers import build_batch, stage1_targets, tiny_config, two_documents_in_row0

    from megatron_moca.models.heads import initialize_mae_decoder
    from megatron_moca.models.vlm import MocaVLM
    from megatron_moca.objectives.reconstruction import reconstruction_loss

    cfg = tiny_config()
    cfg.attention_backend = "sdpa"  # flex has no CPU backward
    torch.manual_seed(0)
    reference = MocaVLM(cfg, mae_decoder=True)
    initialize_mae_decoder(reference)
    gpu_cfg = copy.deepcopy(cfg)
    gpu_cfg.attention_backend = gpu_backend
    model = MocaVLM(gpu_cfg, mae_decoder=True)
    model.load_state_dict(reference.state_dict())
    ids, mask, pixels, grid = build_batch(cfg, [[(1, 8, 8)], [(1, 4, 4)]], seed=5)
    batch = {"input_ids": ids, "document_ids": two_documents_in_row0(cfg, ids, mask), "pixel_values": pixels,
             "image_grid_thw": grid, **stage1_targets(cfg, ids, mask.bool(), seed=1)}

    def loss_on(net, dev):
        on = {k: v.to(dev) for k, v in batch.items()}
        net.to(dev).zero_grad(set_to_none=True)
        hidden = net(on["input_ids"], document_ids=on["document_ids"], pixel_values=on["pixel_values"],
                     image_grid_thw=on["image_grid_thw"])
        loss, parts = reconstruction_loss(net, hidden, on)
        loss.backward()
        assert parts["mlm_count"] > 0 and parts["mae_count"] > 0
        return loss.item(), net.mae_decoder.predict.weight.grad.abs().sum().item()

    torch.backends.cuda.matmul.allow_tf32 = False
    cpu_loss, cpu_grad = loss_on(reference, "cpu")
    gpu_loss, gpu_grad = loss_on(model, device)
    assert abs(gpu_loss - cpu_loss) <= 1e-4 * max(1.0, abs(cpu_loss)) and gpu_grad > 0
    assert abs(gpu_grad - cpu_grad) <= 1e-3 * cpu_grad


def test_compiled_token_cross_entropy_equals_torch_on_gpu(megatron_runtime):
    """The TP=1 loss through its inductor kernels (objectives/losses.py) equals F.cross_entropy on fp32
    logits at the 3B vocabulary, loss and bf16 gradient, for two row counts (dynamic shapes)."""
    from helpers import check_token_cross_entropy

    from megatron_moca.objectives.masking import IGNORE_INDEX

    g = torch.Generator(device="cuda").manual_seed(0)
    for rows in (4096, 777):
        logits = (4 * torch.randn(rows, 151936, device="cuda", generator=g)).to(torch.bfloat16)
        labels = torch.randint(0, 151936, (rows,), device="cuda", generator=g)
        labels[::7] = IGNORE_INDEX
        check_token_cross_entropy(logits, labels, torch.rand(rows, device="cuda", generator=g), 1e-5, 1e-2, 1e-6)
