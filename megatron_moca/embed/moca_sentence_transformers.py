"""MoCa embeddings in sentence-transformers, shipped inside every MoCa release folder.

    from sentence_transformers import SentenceTransformer
    model = SentenceTransformer("path/to/release", trust_remote_code=True)
    q = model.encode(["what does the chart show?"])
    d = model.encode([{"image": PIL.Image.open("page.png")}], prompt_name="image_document")

One module: the release's Qwen2.5-VL with bidirectional attention (every token attends to every
non-padding token of its input), mean pooling of the final hidden states (after the final norm) over
the input's tokens, L2 normalisation - MoCa's embedding. Inputs: strings, PIL images, or
{"text": ..., "image": ...} dicts. A prompt is put before the text; an image's tokens go where the
prompt or text says "<img>", else first. No chat template, no EOS. Images are resized within the
release's preprocessor_config.json bounds (what training used); inputs are cut at the release's
max_length (moca_embedding.json) as training and MocaEmbedder cut them: text at the budget, an image
that would not fit whole dropped with everything after it.

This file depends on torch and transformers only: it must load where the training package is not
installed. (The M-RoPE positions are computed here for the same reason: transformers' own helper has
changed signature across versions.)
"""

from __future__ import annotations

import json
import os
from typing import Dict, List

import torch
import torch.nn.functional as F

IMAGE_MARK = "<img>"
VISION = "<|vision_start|>{}<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"


def _image_processor(folder: str):
    try:  # transformers 5: the PIL-based processor is the one training's resize matches
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil as cls
    except ImportError:  # transformers 4: the slow processor is PIL-based
        from transformers import Qwen2VLImageProcessor as cls
    return cls.from_pretrained(folder)


def _positions(ids: torch.Tensor, valid: torch.Tensor, grids: List[List[int]], pad_id: int, merge: int):
    """[3, b, s] M-RoPE ids: text counts on; an image's tokens get (t, h, w) grid ids from where it starts,
    and the text after it continues from start + max(h, w); padding gets 0."""
    out = torch.zeros(3, *ids.shape, dtype=torch.long)
    image = 0
    for row in range(ids.shape[0]):
        tokens = ids[row][valid[row]].tolist()
        where = valid[row].nonzero().flatten()
        pos, i, cols = 0, 0, []
        while i < len(tokens):
            if tokens[i] == pad_id:
                t, h, w = grids[image]
                image += 1
                h, w = h // merge, w // merge
                grid = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij"))
                cols.append(grid.reshape(3, -1) + pos)
                pos += max(h, w)
                i += t * h * w
            else:
                cols.append(torch.full((3, 1), pos))
                pos += 1
                i += 1
        if cols:
            out[:, row, where] = torch.cat(cols, dim=1)
    return out


