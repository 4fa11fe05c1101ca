"""training/flops.py: the model-FLOP formula equals what torch's FLOP counter sees in a real forward +
backward of the model (bidirectional; SDPA in its math form so that attention is counted too)."""

import pytest
import torch
from helpers import build_batch, stage1_targets, tiny_config
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from megatron_moca.models.vlm import MocaVLM
from megatron_moca.training.flops import StepShape, training_step_flops


def rope_angles(cfg, rows, seq, times=1):
    """megatron's M-RoPE computes its angles as a (3 x rows) batch of [head_dim/2, 1] @ [1, seq] products:
    counted by torch, not model work."""
    return times * 2 * 3 * rows * (cfg.language.head_dim // 2) * seq


def counted(fn) -> int:
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.fixture(scope="module")
def setup(megatron_runtime):
    cfg = tiny_config()
    cfg.attention, cfg.attention_backend = "bidirectional", "sdpa"
    cfg.vision.intermediate_pad_multiple = 1  # model FLOPs are unpadded; the counter sees executed ones
    torch.manual_seed(0)
    return cfg, MocaVLM(cfg, mae_decoder=True)


def test_text_step(setup):
    cfg, model = setup
    ids = torch.randint(0, 1000, (2, 24))
    got = counted(lambda: model.logits(model(ids)).float().sum().backward())
    assert got == training_step_flops(cfg, StepShape(documents=[24, 24], logit_tokens=48)) + rope_angles(cfg, 2, 24)


def test_step_with_images_and_partial_windows(setup):
    cfg, model = setup
    grids = [(1, 8, 12), (1, 4, 4), (1, 20, 6)]  # windows of several sizes: several attention groups
    ids, _, pixels, grid = build_batch(cfg, [[grids[0]], [grids[1], grids[2]]], seed=1)
    s = ids.shape[1]
    got = counted(lambda: model.logits(model(ids, pixel_values=pixels, image_grid_thw=grid)).float().sum().backward())
    assert got == training_step_flops(cfg, StepShape(documents=[s, s], logit_tokens=2 * s, image_grids=grids)) \
        + rope_angles(cfg, 2, s)


def test_stage1_step_counts_masked_logits_and_the_mae_decoder(setup):
    from megatron_moca.objectives.masking import IGNORE_INDEX
    from megatron_moca.objectives.reconstruction import reconstruction_loss

    cfg, model = setup
    ids, mask, pixels, grid = build_batch(cfg, [[(1, 8, 8)]], seed=2)
    batch = {"input_ids": ids, "pixel_values": pixels, "image_grid_thw": grid,
             **stage1_targets(cfg, ids, mask.bool(), seed=0)}
    mae = batch["mae_token_mask"]

    def step():
        hidden = model(ids, pixel_values=pixels, image_grid_thw=grid)
        reconstruction_loss(model, hidden, batch)[0].backward()

    shape = StepShape(documents=[ids.shape[1]], logit_tokens=int((batch["labels"] != IGNORE_INDEX).sum()),
                      image_grids=[(1, 8, 8)], mae_tokens=int(mae.sum()))
    # the angles twice: once for the LLM, once for the MAE decoder's layer
    assert counted(step) == training_step_flops(cfg, shape) + rope_angles(cfg, 1, ids.shape[1], times=2)


def test_causal_attention_counts_half_and_3b_magnitude():
    from megatron_moca.config.model import preset

    cfg = preset("qwen25vl_3b")
    bidirectional = training_step_flops(cfg, StepShape(documents=[4096], logit_tokens=4096))
    causal = training_step_flops(cfg, StepShape(documents=[4096], logit_tokens=4096, causal=True))
    lang = cfg.language
    attention = 3 * lang.num_layers * 4 * 4096**2 * lang.num_attention_heads * lang.head_dim
    assert bidirectional - causal == attention / 2
    # ~6 x parameters x tokens (3.09B LLM parameters, embedding counted once as the output layer)
    assert 6 * 3.0e9 * 4096 < causal < 6 * 3.2e9 * 4096 + attention
