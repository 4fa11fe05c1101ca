"""A release loads in sentence-transformers as it is: SentenceTransformer(folder, trust_remote_code=True)
embeds text, images and image+text inputs as MocaEmbedder does - inputs past the folder's max_length cut
the same way -, in a process where megatron_moca cannot be imported (the module shipped in the folder
needs only torch and transformers)."""

import json
import os
import shutil
import subprocess
import sys

import torch

from helpers import child_env, write_pairs

PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"

ST_SCRIPT = r"""
import json, sys
sys.modules["megatron_moca"] = None  # the release must not need the training package
from PIL import Image
from sentence_transformers import SentenceTransformer

folder, images = sys.argv[1], sys.argv[2:]
model = SentenceTransformer(folder, trust_remote_code=True, device="cpu")
out = {
    "text": model.encode(["a harbour at dawn", "the mountain of 3 forests"]).tolist(),
    "image_text": model.encode([{"image": Image.open(images[0]), "text": "a picture"},
                                {"image": Image.open(images[1]), "text": "x <img> y"},
                                {"image": Image.open(images[2]), "text": "a horse"}]).tolist(),
    "page": model.encode([Image.open(images[0])], prompt_name="image_document").tolist(),
    # past the folder's max_length (256): text cut, an image that would be cut dropped whole (the other kept)
    "cut": model.encode(["harbour " * 400]).tolist() + model.encode([
        {"image": Image.open(images[1]), "text": "short"},
        {"image": Image.open(images[0]), "text": "forest " * 250 + "<img> tail"}]).tolist(),
    "dimension": model.get_sentence_embedding_dimension(),
}
print(json.dumps(out))
"""


def test_sentence_transformers_embeds_a_release_as_moca_embedder(tiny_hf_dir, tmp_path):
    from megatron_moca.conversion.hf_io import copy_side_files, write_embedding_settings
    from megatron_moca.embed.embedder import MocaEmbedder

    release = str(tmp_path / "release")
    shutil.copytree(tiny_hf_dir, release)
    copy_side_files(None, release)  # the tokenizer every folder we write carries
    write_embedding_settings(release, min_pixels=3136, max_pixels=12544, max_length=256)
    assert json.load(open(os.path.join(release, "modules.json")))[0]["type"] == "moca_sentence_transformers.MocaEmbedding"
    prompts = json.load(open(os.path.join(release, "config_sentence_transformers.json")))["prompts"]
    assert prompts["image_document"] == "<img>\nRepresent the given document image."
    pairs = write_pairs(tmp_path / "pairs", text_rows=1, image_rows=1)
    # three grids in one batch: 200x200 grey, 448x172 grey, 400x328 RGBA (patch grids 8x8, 4x12, 6x8 here)
    images = [os.path.join(pairs, "images", f"p{i}.png") for i in (0, 5, 4)]
    proc = subprocess.run([sys.executable, "-c", ST_SCRIPT, release, *images], capture_output=True, text=True,
                          env=child_env(), cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = {k: torch.tensor(v) if k != "dimension" else v for k, v in json.loads(proc.stdout.splitlines()[-1]).items()}
    embedder = MocaEmbedder(release, device="cpu")
    ours = {"text": embedder.embed(["a harbour at dawn", "the mountain of 3 forests"]),
            "image_text": embedder.embed([{"text": PLACEHOLDER + "a picture", "images": [images[0]]},
                                          {"text": "x " + PLACEHOLDER + " y", "images": [images[1]]},
                                          {"text": PLACEHOLDER + "a horse", "images": [images[2]]}]),
            "page": embedder.embed([{"text": PLACEHOLDER + "\nRepresent the given document image.",
                                     "images": [images[0]]}]),
            "cut": embedder.embed(["harbour " * 400, {"text": PLACEHOLDER + "short", "images": [images[1]]},
                                   {"text": "forest " * 250 + PLACEHOLDER + " tail", "images": [images[0]]}])}
    assert theirs["dimension"] == ours["text"].shape[1]
    for key, value in ours.items():
        assert theirs[key].shape == value.shape
        assert (theirs[key] - value).abs().max().item() < 1e-5, key
    assert not torch.allclose(ours["image_text"][0], ours["text"][0])  # the inputs differ, so do the vectors
    assert torch.allclose(ours["cut"][2], embedder.embed(["forest " * 250])[0], atol=1e-6)  # the image went whole