class MocaEmbedding(torch.nn.Module):
    """sentence-transformers module: inputs -> {"sentence_embedding": [n, hidden]} (L2-normalised)."""

    def __init__(self, model, tokenizer, image_processor, folder: str, max_length: int = 0):
        super().__init__()
        self.model, self.tokenizer, self.image_processor, self.folder = model, tokenizer, image_processor, folder
        self.merge = model.config.vision_config.spatial_merge_size
        self.pad_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        self.start_id = tokenizer.convert_tokens_to_ids("<|vision_start|>")
        self.max_length = max_length  # 0: inputs are not cut

    def _cut(self, tokens: List[int]) -> List[int]:
        """The first max_length tokens; an image block (start, pads, end) that would be cut is dropped whole
        with everything after it."""
        if not self.max_length or len(tokens) <= self.max_length:
            return tokens
        i = 0
        while i < self.max_length:
            if tokens[i] == self.start_id:
                end = i + 1
                while end < len(tokens) and tokens[end] == self.pad_id:
                    end += 1
                if end + 1 > self.max_length:
                    return tokens[:i]
                i = end + 1
            else:
                i += 1
        return tokens[:self.max_length]

    @property
    def modalities(self):
        return ["text", "image", ("image", "text")]

    @classmethod
    def load(cls, folder: str) -> "MocaEmbedding":
        from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder).model.eval()
        settings = os.path.join(folder, "moca_embedding.json")
        max_length = 0
        if os.path.isfile(settings):
            with open(settings) as f:
                max_length = int(json.load(f).get("max_length") or 0)
        return cls(model, AutoTokenizer.from_pretrained(folder), _image_processor(folder), folder, max_length)

    def save(self, output_path: str, *args, **kwargs) -> None:
        """The release folder is the saved form; saving elsewhere writes the model, tokenizer and processor."""
        if os.path.abspath(output_path) != os.path.abspath(self.folder):
            self.model.save_pretrained(output_path)
            self.tokenizer.save_pretrained(output_path)
            self.image_processor.save_pretrained(output_path)

    def get_embedding_dimension(self) -> int:
        return self.model.config.text_config.hidden_size

    get_sentence_embedding_dimension = get_embedding_dimension  # sentence-transformers before 6

    def _text_and_image(self, item, prompt: str):
        if isinstance(item, str):
            text, image = item, None
        elif isinstance(item, dict):
            text, image = item.get("text", ""), item.get("image")
        else:  # a PIL image
            text, image = "", item
        text = (prompt or "") + text
        if image is None:
            return text.replace(IMAGE_MARK, ""), None
        if IMAGE_MARK not in text:
            text = IMAGE_MARK + text
        if isinstance(image, str):
            from PIL import Image

            image = Image.open(image)
        return text.replace(IMAGE_MARK, "\0", 1).replace(IMAGE_MARK, ""), image.convert("RGB")

    def preprocess(self, inputs, prompt: str = None, **kwargs) -> Dict[str, torch.Tensor]:
        pairs = [self._text_and_image(item, prompt) for item in inputs]
        images = [image for _, image in pairs if image is not None]
        features: Dict[str, torch.Tensor] = {}
        texts = [text for text, _ in pairs]
        if images:
            processed = self.image_processor(images=images, return_tensors="pt")
            features["pixel_values"] = processed["pixel_values"]
            features["image_grid_thw"] = processed["image_grid_thw"]
            counts = iter((features["image_grid_thw"].prod(-1) // self.merge ** 2).tolist())
            texts = [text.replace("\0", VISION.format(IMAGE_PAD * next(counts))) if image is not None else text
                     for text, image in pairs]
        encoded = [self._cut(self.tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts]
        if images:  # the pixels of the images that were kept
            kept = [ids.count(self.start_id) for ids in encoded]
            grids = features["image_grid_thw"]
            patches = grids.prod(-1).tolist()
            keep_images, keep_patches, image, offset = [], [], 0, 0
            for (_, item_image), n in zip(pairs, kept):
                if item_image is None:
                    continue
                if n:
                    keep_images.append(image)
                    keep_patches.append(torch.arange(offset, offset + patches[image]))
                offset += patches[image]
                image += 1
            if keep_images:
                features["pixel_values"] = features["pixel_values"][torch.cat(keep_patches)]
                features["image_grid_thw"] = grids[keep_images]
            else:
                del features["pixel_values"], features["image_grid_thw"]
        length = max(len(ids) for ids in encoded)
        ids = torch.full((len(encoded), length), self.tokenizer.pad_token_id or 0, dtype=torch.long)
        valid = torch.zeros(len(encoded), length, dtype=torch.bool)
        for row, tokens in enumerate(encoded):
            ids[row, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            valid[row, :len(tokens)] = True
        features.update(input_ids=ids, attention_mask=valid.long())
        return features

    tokenize = preprocess  # sentence-transformers before 5.2 call it this

    def forward(self, features: Dict[str, torch.Tensor], **kwargs) -> Dict[str, torch.Tensor]:
        ids, valid = features["input_ids"], features["attention_mask"].bool()
        grid = features.get("image_grid_thw")
        positions = _positions(ids.cpu(), valid.cpu(), grid.tolist() if grid is not None else [], self.pad_id,
                               self.merge).to(ids.device)
        n, s = ids.shape
        attend = valid[:, None, None, :].expand(n, 1, s, s)  # bidirectional: padding is all that is hidden
        pixels = features.get("pixel_values")
        hidden = self.model(input_ids=ids, attention_mask=attend, position_ids=positions,
                            pixel_values=None if pixels is None else pixels.to(self.model.dtype),
                            image_grid_thw=grid).last_hidden_state
        weights = valid.to(hidden.dtype)[..., None]
        mean = (hidden * weights).sum(1) / weights.sum(1)
        features["sentence_embedding"] = F.normalize(mean.float(), dim=-1)
        return features


if __name__ == "__main__":  # a quick look: python moca_sentence_transformers.py RELEASE "some text"
    import sys

    module = MocaEmbedding.load(sys.argv[1])
    print(json.dumps(module(module.preprocess(sys.argv[2:]))["sentence_embedding"][:, :4].tolist()))
