"""GPU benchmark: MocaVLM (megatron-core) vs HF transformers Qwen2.5-VL, same card, same process.

    python tools/bench_gpu.py --preset qwen25vl_3b --out results.json
    python tools/bench_gpu.py --preset tiny --device cpu --seq 256 --grid 8 --repeat 1   # dry run of the script

Inputs follow shared/bench/hf_vlm.py: one sequence of 4096 tokens, text only, and with 4 images of
448x448 (4 x 1024 patches -> 4 x 256 image tokens); bf16, random init, forward + backward of a
next-token CE over all positions (the same work on both sides), median of 6 after 2 warm-ups.
Also the vision tower alone. Our model runs in each of --variants: causal or bidirectional attention,
eager or with `+compile` (models/compile.py: each block compiled in place); `+nopad` runs the vision
MLP at HF's unpadded width (VisionConfig.intermediate_pad_multiple=1) and `+nofuse` without megatron's
fused SwiGLU (transformer_configs.fuse_activations), to measure each in the same run. Results are written to
--out after every variant, so a run cut short keeps what it measured. Prints a table of seconds and
ratios (ours vs HF), model TFLOP/s, and how much of each step the host took; never asserts speed.
"""

import argparse
import copy
import inspect
import json
import time
import traceback

import torch


DEVICE = "cuda"
REPEAT = 6


def step_times(fn, warm=2, repeat=6, device="cuda"):
    """(median wall seconds, median host seconds) of fn() over `repeat` calls after `warm` warm-ups.
    Wall: until the device has finished. Host: until fn() returned, kernels possibly still queued; a
    host time close to the wall time means the step waited on the host (Python, launches, syncs)
    rather than on the GPU."""
    for _ in range(warm):
        fn()
    walls, hosts = [], []
    for _ in range(repeat):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        hosts.append(time.perf_counter() - t0)
        if device == "cuda":
            torch.cuda.synchronize()
        walls.append(time.perf_counter() - t0)
    return sorted(walls)[len(walls) // 2], sorted(hosts)[len(hosts) // 2]


def median_seconds(fn, warm=2, repeat=6, device="cuda"):
    """Median wall time of fn() over `repeat` calls after `warm` warm-ups, the device synchronised."""
    return step_times(fn, warm, repeat, device)[0]


def timed(fn):
    """{"s": median wall seconds, "host_s": median seconds until fn returned} (see step_times)."""
    wall, host = step_times(fn, warm=2 if REPEAT > 1 else 1, repeat=REPEAT, device=DEVICE)
    return {"s": wall, "host_s": host}


def case_tflops(cfg, inputs, case, causal):
    """Model TFLOP of one step of `case` (training/flops.py: matmuls only, true widths)."""
    from megatron_moca.training.flops import StepShape, training_step_flops

    text_ids, _, _, grid = inputs
    seq = text_ids.shape[1]
    grids = [tuple(g) for g in grid.tolist()]
    shape = {"text": StepShape(documents=[seq], logit_tokens=seq, causal=causal),
             "images": StepShape(documents=[seq], logit_tokens=seq, image_grids=grids, causal=causal),
             "vision_tower": StepShape(image_grids=grids)}[case]
    return training_step_flops(cfg, shape) / 1e12


def peak_gib():
    return torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else 0.0


def reset_peak():
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.empty_cache()


def make_inputs(cfg, seq=4096, images=4, grid_side=32):
    tok = cfg.tokens
    ids = torch.randint(0, 150000, (1, seq), device=DEVICE)
    per = grid_side * grid_side // cfg.vision.merge_unit
    gap = min(600, (seq - 100 - images * (per + 2)) // images)
    if gap < 0:
        raise SystemExit(f"--seq {seq} is too short for {images} images of {per} tokens")
    pos = 100
    for _ in range(images):
        ids[0, pos] = tok.vision_start_token_id
        ids[0, pos + 1:pos + 1 + per] = tok.image_token_id
        ids[0, pos + 1 + per] = tok.vision_end_token_id
        pos += per + 2 + gap
    pixels = torch.randn(images * grid_side * grid_side, cfg.vision.patch_dim, device=DEVICE, dtype=torch.bfloat16)
    grid = torch.tensor([[1, grid_side, grid_side]] * images, device=DEVICE)
    text_ids = torch.randint(0, 150000, (1, seq), device=DEVICE)
    return text_ids, ids, pixels, grid


def hf_model(cfg, device):
    """transformers' Qwen2_5_VLForConditionalGeneration of cfg's shapes: random, sdpa, bf16, on `device`."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from megatron_moca.conversion.hf_config import hf_config_from_model

    hf_cfg = Qwen2_5_VLConfig(**hf_config_from_model(cfg))
    hf_cfg._attn_implementation = "sdpa"
    with torch.device(device):
        return Qwen2_5_VLForConditionalGeneration(hf_cfg).to(torch.bfloat16)


def next_token_loss(model, tokens, **kw):
    """Our side of the benchmarked step: MocaVLM forward, vocab-parallel logits, next-token CE (mean)."""
    from megatron_moca.objectives.losses import token_cross_entropy

    logits = model.logits(model(tokens, **kw))  # [s, b, v/tp]
    labels = torch.roll(tokens, -1, dims=1).transpose(0, 1).contiguous()
    return token_cross_entropy(logits, labels).mean()


def bench_hf(cfg, inputs):
    model = hf_model(cfg, DEVICE)
    text_ids, ids, pixels, grid = inputs
    res = {}

    def text_step():
        model(input_ids=text_ids, labels=text_ids).loss.backward()

    # newer transformers take the image-token mask explicitly (older ones have no such argument)
    extra = ({"mm_token_type_ids": (ids == cfg.tokens.image_token_id).int()}
             if "mm_token_type_ids" in inspect.signature(model.model.forward).parameters else {})

    def image_step():
        model(input_ids=ids, pixel_values=pixels, image_grid_thw=grid, labels=ids, **extra).loss.backward()

    def vision_step():
        out = model.model.visual(pixels, grid_thw=grid)
        out = out if torch.is_tensor(out) else out.pooler_output
        out.float().sum().backward()

    for name, fn in (("text", text_step), ("images", image_step), ("vision_tower", vision_step)):
        reset_peak()
        res[name] = {**timed(fn), "peak_GiB": peak_gib()}
        res[name]["TFLOP_per_s"] = case_tflops(cfg, inputs, name, causal=True) / res[name]["s"]  # HF is causal
        model.zero_grad(set_to_none=True)
    return res  # the model is freed with this frame; the caller empties the cache


def parse_variant(variant):
    attention, *flags = variant.split("+")
    if set(flags) - {"compile", "nopad", "nofuse"} or attention not in ("causal", "bidirectional"):
        raise SystemExit(f"variant {variant!r}: expected causal|bidirectional[+compile][+nopad][+nofuse]")
    return attention, set(flags)


def bench_ours(cfg, inputs, variant):
    from megatron_moca.models import transformer_configs
    from megatron_moca.models.compile import compile_model
    from megatron_moca.models.vlm import MocaVLM

    attention, flags = parse_variant(variant)
    cfg = copy.deepcopy(cfg)
    cfg.attention = attention
    if "nopad" in flags:
        cfg.vision.intermediate_pad_multiple = 1
    fuse = transformer_configs.fuse_activations
    transformer_configs.fuse_activations = (lambda: False) if "nofuse" in flags else fuse
    try:
        model = MocaVLM(cfg).to(DEVICE)
    finally:
        transformer_configs.fuse_activations = fuse
    if "compile" in flags:
        compile_model(model)
    text_ids, ids, pixels, grid = inputs
    res = {}

    def text_step():
        next_token_loss(model, text_ids).backward()

    def image_step():
        next_token_loss(model, ids, pixel_values=pixels, image_grid_thw=grid).backward()

    def vision_step():
        model.vision(pixels, grid).float().sum().backward()

    for name, fn in (("text", text_step), ("images", image_step), ("vision_tower", vision_step)):
        reset_peak()
        t0 = time.time()
        res[name] = {**timed(fn), "peak_GiB": peak_gib(), "wall_s": round(time.time() - t0, 1)}
        res[name]["TFLOP_per_s"] = case_tflops(cfg, inputs, name, causal=attention == "causal") / res[name]["s"]
        model.zero_grad(set_to_none=True)
    return res  # the model is freed with this frame; the caller empties the cache


def print_table(results, variants):
    head = f"{'case':<14} {'HF s':>8}" + "".join(f" {v[:24]:>24} {'x HF':>6}" for v in variants)
    print(head)
    for case in ("text", "images", "vision_tower"):
        hf = results["hf"].get(case, {}).get("s", float("nan"))
        row = f"{case:<14} {hf:8.3f}"
        for v in variants:
            got = results.get(f"ours_{v}", {}).get(case)
            row += f" {got['s']:24.3f} {hf / got['s']:6.2f}" if got else f" {'-':>24} {'-':>6}"
        print(row)
    for title, value in (("model TFLOP/s (training/flops.py; bidirectional attention is twice causal's work, "
                          "HF runs causal)", lambda r: r["TFLOP_per_s"]),
                         ("host share (seconds until the step returned / until the GPU finished; near 1 = "
                          "waiting on the host)", lambda r: r["host_s"] / r["s"])):
        print(title + ", columns HF then " + ", ".join(variants) + ":")
        for case in ("text", "images", "vision_tower"):
            got = [results.get(key, {}).get(case) for key in ["hf"] + [f"ours_{v}" for v in variants]]
            print(f"{case:<14} " + " ".join(f"{value(r):7.2f}" if r else "      -" for r in got))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="qwen25vl_3b")
    parser.add_argument("--out", default=None)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--seq", type=int, default=4096, help="tokens per sequence (4 images inside)")
    parser.add_argument("--grid", type=int, default=32, help="patches per image side (32 = 448x448 pixels)")
    parser.add_argument("--repeat", type=int, default=6, help="timed repetitions (median), after 2 warm-ups")
    parser.add_argument("--variants",
                        default="causal,bidirectional,bidirectional+compile,causal+compile,bidirectional+nopad,"
                                "bidirectional+nofuse",
                        help="comma-separated: causal|bidirectional, optionally +compile, +nopad, +nofuse")
    args = parser.parse_args()
    global DEVICE, REPEAT
    DEVICE, REPEAT = args.device, args.repeat
    variants = [v for v in args.variants.split(",") if v]
    for variant in variants:
        parse_variant(variant)  # a typo fails now, not after the HF run
    from megatron_moca.config.model import preset
    from megatron_moca.distributed import runtime
    from megatron_moca.models.specs import resolve_backend

    runtime.initialize(1, 1, seed=0)
    cfg = preset(args.preset)
    cfg.params_dtype = "bfloat16"
    inputs = make_inputs(cfg, seq=args.seq, grid_side=args.grid)
    t0 = time.time()
    results = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", "torch": torch.__version__,
               "seq": args.seq, "backend": resolve_backend(cfg.attention_backend), "hf": {}}
    try:
        results["hf"] = bench_hf(cfg, inputs)
    except Exception:  # our numbers are still worth having
        results["hf_error"] = traceback.format_exc()[-3000:]
        print(results["hf_error"])
    import transformers

    results["transformers"] = transformers.__version__

    def save():
        results["wall_s"] = round(time.time() - t0, 1)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)

    save()
    for variant in variants:
        reset_peak()
        try:
            results[f"ours_{variant}"] = bench_ours(cfg, inputs, variant)
        except Exception:  # keep the other variants' numbers; the failure is part of the result
            results[f"ours_{variant}_error"] = traceback.format_exc()[-3000:]
            print(results[f"ours_{variant}_error"])
        torch._dynamo.reset()
        save()
    print_table(results, variants)
    print(json.dumps(results, indent=1))
    runtime.shutdown()


if __name__ == "__main__":
    main()
