"""Device-side completion of the loader's uint8 images (torch; runs where the model runs).

images_to_frames: decoded uint8 [H, W, C] images (image_pipeline "device_resize") -> one-frame rows, with Pillow's
exact bicubic (data/resize.py) where an image is not yet at its target size.
frames_to_pixels: uint8 one-frame rows [N, 588] -> processor rows [N, 1176] (CLIP-normalised with the
same 256-entry tables as the CPU path, so bit-identical to HF's processor in float32).
mae_inputs: apply MoCa's MAE noise to the masked merge groups and return the clean targets.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import torch

from megatron_moca.data.image_processing import _TABLE


def patchify_frame_torch(image: torch.Tensor, patch_size: int = 14, merge_size: int = 2) -> torch.Tensor:
    """[H, W, 3] uint8 (any device) -> [N, 3*P*P] one-frame rows in 2x2-merge order (as patchify_frame)."""
    p, m = patch_size, merge_size
    h, w, c = image.shape
    gh, gw = h // p, w // p
    x = image.reshape(gh // m, m, p, gw // m, m, p, c).permute(0, 3, 1, 4, 6, 2, 5)
    return x.reshape(gh * gw, c * p * p)


def images_to_frames(images: Sequence[torch.Tensor], image_grid_thw: torch.Tensor, patch_size: int = 14,
                     merge_size: int = 2, device=None) -> torch.Tensor:
    """Decoded uint8 [H, W, C] images (C = 1 grey or 3 RGB) -> one-frame rows [N, 3*P*P] for the grids
    given, resized exactly as Pillow's bicubic (grey resized before its expansion to RGB, as on the CPU)."""
    from megatron_moca.data.resize import resize_bicubic

    rows = []
    for image, (_, gh, gw) in zip(images, image_grid_thw.tolist()):
        image = resize_bicubic(image.to(device), gh * patch_size, gw * patch_size)
        if image.shape[2] == 1:
            image = image.expand(-1, -1, 3)
        rows.append(patchify_frame_torch(image, patch_size, merge_size))
    return torch.cat(rows)


def frames_to_pixels(frames: torch.Tensor, temporal_patch_size: int = 2, dtype=torch.float32) -> torch.Tensor:
    n, width = frames.shape
    per = width // 3
    table = torch.from_numpy(_TABLE).to(frames.device)
    vals = table[torch.arange(3, device=frames.device)[None, :, None], frames.view(n, 3, per).long()]
    return vals[:, :, None, :].expand(n, 3, temporal_patch_size, per).reshape(n, -1).to(dtype)


def mae_inputs(pixels: torch.Tensor, image_grid_thw: torch.Tensor, groups: torch.Tensor, noise: torch.Tensor,
               merge_unit: int = 4) -> Tuple[torch.Tensor, torch.Tensor]:
    """(noised pixels [N, D], targets [n_masked, merge_unit * D]).

    groups: bool per merge group (= per image token, images in order); noise: [n_images, D], the
    shared noise vector of each image's document (one vector per document, repeated per image).
    """
    per_image = (image_grid_thw.prod(-1) // merge_unit).to(pixels.device)
    image_of_group = torch.repeat_interleave(torch.arange(len(per_image), device=pixels.device), per_image)
    grouped = pixels.view(-1, merge_unit, pixels.shape[1])
    targets = grouped[groups].reshape(-1, merge_unit * pixels.shape[1])
    noised = torch.where(groups[:, None, None], noise[image_of_group][:, None, :].to(pixels.dtype), grouped)
    return noised.reshape(pixels.shape), targets
