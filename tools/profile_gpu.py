"""GPU diagnostics behind tools/bench_gpu.py: where a training step's time goes, ours vs HF.

    python tools/profile_gpu.py [--preset qwen25vl_3b] [--seq 4096] [--out profile.json]

1. torch SDPA at the LLM's attention shapes: megatron's [s, b, h, d] layout permuted vs contiguous,
   GQA via enable_gqa vs repeated K/V, causal vs bidirectional; fwd+bwd ms and the kernels used.
2. which shapes the compiled flex_attention kernel accepts (small ones failed on torch 2.11), and
   the throughput of the device_resize pipeline's exact bicubic on the GPU.
3. torch.profiler of the vision tower alone (4 images of 448x448), and of one text-only step
   (bidirectional, eager) of our model and of HF's: the top
   kernels by GPU time, GPU-busy time vs wall time (a large gap means the step is launch-bound).
Diagnostics only: prints tables, asserts nothing.
"""

import argparse
import json
import time
import traceback

import torch
import torch.nn.functional as F
from bench_gpu import hf_model, make_inputs, median_seconds, next_token_loss  # tools/ is the script's folder


def timed_ms(fn, warm=2, rep=5):
    return 1e3 * median_seconds(fn, warm=warm, repeat=rep)


def kernels_of(fn, top=6):
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_device_time_total)
    return [(e.key[:90], round(e.self_device_time_total / 1e3, 3)) for e in rows[:top] if e.self_device_time_total > 0]


