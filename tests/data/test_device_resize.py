"""image_pipeline "device_resize": Pillow's bicubic in torch equals the installed Pillow bit for bit, and samples built
with it give the same pixels as the CPU path (itself bit-identical to the HF processor)."""

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_moca.data.image_processing import ImageProcessingConfig, decoded_pixels, load_and_resize, patchify_frame
from megatron_moca.data.pixels import patchify_frame_torch
from megatron_moca.data.resize import resize_bicubic


def _pillow(array: np.ndarray, height: int, width: int) -> np.ndarray:
    img = Image.fromarray(array[..., 0] if array.shape[2] == 1 else array)
    return np.asarray(img.resize((width, height), resample=Image.BICUBIC)).reshape(height, width, array.shape[2])


def test_random_sizes_equal_pillow():
    rng = np.random.default_rng(0)
    for trial in range(120):
        h, w, out_h, out_w = (int(v) for v in rng.integers(4, 400, size=4))
        if trial % 5 == 0:
            out_h = h  # one axis only
        if trial % 7 == 0:
            out_w = w
        channels = 3 if trial % 2 else 1
        if trial % 3:
            image = rng.integers(0, 256, size=(h, w, channels), dtype=np.uint8)
        else:  # smooth ramps and hard edges, where rounding and clipping matter
            image = ((np.add.outer(np.arange(h), 3 * np.arange(w)) // 7 % 2) * 255).astype(np.uint8)
            image = np.repeat(image[..., None], channels, axis=2)
        got = resize_bicubic(torch.from_numpy(image), out_h, out_w).numpy()
        assert np.array_equal(got, _pillow(image, out_h, out_w)), (h, w, channels, out_h, out_w)


def test_pass_order_cases_equal_pillow():
    """Shapes on both sides of Pillow 13's rule (vertical pass first when the height shrinks by more
    than twice as many pixels as the width)."""
    rng = np.random.default_rng(1)
    for h, w, out_h, out_w in [(286, 644, 100, 675), (20, 20, 10, 30), (50, 60, 70, 20), (300, 100, 99, 0),
                               (166, 109, 132, 103), (173, 268, 93, 224), (100, 100, 40, 70), (100, 100, 40, 69)]:
        out_w = out_w or w
        image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        got = resize_bicubic(torch.from_numpy(image), out_h, out_w).numpy()
        assert np.array_equal(got, _pillow(image, out_h, out_w)), (h, w, out_h, out_w)


def test_real_images_equal_the_cpu_path(real_images):
    cfg = ImageProcessingConfig()
    for path in real_images:
        data = open(path, "rb").read()
        reference = load_and_resize(data, cfg)
        pixels = torch.from_numpy(decoded_pixels(data, cfg).copy())
        got = resize_bicubic(pixels, *reference.shape[:2])
        got = got.expand(-1, -1, 3) if got.shape[2] == 1 else got
        assert np.array_equal(got.numpy(), reference), path
        assert np.array_equal(patchify_frame_torch(torch.from_numpy(reference)).numpy(),
                              patchify_frame(reference, cfg)[0])


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="uint8"):
        resize_bicubic(torch.zeros(4, 4, 3), 8, 8)


@pytest.mark.parametrize("max_area", [4.0, 0.5])  # 0.5: every image resized on the CPU instead
def test_samples_resized_on_device_equal_the_cpu_path(real_images, tokenizer, max_area):
    from megatron_moca.data.documents import PLACEHOLDER, from_record
    from megatron_moca.data.samples import GreedyPacker, Stage1SampleBuilder, Stage1SampleConfig

    text = f"one {PLACEHOLDER} two {PLACEHOLDER} three {PLACEHOLDER} end"
    docs = [from_record({"text": text, "images": real_images[i:i + 3]}, f"k{i}") for i in range(0, 9, 3)]
    rows = {}
    for on_device in (False, True):
        cfg = Stage1SampleConfig(max_length=4000, image_pipeline="device_resize" if on_device else "cpu",
                                 device_resize_max_area=max_area)
        builder = Stage1SampleBuilder(tokenizer, cfg)
        packer = GreedyPacker(8000, tokenizer.pad_id)
        for i, doc in enumerate(docs):
            assert packer.add(builder.build(doc, np.random.default_rng(i))) is None
        rows[on_device] = packer.flush()
    assert len(rows[True].device_images) == 9 and rows[True].pixel_frames is None
    ref, got = rows[False].model_inputs(), rows[True].model_inputs()
    assert got.keys() == ref.keys()
    for key, value in ref.items():
        assert (value is None and got[key] is None) or torch.equal(value, got[key]), key


@pytest.mark.parametrize("cuda,dali,expected", [(False, True, "cpu"), (True, False, "device_resize"),
                                                (True, True, "dali")])
def test_auto_image_pipeline_follows_the_machine(monkeypatch, cuda, dali, expected):
    from megatron_moca.data import dali as dali_module
    from megatron_moca.data.samples import resolve_image_pipeline

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(dali_module, "dali_available", lambda: dali)
    assert resolve_image_pipeline("auto") == expected
    if not dali:
        with pytest.raises(ValueError, match="needs nvidia-dali"):
            resolve_image_pipeline("dali")


def test_image_pipeline_names_and_auto(tokenizer):
    from megatron_moca.data.samples import Stage1SampleBuilder, Stage1SampleConfig, resolve_image_pipeline

    with pytest.raises(ValueError, match="expected one of"):
        Stage1SampleBuilder(tokenizer, Stage1SampleConfig(image_pipeline="gpu"))
    expected = "cpu" if not torch.cuda.is_available() else resolve_image_pipeline("auto")
    assert Stage1SampleBuilder(tokenizer).pipeline == expected
