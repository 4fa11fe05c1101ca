"""Stage-1 samples: a Document -> token ids with image pads, MLM and MAE masking, M-RoPE positions;
and packing of several samples into one sequence with document boundaries.

Layout of one image in the token stream: <|vision_start|> + (t*h*w/4) x <|image_pad|> + <|vision_end|>.
Truncation at `max_length` cuts text at the budget and drops an image that does not fit whole (with
everything after it), as the reference does; whether an image fits is read from its header, so a
dropped image is never decoded. Image tokens, in sequence order, are the merge groups of
the images in order, so `mae_token_mask` (per token) and the MAE group mask agree by construction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np
import torch

from megatron_moca.data.documents import Document, DocumentError
from megatron_moca.data.image_processing import (ImageError, ImageProcessingConfig, decode_rgb_or_grey,
                                                  decoded_pixels, grid_of, image_frames, load_and_resize,
                                                  resized_size)
from megatron_moca.models.rope_index import get_rope_index
from megatron_moca.objectives.masking import IGNORE_INDEX, mae_group_mask, mlm_mask


@dataclass
class Stage1SampleConfig:
    """How documents become stage-1 training samples (MoCa reference values as defaults)."""

    max_length: int = 1280
    """Tokens per document after truncation."""
    mlm_probability: float = 0.4
    """Probability of masking each non-special text token."""
    mae_probability: float = 0.5
    """Probability of noising each 2x2 merge group (one LLM image token)."""
    image: ImageProcessingConfig = field(default_factory=ImageProcessingConfig)
    """Image resizing limits (256..1024 visual tokens per image)."""
    image_pipeline: str = "auto"
    """Where images become pixels (see IMAGE_PIPELINES / resolve_image_pipeline):
    cpu            the loader decodes, resizes (PIL) and patchifies; bit-identical to the HF processor.
    device_resize  the loader only decodes; `PackedBatch.model_inputs` resizes on the device with
                   Pillow's bicubic reproduced exactly in torch (data/resize.py): still bit-identical,
                   ~4.5x less CPU per image. Images above `device_resize_max_area` times their target
                   area are resized on the CPU (same bytes), so huge decoded images never travel.
    dali           the loader hands encoded bytes on; the trainer decodes + resizes them with DALI
                   (nvJPEG on the GPU, data/dali.py) within DALI's documented resize tolerance; grids
                   come from the image headers. For shards written by `moca data prepare` / `demo`,
                   whose images were fully decoded once when the shards were written.
    auto           dali with CUDA and DALI, device_resize with CUDA only, cpu otherwise."""
    device_resize_max_area: float = 4.0
    """device_resize: the largest source/target area ratio resized on the device."""


@dataclass
class Stage1Sample:
    key: str
    input_ids: np.ndarray  # [L] int64, MLM-masked
    labels: np.ndarray  # [L] int64, original id at MLM-masked positions, IGNORE_INDEX elsewhere
    position_ids: np.ndarray  # [3, L] M-RoPE ids of this document alone
    pixel_frames: np.ndarray  # [N, 588] uint8 one-frame rows (clean; see data/pixels.py)
    image_grid_thw: np.ndarray  # [n_images, 3]
    mae_token_mask: np.ndarray  # [L] bool, image tokens whose merge group is noised
    mae_noise: np.ndarray  # [1176] float32, the document's one shared noise vector
    encoded_images: List[bytes] = field(default_factory=list)  # image_pipeline dali: instead of frames
    device_images: List[np.ndarray] = field(default_factory=list)  # device_resize: uint8 [H, W, C]

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


IMAGE_PIPELINES = ("auto", "cpu", "device_resize", "dali")


def resolve_image_pipeline(requested: str) -> str:
    """The concrete image pipeline for `requested` on this machine (auto: dali > device_resize > cpu)."""
    from megatron_moca.data.dali import dali_available

    if requested not in IMAGE_PIPELINES:
        raise ValueError(f"image_pipeline={requested!r}: expected one of {IMAGE_PIPELINES}")
    if requested == "auto":
        if torch.cuda.is_available():
            return "dali" if dali_available() else "device_resize"
        return "cpu"
    if requested == "dali" and not dali_available():
        raise ValueError("image_pipeline='dali' needs nvidia-dali (extra 'gpu'); use 'device_resize' or 'cpu'")
    return requested


class Stage1SampleBuilder:
    def __init__(self, tokenizer, cfg: Stage1SampleConfig = Stage1SampleConfig()):
        self.tok, self.cfg = tokenizer, cfg
        self.pipeline = resolve_image_pipeline(cfg.image_pipeline)
        self.merge_unit = cfg.image.merge_size**2
        self._vision_ids = {tokenizer.image_pad_id, tokenizer.vision_start_id, tokenizer.vision_end_id,
                            tokenizer.special.get("<|video_pad|>", -1), tokenizer.special.get("<|vision_pad|>", -1)}

    def build(self, doc: Document, rng: np.random.Generator) -> Stage1Sample:
        """Raise DocumentError (with the reason) for documents that cannot be used."""
        ids: List[int] = []
        frames, grids, encoded, device_images = [], [], [], []
        budget = self.cfg.max_length
        for seg in doc.segments:
            if len(ids) >= budget:
                break
            if isinstance(seg, str):
                text_ids = self.tok.encode(seg)
                if self._vision_ids.intersection(text_ids):
                    # a stray <|image_pad|> etc. in text would desynchronise tokens and images
                    raise DocumentError("text contains vision special tokens outside an image placeholder", "bad_text")
                ids += text_ids[:budget - len(ids)]
                continue
            data = doc.images[seg]
            try:
                # the grid comes from the header: an image cut by the budget is never decoded
                grid = grid_of(data, self.cfg.image)
                n = grid[0] * grid[1] * grid[2] // self.merge_unit
                if len(ids) + n + 2 > budget:
                    break  # the image would be cut: drop it whole, and what follows
                if self.pipeline == "dali":
                    encoded.append(data)
                elif self.pipeline == "device_resize":
                    self._device_image(data, device_images)
                else:
                    rows, decoded_grid = image_frames(data, self.cfg.image)
                    if decoded_grid != grid:
                        raise ImageError(f"decoded to grid {decoded_grid}, its header says {grid}")
                    frames.append(rows)
            except ImageError as e:
                raise DocumentError(f"image {seg}: {e}", "bad_image") from None
            ids += [self.tok.vision_start_id] + [self.tok.image_pad_id] * n + [self.tok.vision_end_id]
            grids.append(grid)
        if not ids:
            raise DocumentError("no tokens after tokenisation", "bad_text")
        ids_np = np.asarray(ids, dtype=np.int64)
        input_ids, labels = mlm_mask(ids_np, self.tok.special_ids, self.tok.mask_id, self.cfg.mlm_probability, rng)
        grid_np = np.asarray(grids, dtype=np.int64).reshape(-1, 3)
        position_ids = get_rope_index(torch.from_numpy(ids_np)[None], torch.from_numpy(grid_np) if grids else None,
                                      image_token_id=self.tok.image_pad_id,
                                      spatial_merge_size=self.cfg.image.merge_size)[0][:, 0].numpy()
        image_slots = ids_np == self.tok.image_pad_id
        frame_dim = 3 * self.cfg.image.patch_size**2
        all_frames = np.concatenate(frames) if frames else np.zeros((0, frame_dim), dtype=np.uint8)
        groups = mae_group_mask(int(image_slots.sum()), self.cfg.mae_probability, rng)
        noise = rng.standard_normal(frame_dim * self.cfg.image.temporal_patch_size).astype(np.float32)
        token_mask = np.zeros(len(ids), dtype=bool)
        token_mask[image_slots] = groups
        return Stage1Sample(doc.key, input_ids, labels, position_ids, all_frames, grid_np, token_mask, noise, encoded,
                            device_images)

    def _device_image(self, data: bytes, out: List[np.ndarray]) -> None:
        """Decode for device_resize; appends the uint8 [H, W, C] payload to `out`."""
        cfg = self.cfg.image
        image = decode_rgb_or_grey(data, cfg)
        h, w = resized_size(image.height, image.width, cfg)
        if image.height * image.width > self.cfg.device_resize_max_area * h * w:
            out.append(load_and_resize(image, cfg))  # huge source: PIL on the CPU, the same bytes
        else:
            out.append(decoded_pixels(image, cfg))


@dataclass
class PackedBatch:
    """Several samples in one row: the model's batch convention plus the stage-1 targets."""

    keys: List[str]
    input_ids: torch.Tensor  # [1, T]
    labels: torch.Tensor  # [1, T]
    document_ids: torch.Tensor  # [1, T], -1 = padding
    position_ids: torch.Tensor  # [3, 1, T]
    pixel_frames: Optional[torch.Tensor]  # [N, 588] uint8
    image_grid_thw: Optional[torch.Tensor]  # [n, 3]
    mae_token_mask: torch.Tensor  # [1, T]
    mae_noise: Optional[torch.Tensor]  # [n, 1176]: each image's document noise vector
    image_token_id: int = 151655
    encoded_images: List[bytes] = field(default_factory=list)  # dali: one per image, in order
    device_images: List[torch.Tensor] = field(default_factory=list)  # device_resize: one per image, in order

    def model_inputs(self, device=None, dtype=torch.float32, image_decoder=None):
        """What the model and the MAE loss consume, on `device`: the batch convention of MocaVLM plus
        noised pixel_values and the clean targets of the noised groups (data/pixels.py).
        image_decoder (e.g. data.dali.DaliImageDecoder) decodes `encoded_images` when the loader
        left decoding to the device."""
        return complete_inputs(self.compact_inputs(device, image_decoder), dtype, self.image_token_id)

    def compact_inputs(self, device=None, image_decoder=None) -> dict:
        """The row with its images as uint8 one-frame rows on `device` (decoded and resized here where the
        loader left that to the device): the compact form a trainer sends to the ranks of its replica,
        which finish it with complete_inputs (cheap, elementwise)."""
        from megatron_moca.data.pixels import images_to_frames

        frames = self.pixel_frames
        if self.encoded_images:
            if image_decoder is None:
                raise ValueError("this batch carries encoded images (image_pipeline 'dali'): pass image_decoder")
            decoded = image_decoder(self.encoded_images)
            grids = torch.tensor([g for _, g in decoded])
            if not torch.equal(grids, self.image_grid_thw):
                raise ValueError("decoded image grids differ from the loader's header-based grids")
            frames = torch.cat([f.to(device) for f, _ in decoded])
        elif self.device_images:
            frames = images_to_frames(self.device_images, self.image_grid_thw, device=device)
        out = {"input_ids": self.input_ids.to(device), "position_ids": self.position_ids.to(device),
               "document_ids": self.document_ids.to(device), "labels": self.labels.to(device),
               "mae_token_mask": self.mae_token_mask.to(device), "frames": None, "image_grid_thw": None,
               "mae_noise": None}
        if frames is not None:
            out.update(frames=frames.to(device), image_grid_thw=self.image_grid_thw.to(device),
                       mae_noise=self.mae_noise.to(device))
        return out


