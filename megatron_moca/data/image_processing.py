"""Qwen2.5-VL image preprocessing on the CPU, equal to transformers' Qwen2VLImageProcessor (PIL).

decode (PIL; libjpeg-turbo) -> RGB -> smart_resize (multiple of 28, min/max pixels) with PIL bicubic
-> patch rows in 2x2-merge order -> CLIP normalisation -> float32 [N, 1176] + grid.
The loader's path (`image_frames`) stops at uint8 one-frame rows [N, 588]: 8x fewer bytes than the
processor's float32 rows, no float passes on the CPU. `expand_frames` (numpy) and
`pixels.frames_to_pixels` (torch, on the device) finish the job with a per-channel 256-entry table
computed with exactly HF's float operations (float64 rescale cast to float32, then float32
(x - mean) / std), so the result is bit-identical to the HF processor, not merely close.
Decompression bombs are refused before decoding (pixel limit), as are corrupt files.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Tuple

import numpy as np

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageError(ValueError):
    """An image that cannot be used (corrupt, truncated, too large, absurd aspect ratio)."""


class ImageTooLarge(ImageError):
    """The header claims more pixels than the decode limit (a decompression bomb?)."""


@dataclass(frozen=True)
class ImageProcessingConfig:
    """Qwen2.5-VL processor settings (MoCa: 256..1024 visual tokens per image)."""

    min_pixels: int = 256 * 28 * 28
    """Smallest resized area in pixels."""
    max_pixels: int = 1024 * 28 * 28
    """Largest resized area in pixels."""
    patch_size: int = 14
    """ViT patch side in pixels."""
    temporal_patch_size: int = 2
    """Frames per patch (a still image is repeated)."""
    merge_size: int = 2
    """Patches merged per side into one LLM token."""
    max_decode_pixels: int = 64 * 2**20
    """Refuse images whose header claims more pixels than this (decompression bombs)."""


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 14 * 14 * 4 * 1280) -> Tuple[int, int]:
    """Target (height, width): multiples of `factor`, area within [min, max], aspect kept (Qwen's rule)."""
    if max(height, width) / min(height, width) > 200:
        raise ImageError(f"aspect ratio {max(height, width) / min(height, width):.0f} exceeds 200")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def resized_size(height: int, width: int, cfg: ImageProcessingConfig) -> Tuple[int, int]:
    """(height, width) an image of this size is resized to under `cfg` (smart_resize, factor 28)."""
    return smart_resize(height, width, cfg.patch_size * cfg.merge_size, cfg.min_pixels, cfg.max_pixels)


def image_tokens(height: int, width: int, cfg: ImageProcessingConfig) -> int:
    """LLM tokens of one image of this size: its merged patches plus <|vision_start|>/<|vision_end|>."""
    h, w = resized_size(height, width, cfg)
    return (h // cfg.patch_size) * (w // cfg.patch_size) // cfg.merge_size**2 + 2


def _normalisation_table() -> np.ndarray:
    """[3, 256] float32: HF's rescale (float64 * 1/255 -> float32) then (x - mean) / std in float32."""
    scaled = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
    mean, std = np.array(CLIP_MEAN, dtype=np.float32), np.array(CLIP_STD, dtype=np.float32)
    return ((scaled[None, :] - mean[:, None]) / std[:, None]).astype(np.float32)


_TABLE = _normalisation_table()


def open_image(data, cfg: ImageProcessingConfig = ImageProcessingConfig()):
    """Bytes (or a binary file object) -> PIL image with only its header read; ImageError for unreadable
    headers, ImageTooLarge for more pixels than cfg.max_decode_pixels (checked before any decoding)."""
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data)
    except Image.DecompressionBombError:
        raise ImageTooLarge("the header exceeds PIL's decompression-bomb limit") from None
    except Exception as e:  # PIL raises many types for bad headers
        raise ImageError(f"undecodable image ({type(e).__name__})") from None  # the type only: a stable reason
    if img.width * img.height > cfg.max_decode_pixels:
        raise ImageTooLarge(f"{img.width}x{img.height} exceeds the decode limit of {cfg.max_decode_pixels} pixels")
    return img


def target_size(data: bytes, cfg: ImageProcessingConfig = ImageProcessingConfig()) -> Tuple[int, int]:
    """(height, width) after smart_resize, from the image header alone; ImageError for bad headers."""
    with open_image(data, cfg) as img:
        return resized_size(img.height, img.width, cfg)


def grid_of(data: bytes, cfg: ImageProcessingConfig = ImageProcessingConfig()) -> Tuple[int, int, int]:
    """grid_thw of an image from its header alone (what decoding and resizing it will give)."""
    h, w = target_size(data, cfg)
    return 1, h // cfg.patch_size, w // cfg.patch_size


def decode_image(data: bytes, cfg: ImageProcessingConfig = ImageProcessingConfig()):
    """Bytes -> decoded PIL image (its own mode); ImageError for corrupt, truncated or oversized images."""
    from PIL import Image

    img = open_image(data, cfg)
    try:
        img.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"undecodable image ({type(e).__name__})") from None
    return img


