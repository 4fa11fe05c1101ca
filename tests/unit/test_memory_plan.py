"""tools/memory_plan.py: exact parameter counts, the state bytes a tiny run actually holds, FSDP's division,
and the verdicts for the 7B stage-2 recipe on 8 x 80 GB cards."""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(REPO, "tools", "memory_plan.py")


def _tool():
    spec = importlib.util.spec_from_file_location("memory_plan", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules["memory_plan"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_states_equal_the_bytes_a_tiny_stage2_model_and_its_adamw_hold(tmp_path):
    from helpers import tiny_config

    from megatron_moca.config.finetune import load_finetune_config
    from megatron_moca.conversion.hf_io import load_transformers_model
    from megatron_moca.conversion.random_hf import write_random_hf

    plan = _tool()
    folder = str(tmp_path / "tiny")
    write_random_hf(folder, tiny_config(), torch.float32, seed=1)
    model = load_transformers_model(folder, torch.float32)
    shapes = plan.model_shapes(tiny_config())
    assert shapes.params == sum(p.numel() for p in model.parameters())
    assert shapes.encoder_params == sum(p.numel() for p in model.model.parameters())
    params = list(model.model.parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer = torch.optim.AdamW(params)
    optimizer.step()
    measured = {"weights": sum(p.numel() * p.element_size() for p in params),
                "gradients": sum(p.grad.numel() * p.grad.element_size() for p in params),
                "optimizer": sum(t.numel() * t.element_size() for s in optimizer.state.values()
                                 for k, t in s.items() if k != "step")}
    (tmp_path / "pairs").mkdir()
    base = [f"model.path={folder}", f"data.paths={tmp_path / 'pairs'}", "checkpoint.save=x",
            "parallel.use_distributed_optimizer=false", "train.global_batch_size=4"]
    cfg = load_finetune_config(os.path.join(REPO, "examples", "finetune_tiny_cpu.yaml"), base)
    predicted = plan.stage2_plan(cfg, shapes, gpus=1)
    assert {k: predicted[k] for k in measured} == measured
    sharded = plan.stage2_plan(load_finetune_config(None, base + ["parallel.fsdp=true"]), shapes, gpus=4)
    for key in measured:
        assert sharded[key] == measured[key] / 4


def _run(*args):
    return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True, cwd=REPO)


def test_the_7b_stage2_recipe_fits_8_x_80gb_with_fsdp_and_not_replicated():
    recipe = os.path.join("examples", "finetune_qwen25vl_7b.yaml")
    proc = _run(recipe, "--gpus", "8", "--gpu-gib", "80")
    assert proc.returncode == 0 and ": fits" in proc.stdout, proc.stdout + proc.stderr
    proc = _run(recipe, "--gpus", "8", "--gpu-gib", "80", "parallel.fsdp=false")
    assert proc.returncode == 1 and "DOES NOT FIT" in proc.stdout, proc.stdout + proc.stderr
    proc = _run(os.path.join("examples", "pretrain_qwen25vl_3b.yaml"), "--gpus", "8")
    assert proc.returncode == 0 and "(stage 1)" in proc.stdout and "MLM logits" in proc.stdout


def test_a_bad_recipe_or_override_is_one_line():
    proc = _run(os.path.join("examples", "finetune_qwen25vl_7b.yaml"), "--gpus", "8", "parallel.bogus=1")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "memory_plan: error: unknown config key(s) parallel.bogus in section parallel; valid keys: "
        "timeout_minutes, use_distributed_optimizer, fsdp, fsdp_shard_size, gradient_reduction"]
    proc = _run("no_such_recipe.yaml", "--gpus", "8")
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_every_term_follows_its_formula_on_hand_picked_shapes():
    """Every component of both plans, on shapes and settings picked so each factor is distinct: the numbers
    below are worked out by hand from the formulas in the tool's docstring."""
    from megatron_moca.config.finetune import load_finetune_config
    from megatron_moca.config.pretrain import load_pretrain_config

    plan = _tool()
    s = plan.Shapes(params=1000, encoder_params=900, root_params=300, layer_params=100, hidden=8, ffn=16, layers=6,
                    vocab=50, vision_hidden=4, vision_ffn=12, vision_blocks=3, patch_pixels=196)
    llm_token_layer = 2 * (10 * 8 + 4 * 16)    # 288 bytes per token and LLM layer
    vit_patch_block = 2 * (10 * 4 + 4 * 12)    # 176 bytes per patch and ViT block

    # stage 2, FSDP over shard groups of 2 on 4 GPUs, bf16, GradCache chunks of 3, no checkpointing
    fsdp = load_finetune_config(None, ["parallel.fsdp=true", "parallel.fsdp_shard_size=2", "train.global_batch_size=8",
                                       "train.micro_batch_size=3", "data.max_length=10", "data.image.max_pixels=1960",
                                       "model.compute_dtype=bfloat16", "objective.hard_negatives=2"])
    got = plan.stage2_plan(fsdp, s, gpus=4)
    inputs, tokens, patches = 3, 3 * 10, 3 * 1960 / 196    # min(3, 2 pairs x 2 negatives)
    assert got == {"weights": 4 * 900 / 2, "gradients": 4 * 900 / 2, "optimizer": 8 * 900 / 2,
                   "gathered units": 2 * (300 + 2 * 100) + 4 * 300,
                   "activations": llm_token_layer * tokens * 6 + vit_patch_block * patches * 3}
    # fp32 compute gathers 4-byte units; per-layer checkpointing keeps 2h per token per layer + one layer
    fsdp.model.compute_dtype, fsdp.model.gradient_checkpointing = "float32", True
    got = plan.stage2_plan(fsdp, s, gpus=4)
    assert got["gathered units"] == 4 * (300 + 2 * 100) + 4 * 300
    assert got["activations"] == (2 * 8 * tokens * 6 + 2 * 4 * patches * 3) + llm_token_layer * tokens + \
        vit_patch_block * patches
    # replicated, ZeRO-1 over 4 GPUs, no GradCache: queries + positives + 2 negatives per pair alive at once
    zero = load_finetune_config(None, ["train.global_batch_size=8", "train.micro_batch_size=null",
                                       "data.max_length=10", "data.image.max_pixels=1960", "objective.hard_negatives=2"])
    got = plan.stage2_plan(zero, s, gpus=4)
    inputs = 2 * (2 + 2)
    assert got == {"weights": 4 * 900, "gradients": 4 * 900, "optimizer": 8 * 900 / 4,
                   "activations": llm_token_layer * inputs * 10 * 6 + vit_patch_block * inputs * 10 * 3}
    zero.parallel.use_distributed_optimizer = False
    assert plan.stage2_plan(zero, s, gpus=4)["optimizer"] == 8 * 900

    # stage 1, TP 2 x PP 3 on 12 GPUs (DP 2), bf16 with the distributed optimizer, full recompute
    one = load_pretrain_config(None, ["parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=3",
                                      "model.params_dtype=bfloat16", "train.micro_batch_size=2", "data.pack_length=40",
                                      "model.recompute_granularity=full", "sample.mlm_probability=0.4"])
    got = plan.stage1_plan(one, s, gpus=12, image_fraction=0.25)
    shard = 1000 / 6
    tokens, patches, layers = 2 * 40, 4 * 0.25 * 2 * 40, 6 // 3 + 1   # + the MAE decoder layer
    assert got == pytest.approx({
        "weights": 2 * shard, "gradients": 4 * shard, "optimizer": (4 * shard + 8 * shard) / 2,
        "activations": (2 * 8 * tokens * layers + 2 * 4 * patches * 3) / 2 + llm_token_layer * tokens / 2 +
                       vit_patch_block * patches / 2,
        "MLM logits": 0.4 * 0.75 * tokens * 50 / 2 * 6}, rel=1e-12)
    one.model.params_dtype, one.model.recompute_granularity = "float32", None
    one.parallel.use_distributed_optimizer = False
    got = plan.stage1_plan(one, s, gpus=12, image_fraction=0.25)
    assert got["weights"] == pytest.approx(4 * shard) and got["optimizer"] == pytest.approx(8 * shard)
    assert got["activations"] == pytest.approx((llm_token_layer * tokens * layers + vit_patch_block * patches * 3) / 2)
