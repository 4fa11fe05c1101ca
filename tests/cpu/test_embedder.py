"""embed/embedder.py: MoCa embeddings from a HF folder - bidirectional, mean-pooled, L2-normalised; equal to
the Megatron model's pooled hidden states from the same weights; independent of what else is in the batch."""

import glob
import os

import pytest
import torch

from megatron_moca.errors import UserError

PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"


@pytest.fixture(scope="module")
def picture():
    import skimage

    path = sorted(glob.glob(os.path.join(os.path.dirname(skimage.__file__), "data", "*.png")), key=os.path.getsize)[3]
    return open(path, "rb").read()


@pytest.fixture(scope="module")
def items(picture):
    return ["Represent the given sentence: a harbour at dusk",
            {"text": f"{PLACEHOLDER}\nRepresent the given document image.", "images": [picture]},
            "a much longer text input " * 12]


@pytest.fixture(scope="module")
def embedder(tiny_hf_dir):
    from megatron_moca.data.image_processing import ImageProcessingConfig
    from megatron_moca.embed.embedder import MocaEmbedder

    return MocaEmbedder(tiny_hf_dir, device="cpu", image=ImageProcessingConfig(min_pixels=28 * 28 * 4,
                                                                                max_pixels=28 * 28 * 64))


def test_embeddings_are_unit_vectors_independent_of_the_batch(embedder, items):
    together = embedder.embed(items, batch_size=3)
    assert together.shape == (3, 64) and torch.allclose(together.norm(dim=-1), torch.ones(3), atol=1e-6)
    alone = torch.cat([embedder.embed([item]) for item in items])
    assert (together - alone).abs().max() < 1e-5  # padding of the other inputs changes nothing
    assert (together[0] - together[2]).abs().max() > 1e-3


def test_embeddings_equal_the_megatron_models_pooled_hidden_states(embedder, items, tiny_mcore_dir, megatron_runtime):
    """The same weights through MocaVLM (bidirectional, converted checkpoint): mean pool + L2 of its final
    hidden states over each input's tokens."""
    from megatron_moca.checkpointing import load_model, read_model_config, resolve_checkpoint
    from megatron_moca.models.vlm import MocaVLM

    folder = resolve_checkpoint(tiny_mcore_dir)
    cfg = read_model_config(folder)
    cfg.attention = "bidirectional"
    model = MocaVLM(cfg)
    load_model(model, folder)
    model.eval()
    got = embedder.embed(items)
    for i, item in enumerate(items):
        b = embedder.batch([item])
        with torch.no_grad():
            hidden = model(b["input_ids"], position_ids=b["position_ids"], document_ids=torch.zeros_like(b["input_ids"]),
                           pixel_values=b["pixel_values"], image_grid_thw=b["image_grid_thw"])
        ours = torch.nn.functional.normalize(hidden[:, 0].mean(0), dim=-1)
        assert (ours - got[i]).abs().max() < 1e-4, i


def test_bad_inputs_are_named(embedder, tmp_path):
    with pytest.raises(UserError, match="embedding input 1: more image placeholders than images"):
        embedder.embed(["fine", {"text": PLACEHOLDER + " no image given"}])
    with pytest.raises(UserError, match="a list of inputs"):
        embedder.embed("not a list")
    from megatron_moca.embed.embedder import MocaEmbedder

    with pytest.raises(UserError):
        MocaEmbedder(str(tmp_path))


def test_a_folder_laid_out_like_the_official_moca_releases_loads(embedder, items, tiny_hf_dir, tmp_path):
    """The reference saves its Qwen2_5ForEmbedding with save_pretrained: legacy keys, its own class in
    `architectures`, and (stage-1 checkpoints) the MLM/MAE heads mae_decoder.* / mae_proj.*; the embedder
    reads the Qwen2.5-VL weights and ignores the rest."""
    import json
    import shutil

    from megatron_moca.conversion.hf_io import SafetensorsReader, write_sharded
    from megatron_moca.embed.embedder import MocaEmbedder

    release = tmp_path / "MoCa-Qwen25VL-tiny"
    release.mkdir()
    reader = SafetensorsReader(tiny_hf_dir)
    tensors = [(k, reader.get(k)) for k in reader.keys()]
    tensors += [("mae_decoder.mlp.up_proj.weight", torch.zeros(8, 4)), ("mae_proj.weight", torch.zeros(4704, 4))]
    write_sharded(iter(tensors), str(release))
    config = json.load(open(os.path.join(tiny_hf_dir, "config.json")))
    config["architectures"] = ["Qwen2_5ForEmbedding"]
    json.dump(config, open(release / "config.json", "w"))
    shutil.copy(os.path.join(tiny_hf_dir, "preprocessor_config.json"), release)
    official = MocaEmbedder(str(release), device="cpu", image=embedder.inputs.builder.cfg.image)
    assert (official.embed(items) - embedder.embed(items)).abs().max() < 1e-6
