"""`moca pretrain` on one GPU (skipped without CUDA): bf16 parameters with fp32 master weights, nccl,
the image pipeline `auto` picks (device_resize without DALI), SDPA attention, full activation recompute;
a short run that learns, stops at train.exit_interval and resumes to the end."""

import os

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.timeout(420)  # two processes, each starting CUDA and megatron
def test_bf16_stage1_run_learns_and_resumes_on_gpu(tmp_path):
    from helpers import REPO, stopped_and_resumed, synthetic_pictures, write_stage1_shards

    shards = write_stage1_shards(tmp_path / "shards", documents=24, pictures=synthetic_pictures())
    save = str(tmp_path / "run")
    args = ["pretrain", "--config", os.path.join(REPO, "examples", "pretrain_tiny_cpu.yaml"), f"data.paths={shards}",
            f"checkpoint.save={save}", "model.params_dtype=bfloat16", "model.recompute_granularity=full",
            "sample.image_pipeline=auto", "model.attention_backend=sdpa",  # no flex compile: a quick test
            "sample.max_length=100", "data.pack_length=128", "train.train_iters=12", "logging.log_interval=1",
            "checkpoint.save_interval=100"]
    records = stopped_and_resumed(args, save, stop_at=6)
    assert [r["step"] for r in records] == list(range(1, 13))
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert records[-1]["mlm_loss"] < records[0]["mlm_loss"] - 0.3, [r["mlm_loss"] for r in records]
    assert records[0]["mem_gib"] > 0 and records[0]["tflops_per_gpu"] > 0
    name = torch.cuda.get_device_name()
    if any(k in name for k in ("H100", "H200")):
        assert records[-1]["mfu"] is not None
