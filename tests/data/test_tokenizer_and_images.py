"""The real Qwen vocabulary, and image processing bit-identical to transformers' Qwen2-VL processor."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from megatron_moca.data.image_processing import ImageError, ImageProcessingConfig, decode_image, process_image, smart_resize


def test_tokenizer_check_values(tokenizer):
    assert tokenizer.encode("Hello, world!") == [9707, 11, 1879, 0]
    text = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is this?<|im_end|>"
    assert tokenizer.encode(text) == [151644, 872, 198, 151652, 151655, 151653, 3838, 374, 419, 30, 151645]
    assert tokenizer.encode("<|mask|>") == [151665] and tokenizer.mask_id == 151665
    sample = "naïve café — 中文 😀 and tabs\tand\nnewlines"
    assert tokenizer.decode(tokenizer.encode(sample)) == sample


def test_ranks_file_is_the_pinned_one():
    import hashlib

    from megatron_moca.data.tokenizer import RANKS_MD5, _ranks_path

    assert hashlib.md5(open(_ranks_path(), "rb").read()).hexdigest() == RANKS_MD5


def hf_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=256 * 28 * 28, max_pixels=1024 * 28 * 28)


def odd_crops(path):
    """The image itself and two crops of odd sizes."""
    img = Image.open(path).convert("RGB")
    yield img
    yield img.crop((3, 1, min(img.width, 3 + 333), min(img.height, 1 + 517)))
    yield img.crop((0, 0, max(29, img.width // 3 | 1), max(29, img.height // 5 | 1)))


def test_equals_transformers_processor_on_real_images(real_images):
    proc, checked = hf_processor(), 0
    for path in real_images:
        for img in odd_crops(path):
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            ref = proc(images=[img], return_tensors="np")
            rows, grid = process_image(buf.getvalue())
            assert list(ref["image_grid_thw"][0]) == list(grid), path
            assert np.array_equal(ref["pixel_values"], rows), path  # bit-identical, not merely close
            checked += 1
    assert checked >= 60


def test_jpeg_bytes_equal_processor_on_pil_decode(real_images):
    proc = hf_processor()
    for path in [p for p in real_images if p.endswith(".jpg")]:
        data = open(path, "rb").read()
        ref = proc(images=[Image.open(io.BytesIO(data)).convert("RGB")], return_tensors="np")
        rows, _ = process_image(data)
        assert np.array_equal(ref["pixel_values"], rows)


def test_smart_resize_rules():
    h, w = smart_resize(1000, 700, 28, 256 * 784, 1024 * 784)
    assert h % 28 == 0 and w % 28 == 0 and 256 * 784 <= h * w <= 1024 * 784
    with pytest.raises(ValueError):
        smart_resize(10, 3000)


def _png_header_only(width, height):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) + \
        chunk(b"IEND", b"")


def test_bad_images_raise_image_error(real_images):
    jpg = open(next(p for p in real_images if p.endswith(".jpg")), "rb").read()
    png = open(next(p for p in real_images if p.endswith(".png")), "rb").read()
    for bad in (jpg[:2000], png[:len(png) // 2], b"not an image at all", _png_header_only(30000, 30000), b""):
        with pytest.raises(ImageError):
            decode_image(bad, ImageProcessingConfig())
