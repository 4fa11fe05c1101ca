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


def test_explicit_arguments_win_over_what_the_folder_records_and_the_folder_over_the_defaults(tiny_hf_dir, tmp_path):
    import json
    import shutil

    from megatron_moca.conversion.hf_io import write_embedding_settings
    from megatron_moca.data.image_processing import ImageProcessingConfig
    from megatron_moca.embed.embedder import MocaEmbedder

    def settings(embedder):
        cfg = embedder.inputs.builder.cfg
        return cfg.max_length, cfg.image.min_pixels, cfg.image.max_pixels

    plain = str(tmp_path / "plain")
    shutil.copytree(tiny_hf_dir, plain, ignore=shutil.ignore_patterns("moca_embedding.json", "preprocessor_config.json"))
    default = ImageProcessingConfig()
    assert settings(MocaEmbedder(plain, device="cpu")) == (1280, default.min_pixels, default.max_pixels)
    processor = str(tmp_path / "processor")  # bounds only in preprocessor_config.json (a base model's folder)
    shutil.copytree(plain, processor)
    with open(os.path.join(processor, "preprocessor_config.json"), "w") as f:
        json.dump({"min_pixels": 6272, "max_pixels": 25088}, f)
    assert settings(MocaEmbedder(processor, device="cpu")) == (1280, 6272, 25088)
    release = str(tmp_path / "release")  # moca_embedding.json wins over preprocessor_config.json
    shutil.copytree(processor, release)
    write_embedding_settings(release, min_pixels=3136, max_pixels=12544, max_length=48)
    assert settings(MocaEmbedder(release, device="cpu")) == (48, 3136, 12544)
    given = MocaEmbedder(release, device="cpu", max_length=96, image=ImageProcessingConfig(min_pixels=12544,
                                                                                           max_pixels=50176))
    assert settings(given) == (96, 12544, 50176)
    long = ["harbour " * 200]
    assert not torch.allclose(given.embed(long), MocaEmbedder(release, device="cpu").embed(long))  # 96 vs 48 tokens


def test_uint8_image_rows_normalised_on_the_device_embed_exactly_as_float_pixels(embedder, items):
    """Stage 2's loader workers ship uint8 one-frame rows (8x fewer shared-memory bytes than float32 pixels);
    normalising them where the model runs gives the same embeddings, bit for bit."""
    from megatron_moca.embed.embedder import pooled_embeddings
    from megatron_moca.embed.inputs import EmbeddingInputs

    image_items = [i for i in items if isinstance(i, dict)]
    assert image_items
    floats = embedder.inputs.batch(image_items)
    cfg = embedder.inputs.builder.cfg
    frames = EmbeddingInputs(None, max_length=cfg.max_length, image=cfg.image, pixel_dtype=None).batch(image_items)
    assert frames["pixel_values"].dtype == torch.uint8 and floats["pixel_values"].dtype == torch.float32
    assert frames["pixel_values"].shape[1] * 2 == floats["pixel_values"].shape[1]
    assert frames["pixel_values"].nbytes * 8 == floats["pixel_values"].nbytes
    with torch.no_grad():
        a = pooled_embeddings(embedder.model.model, floats, embedder.device)
        b = pooled_embeddings(embedder.model.model, frames, embedder.device)
    assert torch.equal(a, b)


def test_always_running_the_vision_tower_changes_no_embedding_and_gives_it_zero_gradients(embedder, items):
    """FSDP runs the vision tower on a text-only batch too (every rank must run every sharded module): the
    blank image's features join with weight 0, so the embeddings are the same bit for bit and the vision
    tower gets gradients of exactly zero (present, as FSDP's reduce-scatter expects)."""
    from megatron_moca.training.contrastive_step import PooledEncoder

    texts = embedder.inputs.batch([i for i in items if isinstance(i, str)])
    assert texts["pixel_values"] is None
    backbone = embedder.model.model
    plain, always = (PooledEncoder(backbone, embedder.device, always_run_vision=run) for run in (False, True))
    backbone.zero_grad(set_to_none=True)
    a = plain(texts)
    a.sum().backward()
    assert all(p.grad is None for p in backbone.visual.parameters())
    b = always(texts)
    assert torch.equal(a, b)
    b.sum().backward()
    vision = [p.grad for p in backbone.visual.parameters()]
    assert all(g is not None and not g.any() for g in vision)
    backbone.zero_grad(set_to_none=True)
