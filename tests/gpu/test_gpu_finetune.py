"""`moca finetune` on one GPU (skipped without CUDA): bf16 autocast over fp32 weights, fused AdamW,
gradient checkpointing, GradCache chunks; a short run that lowers the training loss, stops at
train.exit_interval and resumes to the end, and a release the embedder loads on the GPU."""

import json
import os

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def write_pairs_with(folder, pictures):
    """write_pairs' layout with Pillow-drawn pictures (the card may lack scikit-image's photographs)."""
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    names = []
    for i, data in enumerate(pictures):
        names.append(f"images/p{i}.png")
        with open(os.path.join(folder, names[-1]), "wb") as f:
            f.write(data)
    rows = [{"qry": f"Find me an everyday image that matches the given caption: picture {i % len(names)}",
             "pos_text": "<|image_1|>\nRepresent the given image.", "pos_image_path": names[i % len(names)],
             "neg_text": ["<|image_1|>\nRepresent the given image."], "neg_image_path": [names[(i + 1) % len(names)]]}
            for i in range(12)]
    rows += [{"qry": f"Retrieve a passage about topic {i}", "pos_text": f"A passage on topic {i}.",
              "neg_text": repr([f"A passage on topic {i + 1}."])} for i in range(12)]
    os.makedirs(os.path.join(folder, "Pairs"))
    with open(os.path.join(folder, "Pairs", "train.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return folder


@pytest.mark.timeout(300)
def test_bf16_stage2_run_learns_resumes_and_releases_on_gpu(tmp_path):
    from helpers import stopped_and_resumed, synthetic_pictures, tiny_config

    from megatron_moca.conversion.random_hf import write_random_hf

    hf = str(tmp_path / "hf")
    write_random_hf(hf, tiny_config(), torch.float32, seed=1)
    pairs = write_pairs_with(str(tmp_path / "pairs"), synthetic_pictures())
    save = str(tmp_path / "run")
    args = ["finetune", f"model.path={hf}", f"data.paths={pairs}", f"checkpoint.save={save}",
            "model.compute_dtype=bfloat16", "model.gradient_checkpointing=true", "train.global_batch_size=8",
            "train.micro_batch_size=3", "train.train_iters=12", "optim.lr=2e-4", "logging.log_interval=1",
            "checkpoint.save_interval=100", "data.max_length=128", "data.image.min_pixels=3136",
            "data.image.max_pixels=12544", "checkpoint.release_dtype=bfloat16"]
    records = stopped_and_resumed(args, save, stop_at=6)
    assert [r["step"] for r in records] == list(range(1, 13))
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    early = sum(r["loss"] for r in records[:3]) / 3
    late = sum(r["loss"] for r in records[-3:]) / 3
    assert late < early, [r["loss"] for r in records]
    assert records[0]["mem_gib"] > 0 and records[0]["tflops_per_gpu"] > 0

    from megatron_moca.data.image_processing import ImageProcessingConfig
    from megatron_moca.embed.embedder import MocaEmbedder

    embedder = MocaEmbedder(os.path.join(save, "release"), device="cuda", dtype=torch.bfloat16, max_length=128,
                            image=ImageProcessingConfig(min_pixels=3136, max_pixels=12544))
    vectors = embedder.embed(["picture 0", {"text": "<|vision_start|><|image_pad|><|vision_end|> a picture",
                                            "images": [os.path.join(pairs, "images", "p0.png")]}])
    assert vectors.shape == (2, 64) and torch.allclose(vectors.norm(dim=-1), torch.ones(2), atol=1e-2)