def complete_inputs(compact: dict, dtype=torch.float32, image_token_id: int = 151655) -> dict:
    """A compact micro-batch (PackedBatch.compact_inputs, or several collated) -> the model inputs: the frames
    CLIP-normalised into pixel_values with MoCa's MAE noise on the masked groups, and the clean targets of
    those groups (data/pixels.py). Keys that are absent (a rank that was not sent them) stay None."""
    from megatron_moca.data.pixels import frames_to_pixels, mae_inputs

    out = {k: v for k, v in compact.items() if k not in ("frames", "mae_noise")}
    out.update(pixel_values=None, mae_targets=None)
    frames = compact.get("frames")
    if frames is not None:
        pixels = frames_to_pixels(frames, dtype=torch.float32)
        ids, mask = compact["input_ids"], compact["mae_token_mask"]
        groups = mask[ids == image_token_id]
        noised, targets = mae_inputs(pixels, compact["image_grid_thw"], groups, compact["mae_noise"])
        out.update(pixel_values=noised.to(dtype), mae_targets=targets.to(dtype))
    return out


def pack(samples: List[Stage1Sample], length: int, pad_id: int, pad_to_multiple: int = 1,
         image_token_id: int = 151655) -> PackedBatch:
    """Concatenate samples (in order) into one row of `length` tokens (rounded up to a multiple, e.g.
    16 for FP8), padding with pad_id / document id -1."""
    total = sum(len(s) for s in samples)
    if total > length:
        raise ValueError(f"{total} tokens do not fit a packed row of {length}")
    length = -(-length // pad_to_multiple) * pad_to_multiple
    pad = length - total

    def cat(parts, fill, dtype):
        return torch.from_numpy(np.concatenate(parts + [np.full(pad, fill, dtype=dtype)]))[None]

    docs = [np.full(len(s), i, dtype=np.int64) for i, s in enumerate(samples)]
    positions = np.concatenate([s.position_ids for s in samples] + [np.zeros((3, pad), dtype=np.int64)], axis=1)
    with_images = [s for s in samples if s.image_grid_thw.shape[0]]
    images = bool(with_images)
    on_device = any(s.encoded_images or s.device_images for s in with_images)
    return PackedBatch(
        keys=[s.key for s in samples],
        input_ids=cat([s.input_ids for s in samples], pad_id, np.int64),
        labels=cat([s.labels for s in samples], IGNORE_INDEX, np.int64),
        document_ids=cat(docs, -1, np.int64),
        position_ids=torch.from_numpy(positions)[:, None],
        pixel_frames=torch.from_numpy(np.concatenate([s.pixel_frames for s in with_images]))
        if images and not on_device else None,
        image_grid_thw=torch.from_numpy(np.concatenate([s.image_grid_thw for s in with_images])) if images else None,
        mae_token_mask=cat([s.mae_token_mask for s in samples], False, bool),
        mae_noise=torch.from_numpy(np.concatenate([np.repeat(s.mae_noise[None], s.image_grid_thw.shape[0], 0)
                                                   for s in with_images])) if images else None,
        image_token_id=image_token_id, encoded_images=[b for s in samples for b in s.encoded_images],
        # PIL's arrays are read-only (torch warns); arrays that came through a worker queue are not
        device_images=[torch.from_numpy(np.require(a, requirements="W")) for s in samples for a in s.device_images])


class GreedyPacker:
    """Fills rows of `length` tokens with consecutive samples; a sample that does not fit starts the
    next row. Deterministic; its only state is the sample carried over (for exact resume)."""

    def __init__(self, length: int, pad_id: int, pad_to_multiple: int = 1, image_token_id: int = 151655):
        self.length, self.pad_id, self.pad_to_multiple = length, pad_id, pad_to_multiple
        self.image_token_id = image_token_id
        self.pending: List[Stage1Sample] = []

    def add(self, sample: Stage1Sample) -> Optional[PackedBatch]:
        """Add a sample; return a full row when this sample does not fit the current one."""
        if len(sample) > self.length:
            raise ValueError(f"sample {sample.key} has {len(sample)} tokens, more than a row of {self.length}")
        if sum(len(s) for s in self.pending) + len(sample) <= self.length:
            self.pending.append(sample)
            return None
        row = pack(self.pending, self.length, self.pad_id, self.pad_to_multiple, self.image_token_id)
        self.pending = [sample]
        return row

    def flush(self) -> Optional[PackedBatch]:
        if not self.pending:
            return None
        row = pack(self.pending, self.length, self.pad_id, self.pad_to_multiple, self.image_token_id)
        self.pending = []
        return row
