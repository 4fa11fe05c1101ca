"""CPU data-path benchmark: megatron_moca's loader path vs transformers' Qwen2-VL processor + PIL.

    python tools/bench_data_cpu.py [--repeat 3] [--rss]

One process pinned to one core (OMP_NUM_THREADS=1), the real images shipped in scikit-image, MoCa's
settings (min_pixels 256*28*28, max_pixels 1024*28*28). Measured in the same run:
  hf       PIL decode + Qwen2VLImageProcessorPil -> float32 rows (the reference stack)
  images   our loader's image path: decode + resize + patchify to uint8 frames (normalisation and the
           temporal copy happen on the device, data/pixels.py)
  samples  the full stage-1 sample path: documents (text + 2 images each) -> tokens, MLM and MAE masks,
           M-RoPE positions, uint8 frames (an image cut by max_length is dropped undecoded; the
           images-per-second ratio counts the images kept)
  images / samples with image_pipeline "device_resize": the CPU only decodes; resize (Pillow's exact bicubic in
           torch, data/resize.py) and patchify run on the device with the normalisation. The device
           part is also timed here on this CPU (one thread), for information only.
--rss additionally runs `moca data prepare` on a 1x and a 10x corpus and prints both peak RSS values.
Prints ratios; asserts nothing.
"""

import argparse
import glob
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")


def median_rate(fn, count, repeat):
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return count / statistics.median(times)


def rss_of_prepare(n_copies, images):
    from megatron_moca.data.documents import PLACEHOLDER

    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "docs.jsonl"), "w") as f:
            for i in range(n_copies * len(images)):
                a, b = images[i % len(images)], images[(i + 1) % len(images)]
                f.write(json.dumps({"text": f"Document {i}. {PLACEHOLDER} text {PLACEHOLDER} end.",
                                    "images": [a, b]}) + "\n")
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        subprocess.run([sys.executable, "-m", "megatron_moca.cli", "data", "prepare", "--input",
                        os.path.join(tmp, "docs.jsonl"), "--output", os.path.join(tmp, "out"), "--workers", "1"],
                       check=True, capture_output=True)
        return max(before, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--rss", action="store_true")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    import numpy as np
    import skimage
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from megatron_moca.data.documents import Document
    from megatron_moca.data.image_processing import image_frames
    from megatron_moca.data.samples import Stage1SampleBuilder
    from megatron_moca.data.tokenizer import QwenTokenizer

    folder = os.path.join(os.path.dirname(skimage.__file__), "data")
    paths = sorted(f for f in glob.glob(os.path.join(folder, "*")) if f.endswith((".png", ".jpg", ".jpeg")))
    raw = [open(p, "rb").read() for p in paths]
    proc = Qwen2VLImageProcessorPil(min_pixels=256 * 28 * 28, max_pixels=1024 * 28 * 28)

    def hf():
        for data in raw:
            proc(images=[Image.open(io.BytesIO(data)).convert("RGB")], return_tensors="np")

    def ours_images():
        for data in raw:
            image_frames(data)

    import torch

    from megatron_moca.data.samples import Stage1SampleConfig

    torch.set_num_threads(1)
    device_cfg = Stage1SampleConfig(image_pipeline="device_resize")

    def ours_images_cpu_part_with_device_resize():
        builder_for_images = Stage1SampleBuilder.__new__(Stage1SampleBuilder)
        builder_for_images.cfg = device_cfg
        sink = []
        for data in raw:
            builder_for_images._device_image(data, sink)
        return sink

    tok = QwenTokenizer()
    builder = Stage1SampleBuilder(tok, Stage1SampleConfig(image_pipeline="cpu"))
    text = "The figure below shows the result of the operation described in the previous section. " * 4
    docs = [Document(f"d{i}", [text, 0, text, 1, text], [raw[i], raw[(i + 1) % len(raw)]]) for i in range(len(raw))]
    built = [builder.build(d, np.random.default_rng(0)) for d in docs]
    tokens = sum(len(b) for b in built)
    # images that fit the token budget (max_length); one cut by it is dropped without being decoded
    kept_per_doc = sum(b.image_grid_thw.shape[0] for b in built) / len(docs)

    def ours_samples():
        for i, d in enumerate(docs):
            builder.build(d, np.random.default_rng(i))

    device_builder = Stage1SampleBuilder(tok, device_cfg)

    def ours_samples_device_resize():
        for i, d in enumerate(docs):
            device_builder.build(d, np.random.default_rng(i))

    from megatron_moca.data.pixels import images_to_frames

    payload = ours_images_cpu_part_with_device_resize()
    grids = torch.tensor([image_frames(data)[1] for data in raw])

    def device_part_on_this_cpu():
        images_to_frames([torch.from_numpy(a) for a in payload], grids)

    hf_rate = median_rate(hf, len(raw), args.repeat)
    img_rate = median_rate(ours_images, len(raw), args.repeat)
    sample_rate = median_rate(ours_samples, len(docs), args.repeat)
    split_img_rate = median_rate(ours_images_cpu_part_with_device_resize, len(raw), args.repeat)
    split_sample_rate = median_rate(ours_samples_device_resize, len(docs), args.repeat)
    device_on_cpu_rate = median_rate(device_part_on_this_cpu, len(raw), args.repeat)
    result = {
        "images": len(raw), "cpu": "1 core", "torch_threads": os.environ["OMP_NUM_THREADS"],
        "hf_processor_images_per_s": round(hf_rate, 1),
        "ours_images_per_s": round(img_rate, 1), "images_ratio_vs_hf": round(img_rate / hf_rate, 2),
        "ours_samples_per_s": round(sample_rate, 1), "ours_tokens_per_s": round(sample_rate * tokens / len(docs)),
        "images_kept_per_sample": round(kept_per_doc, 2),
        "sample_images_per_s_ratio_vs_hf": round(kept_per_doc * sample_rate / hf_rate, 2),
        "image_pipeline_device_resize": {
            "cpu_images_per_s": round(split_img_rate, 1), "images_ratio_vs_hf": round(split_img_rate / hf_rate, 2),
            "cpu_samples_per_s": round(split_sample_rate, 1),
            "cpu_tokens_per_s": round(split_sample_rate * tokens / len(docs)),
            "sample_images_per_s_ratio_vs_hf": round(kept_per_doc * split_sample_rate / hf_rate, 2),
            "device_part_images_per_s_on_this_cpu": round(device_on_cpu_rate, 1),
        },
    }
    if args.rss:
        result["prepare_peak_rss_MiB_1x"] = round(rss_of_prepare(1, paths), 1)
        result["prepare_peak_rss_MiB_10x"] = round(rss_of_prepare(10, paths), 1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
