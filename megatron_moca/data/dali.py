"""Image decoding with NVIDIA DALI: nvJPEG / hardware JPEG decode on the GPU ("mixed"), CPU otherwise.

The loader can hand encoded image bytes to the training process instead of pixels
(Stage1SampleConfig.image_pipeline="dali"); `DaliImageDecoder` then decodes and resizes a whole batch
of images in one DALI pipeline run and returns the same uint8 one-frame rows as the CPU path
(`image_processing.image_frames`), on the device, ready for `pixels.frames_to_pixels`.
Target sizes come from the images' headers (smart_resize, computed before decoding), so the number
of image tokens is known to the loader without decoding.

Tolerance (uint8 levels, per image, against the HF-identical CPU path): mean |diff| <= 0.5, at most
0.5% of values differ by more than 8, max |diff| <= 24. DALI's antialiased cubic resize and PIL's
bicubic differ only at hard edges: on scikit-image's 26 real images (DALI 2.4.0, CPU operators) the
mean was <= 0.22, the max 17 (phantom.png, a synthetic image of sharp edges; 0.13% of its values
above 8). tests/data/test_dali.py asserts this tolerance. The CPU path stays bit-identical to HF.
nvidia-dali is optional (extra `gpu`); importing this module does not import it.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from megatron_moca.data.image_processing import ImageError, ImageProcessingConfig, target_size
from megatron_moca.data.pixels import patchify_frame_torch


def dali_available() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except (ImportError, ValueError):
        return False


def image_graph(decode_device: str, resize_device: str):
    """The decode + resize graph (inside a pipeline definition): encoded bytes and each image's target
    (height, width) fed from Python. The target size is a named argument, and DALI takes named argument
    inputs from the CPU only ("Named arguments must be on CPU", nvidia/dali/ops/__init__.py), so it stays there
    while the images move to the GPU in the "mixed" decoder."""
    from nvidia.dali import fn, types

    encoded = fn.external_source(name="encoded", dtype=types.UINT8)
    size = fn.external_source(name="size", dtype=types.FLOAT)
    image = fn.decoders.image(encoded, device=decode_device, output_type=types.RGB)
    return fn.resize(image, device=resize_device, size=size, interp_type=types.INTERP_CUBIC, antialias=True)


def build_pipeline(device_id: Optional[int], max_batch: int, num_threads: int):
    """The built pipeline: GPU decode ("mixed") and resize on `device_id`, or the CPU operators (None). Where
    the simulated tier asks for it and CUDA is absent, standins/dali_gpu.py stands in for the GPU one."""
    from nvidia.dali import pipeline_def

    from megatron_moca import standins

    options = dict(batch_size=max_batch, num_threads=num_threads, prefetch_queue_depth=1)
    if device_id is not None and standins.enabled("dali_gpu"):
        from megatron_moca.standins.dali_gpu import GpuPipelineStandin

        return GpuPipelineStandin(image_graph, ("mixed", "gpu"), device_id, options)
    placement = ("mixed", "gpu") if device_id is not None else ("cpu", "cpu")
    pipe = pipeline_def(image_graph, device_id=device_id, **options)(*placement)
    pipe.build()
    return pipe


class DaliImageDecoder:
    """Decode + resize batches of encoded images with one DALI pipeline (GPU when `device_id` is set)."""

    def __init__(self, cfg: ImageProcessingConfig = ImageProcessingConfig(), max_batch: int = 64,
                 device_id: Optional[int] = None, num_threads: int = 2):
        self.cfg, self.device_id, self.max_batch = cfg, device_id, max_batch
        self.pipe = build_pipeline(device_id, max_batch, num_threads)

    def __call__(self, images: Sequence[bytes]) -> List[Tuple[torch.Tensor, Tuple[int, int, int]]]:
        """(uint8 one-frame rows [N, 588], grid_thw) per image, on the decoder's device."""
        out = []
        for start in range(0, len(images), self.max_batch):
            chunk = list(images[start:start + self.max_batch])
            sizes = [np.asarray(target_size(b, self.cfg), dtype=np.float32) for b in chunk]
            self.pipe.feed_input("encoded", [np.frombuffer(b, dtype=np.uint8) for b in chunk])
            self.pipe.feed_input("size", sizes)
            (batch,) = self.pipe.run()
            for i, size in enumerate(sizes):
                tensor = _to_torch(batch, i, self.device_id)
                h, w = int(size[0]), int(size[1])
                if tuple(tensor.shape[:2]) != (h, w):
                    raise ImageError(f"DALI produced {tuple(tensor.shape[:2])}, expected {(h, w)}")
                out.append((patchify_frame_torch(tensor, self.cfg.patch_size, self.cfg.merge_size),
                            (1, h // self.cfg.patch_size, w // self.cfg.patch_size)))
        return out


def _to_torch(batch, index: int, device_id: Optional[int]) -> torch.Tensor:
    if device_id is None:
        return torch.from_numpy(np.array(batch.at(index)))
    return torch.from_dlpack(batch[index]).clone()  # GPU tensor, copied out of DALI's buffer
