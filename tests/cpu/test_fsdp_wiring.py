"""Stage 2's FSDP2 wiring, the torchtitan way, on 2 gloo ranks with the tiny model: activation checkpointing
wrapped before fully_shard; in bf16 the vision blocks see fp32 rotary cos/sin as on the replicated path;
GradCache reduces the gradients once per step (counted: as many reduce-scatters as one unchunked backward),
and its gradients equal the unchunked step's (fp32); bf16 compute reduces its gradients in fp32."""

import contextlib
import json
import os

import pytest
import torch

pytestmark = pytest.mark.slow


@contextlib.contextmanager
def _recorded_reductions():
    """Wrap torch.distributed's reduce-scatter (the name FSDP2 calls differs across torch versions) and
    yield the list of the dtypes of the gradients it reduces while inside."""
    import torch.distributed as dist

    dtypes, originals = [], {}
    for name in ("reduce_scatter_single", "reduce_scatter_tensor"):
        original = originals[name] = getattr(dist, name, None)
        if original is None:
            continue

        def recorded(*args, __original=original, **kwargs):
            gradients = kwargs["input"] if "input" in kwargs else args[1]  # (output, input, ...) either way
            dtypes.append(str(gradients.dtype))
            return __original(*args, **kwargs)

        setattr(dist, name, recorded)
    try:
        yield dtypes
    finally:
        for name, original in originals.items():
            if original is not None:
                setattr(dist, name, original)


def _worker(rank, folder, pairs, init, out):
    import torch.distributed as dist

    from megatron_moca.conversion.hf_io import load_transformers_model
    from megatron_moca.data.image_processing import ImageProcessingConfig
    from megatron_moca.data.pairs import BatchPlan, PairsData, PairsDataConfig
    from megatron_moca.embed.inputs import EmbeddingInputs
    from megatron_moca.objectives.contrastive import ContrastiveConfig
    from megatron_moca.training import fsdp
    from megatron_moca.training.contrastive_batches import ContrastiveSteps
    from megatron_moca.training.contrastive_step import ContrastiveStep, PooledEncoder

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        device = torch.device("cpu")
        data = PairsData(PairsDataConfig(paths=[pairs]))
        plan = BatchPlan(data.subset_sizes(), 4, "mixed", 0)
        inputs = EmbeddingInputs(None, max_length=64, image=ImageProcessingConfig(min_pixels=3136, max_pixels=6272),
                                 pixel_dtype=None)
        steps = {chunk: ContrastiveSteps(data, plan, inputs, rank, 2, 2, 1, chunk)[0] for chunk in (None, 1)}
        seen = {}

        def record(where):
            def hook(module, args, kwargs):
                cos_sin = kwargs.get("position_embeddings")
                if cos_sin is not None:
                    seen[where] = str(cos_sin[0].dtype)
            return hook

        replicated = PooledEncoder(load_transformers_model(folder, torch.float32).model, device)
        handle = replicated.backbone.visual.blocks[0].register_forward_pre_hook(record("replicated"), with_kwargs=True)
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
            replicated(steps[None]["positives"][0])
        handle.remove()

        bf16 = PooledEncoder(load_transformers_model(folder, torch.float32).model, device, always_run_vision=True)
        fsdp.shard(bf16, device, "bfloat16", checkpointing=True)
        block = bf16.backbone.visual.blocks[0]
        assert "CheckpointWrapper" in type(block).__name__ and "FSDP" in type(block).__name__
        block.register_forward_pre_hook(record("fsdp"), with_kwargs=True)
        with torch.no_grad():
            bf16(steps[None]["positives"][0])
        with _recorded_reductions() as bf16_reductions:  # bf16 compute, fp32 reduction (MixedPrecisionPolicy)
            ContrastiveStep(bf16, ContrastiveConfig(temperature=0.05, hard_negatives=1), device, False)(steps[None])

        grads, reductions = {}, {}
        for chunk in (None, 1):  # fp32 compute: the chunked gradient must equal the whole batch's tightly
            encoder = PooledEncoder(load_transformers_model(folder, torch.float32).model, device, always_run_vision=True)
            fsdp.shard(encoder, device, "float32", checkpointing=True)
            step = ContrastiveStep(encoder, ContrastiveConfig(temperature=0.05, hard_negatives=1), device, False)
            with _recorded_reductions() as dtypes:
                loss, _, chunked = step(steps[chunk])
            reductions[str(chunk)] = len(dtypes)
            grads[str(chunk)] = {n: fsdp.full_value(p.grad).float() for n, p in encoder.named_parameters()
                                 if p.grad is not None}
            assert chunked == (chunk is not None)
        worst = max(((grads["1"][n] - g).norm() / (g.norm() + 1e-12)).item() for n, g in grads["None"].items())
        if rank == 0:
            with open(out, "w") as f:
                json.dump({"seen": seen, "reductions": reductions, "bf16_reductions": bf16_reductions, "worst": worst, "params": len(grads["None"]),
                           "units": sum(1 for m in encoder.modules() if "FSDP" in type(m).__name__)}, f)
    finally:
        dist.destroy_process_group()


def test_fsdp_wraps_checkpoints_keeps_fp32_rotary_and_reduces_once_under_grad_cache(tiny_hf_dir, tmp_path):
    import torch.multiprocessing as mp

    from helpers import write_pairs

    pairs = write_pairs(tmp_path / "pairs", text_rows=4, image_rows=4)
    out = str(tmp_path / "result.json")
    mp.spawn(_worker, args=(tiny_hf_dir, pairs, f"file://{tmp_path / 'rdzv'}", out), nprocs=2)
    result = json.load(open(out))
    assert result["seen"] == {"replicated": "torch.float32", "fsdp": "torch.float32"}
    # one reduction per FSDP unit per step, chunked or not (without the deferral: once per chunk and unit)
    assert result["reductions"]["1"] == result["reductions"]["None"] == result["units"]
    assert result["bf16_reductions"] == ["torch.float32"] * result["units"]  # bf16 compute reduces in fp32
    assert result["worst"] < 1e-4  # every parameter's gradient (rel. norm of the difference): GradCache is exact