def sdpa_cases(seq, heads=16, groups=2, dim=128):
    out = {}
    base = torch.randn(seq, 1, heads + 2 * groups, dim, device="cuda", dtype=torch.bfloat16)
    for layout in ("megatron", "contiguous"):
        for gqa in ("enable_gqa", "repeat_kv"):
            for causal in (True, False):
                def run():
                    x = base.clone().requires_grad_(True)
                    q, k, v = x.split([heads, groups, groups], dim=2)
                    q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))
                    if layout == "contiguous":
                        q, k, v = (t.contiguous() for t in (q, k, v))
                    kw = {}
                    if gqa == "repeat_kv":
                        k, v = (t.repeat_interleave(heads // groups, dim=1) for t in (k, v))
                    else:
                        kw["enable_gqa"] = True
                    F.scaled_dot_product_attention(q, k, v, is_causal=causal, **kw).float().sum().backward()

                name = f"{layout}/{gqa}/{'causal' if causal else 'bidirectional'}"
                try:
                    out[name] = {"ms": round(timed_ms(run), 3), "kernels": kernels_of(run, 3)}
                except Exception as exc:
                    out[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
                print(name, out[name])
    return out


def flex_cases():
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    out = {}
    compiled = torch.compile(flex_attention, dynamic=False)
    # (batch, seq, q heads, kv heads, head dim, dtype); the first failed in tests/gpu on torch 2.11
    shapes = [(3, 100, 4, 2, 16, torch.float32), (1, 100, 4, 2, 16, torch.float32), (3, 128, 4, 2, 16, torch.float32),
              (3, 100, 4, 4, 16, torch.float32), (3, 100, 4, 2, 64, torch.float32), (3, 100, 4, 2, 16, torch.bfloat16),
              (3, 256, 4, 2, 64, torch.bfloat16), (2, 1024, 16, 2, 128, torch.bfloat16)]
    for b, s, hq, hkv, d, dtype in shapes:
        doc = torch.zeros(b, s, dtype=torch.long, device="cuda")
        doc[:, s * 3 // 5:] = -1

        def mask_mod(bi, _h, qi, ki):
            return doc[bi, qi] == doc[bi, ki]

        block_mask = create_block_mask(mask_mod, b, None, s, s, device="cuda")
        q = torch.randn(b, hq, s, d, device="cuda", dtype=dtype)
        k, v = (torch.randn(b, hkv, s, d, device="cuda", dtype=dtype) for _ in range(2))
        name = f"b{b}/s{s}/h{hq}:{hkv}/d{d}/{str(dtype)[6:]}"
        try:
            compiled(q, k, v, block_mask=block_mask, enable_gqa=hq != hkv)
            out[name] = "ok"
        except Exception as exc:
            out[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        print("flex", name, out[name])
    return out


def resize_cases():
    """image_pipeline "device_resize": exact Pillow bicubic + patchify on the GPU for 8 images of common sizes."""
    from megatron_moca.data.image_processing import ImageProcessingConfig, resized_size
    from megatron_moca.data.pixels import images_to_frames

    cfg = ImageProcessingConfig()
    sizes = [(1411, 1411), (500, 741), (512, 512), (872, 1000), (300, 451), (191, 384), (1080, 1920), (102, 102)]
    images, grids = [], []
    for h, w in sizes:
        images.append(torch.randint(0, 256, (h, w, 3), dtype=torch.uint8).pin_memory())
        th, tw = resized_size(h, w, cfg)
        grids.append((1, th // 14, tw // 14))
    grid = torch.tensor(grids)
    ms = timed_ms(lambda: images_to_frames(images, grid, device="cuda"))
    out = {"images": len(sizes), "ms_per_batch_incl_upload": round(ms, 2), "images_per_s": round(1e3 * len(sizes) / ms)}
    print("resize", out)
    return out


def step_profile(fn, top=25):
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    events = [e for e in prof.key_averages() if e.self_device_time_total > 0]
    busy = sum(e.self_device_time_total for e in events) / 1e3
    rows = sorted(events, key=lambda e: -e.self_device_time_total)[:top]
    table = [(e.key[:100], e.count, round(e.self_device_time_total / 1e3, 2)) for e in rows]
    return {"wall_ms_profiled": round(1e3 * wall, 1), "gpu_busy_ms": round(busy, 1),
            "step_ms": round(timed_ms(fn), 1), "kernels": len(prof.events()), "top": table}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="qwen25vl_3b")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--out", default=None)
    parser.add_argument("--parts", default="sdpa,flex,resize,vision,steps",
                        help="comma-separated subset of sdpa,flex,resize,vision,steps")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}

    def save():
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)

    for name, fn in (("sdpa", lambda: sdpa_cases(args.seq)), ("flex", flex_cases), ("resize", resize_cases)):
        if name not in parts:
            continue
        try:
            results[name] = fn()
        except Exception:
            results[name + "_error"] = traceback.format_exc()[-2000:]
        save()

    if not parts & {"steps", "vision"}:
        return
    from megatron_moca.config.model import preset
    from megatron_moca.distributed import runtime
    from megatron_moca.models.vlm import MocaVLM

    runtime.initialize(1, 1, seed=0)
    cfg = preset(args.preset)
    cfg.params_dtype, cfg.attention = "bfloat16", "bidirectional"
    text_ids, _, pixels, grid = make_inputs(cfg, seq=args.seq)

    def attempt(error_key, fn, shown):
        """Run one profile part; a failure is recorded under error_key and the other parts still run."""
        try:
            fn()
            print(json.dumps({k: results[k] for k in shown}, indent=1))
        except Exception:
            results[error_key] = traceback.format_exc()[-2000:]
        torch.cuda.empty_cache()
        save()

    def ours_vision():
        from megatron_moca.models.vision_layout import vision_layout

        model = MocaVLM(cfg).cuda()
        results["ours_vision"] = step_profile(lambda: model.vision(pixels, grid).float().sum().backward())
        results["vision_layout_ms"] = round(timed_ms(lambda: vision_layout(grid.cpu(), cfg.vision, "cuda")), 2)

    def ours_text():
        model = MocaVLM(cfg).cuda()
        # the step tools/bench_gpu.py times, and the same without the output layer and loss
        results["ours_text"] = step_profile(lambda: next_token_loss(model, text_ids).backward())
        results["ours_text_hidden_only_ms"] = round(
            timed_ms(lambda: model(text_ids).float().pow(2).mean().backward()), 1)

    def hf_text():
        hf = hf_model(cfg, "cuda")
        results["hf_text"] = step_profile(lambda: hf(input_ids=text_ids, labels=text_ids).loss.backward())

    if "vision" in parts:
        attempt("vision_error", ours_vision, ("ours_vision", "vision_layout_ms"))
    if "steps" in parts:
        attempt("ours_error", ours_text, ("ours_text", "ours_text_hidden_only_ms"))
        attempt("hf_error", hf_text, ("hf_text",))
    runtime.shutdown()


if __name__ == "__main__":
    main()