def patchify_frame(pixels: np.ndarray, cfg: ImageProcessingConfig) -> Tuple[np.ndarray, Tuple[int, int, int]]:
    """[H, W, 3] uint8 -> ([N, 3 * P * P] uint8 one-frame rows in the processor's 2x2-merge order, grid_thw).

    A still image is T identical frames in the processor's rows; the copy is left to `expand_frames`
    (on the device in training), so the loader moves half the bytes."""
    p, m = cfg.patch_size, cfg.merge_size
    h, w, c = pixels.shape
    gh, gw = h // p, w // p
    x = pixels.reshape(gh // m, m, p, gw // m, m, p, c).transpose(0, 3, 1, 4, 6, 2, 5)  # (.., m, m, c, p, p)
    return np.ascontiguousarray(x).reshape(gh * gw, c * p * p), (1, gh, gw)


def expand_frames(frames: np.ndarray, cfg: ImageProcessingConfig = ImageProcessingConfig()) -> np.ndarray:
    """uint8 one-frame rows [N, 3*P*P] -> float32 processor rows [N, 3*T*P*P], CLIP-normalised exactly as
    HF does (table lookup of HF's float ops), each channel's frame repeated T times."""
    n, t = frames.shape[0], cfg.temporal_patch_size
    per = frames.shape[1] // 3
    x = frames.reshape(n, 3, per)
    out = np.empty((n, 3, t, per), dtype=np.float32)
    for c in range(3):
        np.take(_TABLE[c], x[:, c], out=out[:, c, 0])
    out[:, :, 1:] = out[:, :, :1]
    return out.reshape(n, 3 * t * per)


def decode_rgb_or_grey(data, cfg: ImageProcessingConfig = ImageProcessingConfig()):
    """Encoded bytes (or a PIL image) -> decoded PIL image in mode RGB or L (what gets resized)."""
    from PIL import Image

    img = data if isinstance(data, Image.Image) else decode_image(data, cfg)
    return img if img.mode in ("RGB", "L") else img.convert("RGB")


def decoded_pixels(data, cfg: ImageProcessingConfig = ImageProcessingConfig()) -> np.ndarray:
    """Encoded bytes (or a PIL image) -> uint8 [H, W, C] at the original size, C = 1 (grey) or 3 (RGB): the
    loader's payload with image_pipeline 'device_resize' (the device resizes with data/resize.py, exactly as PIL)."""
    pixels = np.asarray(decode_rgb_or_grey(data, cfg))
    return pixels[..., None] if pixels.ndim == 2 else pixels


def load_and_resize(data, cfg: ImageProcessingConfig):
    """Encoded bytes (or a PIL image) -> resized RGB uint8 array [H, W, 3] (PIL bicubic, as HF)."""
    from PIL import Image

    img = decode_rgb_or_grey(data, cfg)
    h, w = resized_size(img.height, img.width, cfg)
    if (h, w) != (img.height, img.width):
        # resampling is per channel, so a grey image resized before its expansion to RGB gives the
        # same bytes as HF's convert-then-resize, for a third of the work
        img = img.resize((w, h), resample=Image.BICUBIC)
    if img.mode == "L":
        img = img.convert("RGB")
    return np.asarray(img)


def image_frames(data, cfg: ImageProcessingConfig = ImageProcessingConfig()):
    """The loader's CPU path: bytes -> (uint8 one-frame rows [N, 588], grid_thw). No float work."""
    return patchify_frame(load_and_resize(data, cfg), cfg)


def process_image(data, cfg: ImageProcessingConfig = ImageProcessingConfig()):
    """Bytes -> (float32 rows [N, 1176], grid_thw): bit-identical to transformers' Qwen2-VL processor."""
    frames, grid = image_frames(data, cfg)
    return expand_frames(frames, cfg), grid
