"""A MoCa folder's config.json says bidirectional where transformers reads it: plain AutoModel (no project code,
no mask of ours) loads every weight, attends bidirectionally, and with mean pooling + L2 gives MocaEmbedder's
vectors, on text and on image + text. The same folder without the declaration is causal (the probe can fail)."""

import json
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"


@pytest.fixture(scope="module")
def folders(tiny_hf_dir, tmp_path_factory):
    from megatron_moca.conversion.hf_config import declare_bidirectional
    from megatron_moca.conversion.hf_io import copy_side_files, read_config

    root = tmp_path_factory.mktemp("native")
    out = {}
    for name, declare in (("declared", True), ("plain", False)):
        folder = str(root / name)
        shutil.copytree(tiny_hf_dir, folder)
        copy_side_files(None, folder)
        config = read_config(folder)
        if declare:
            declare_bidirectional(config)
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        out[name] = folder
    return out


def auto_model(folder):
    from transformers import AutoModel

    model, info = AutoModel.from_pretrained(folder, attn_implementation="sdpa", output_loading_info=True)
    return model.eval(), info


def first_token_moves(model) -> float:
    """How far the first token's final hidden state moves when the LAST token changes (0 for causal)."""
    ids = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(0))
    edited = ids.clone()
    edited[0, -1] = (edited[0, -1] + 7) % 1000
    with torch.no_grad():
        a, b = (model(input_ids=x).last_hidden_state for x in (ids, edited))
    return (a[0, 0] - b[0, 0]).abs().max().item()


def test_the_declared_folder_is_bidirectional_in_plain_automodel_and_the_plain_one_is_not(folders):
    model, info = auto_model(folders["declared"])
    assert all(not info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert model.config.text_config.hidden_size == 64 and model.config.text_config.num_hidden_layers == 4
    assert first_token_moves(model) > 1e-3
    plain, _ = auto_model(folders["plain"])
    assert first_token_moves(plain) == 0.0  # without the declaration transformers runs it causal


def test_automodel_with_mean_pooling_equals_moca_embedder(folders, real_images):
    from megatron_moca.embed.embedder import MocaEmbedder

    folder = folders["declared"]
    embedder = MocaEmbedder(folder, device="cpu")
    model, _ = auto_model(folder)
    items = ["a harbour at dawn with fishing boats", {"text": PLACEHOLDER + " a picture of the harbour",
                                                      "images": [sorted(real_images, key=os.path.getsize)[2]]}]
    for item in items:  # one input at a time: no padding, transformers computes its own M-RoPE positions
        batch = embedder.batch([item])
        # what Qwen2.5-VL's processor gives besides the ids (transformers 5 reads the image tokens' places from
        # it to build M-RoPE): 1 at image tokens, 0 elsewhere
        types = (batch["input_ids"] == model.config.image_token_id).int()
        with torch.no_grad():
            hidden = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                           image_grid_thw=batch["image_grid_thw"], mm_token_type_ids=types).last_hidden_state
        theirs = F.normalize(hidden.mean(1), dim=-1)
        ours = embedder.embed([item])
        assert (theirs - ours).abs().max().item() <= 1e-5, item if isinstance(item, str) else "image + text"
