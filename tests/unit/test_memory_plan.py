"""tools/memory_plan.py: exact parameter counts, the state bytes a tiny run actually holds, FSDP's division,
and the verdicts for the 7B stage-2 recipe on 8 x 80 GB cards."""

import importlib.util
import os
import subprocess
import sys

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
        "use_distributed_optimizer, fsdp, fsdp_shard_size, gradient_reduction"]
    proc = _run("no_such_recipe.yaml", "--gpus", "8")
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr
