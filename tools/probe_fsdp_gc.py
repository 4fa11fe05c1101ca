"""Probe: FSDP2 (bf16 MixedPrecisionPolicy) + activation checkpointing, as stage 2 wires them (training/fsdp.py:
checkpoint_wrapper per vision block and decoder layer BEFORE fully_shard, the vision blocks' inputs not cast).
Records the dtype of the vision blocks' position_embeddings (cos) on every call of a vision block: forward and
recompute must both see float32. Then compares the encoder's gradients with and without checkpointing (same
FSDP setup). World of one (nccl on CUDA, gloo on CPU). Adapted from the cluster review's probe (which drove
HF's gradient_checkpointing_enable, the wiring that torch < 2.13 + transformers < 5.24 break).
usage: python probe_fsdp_gc.py [tiny|qwen25vl_3b] [--no-autocast] [--three-forwards]
--three-forwards: queries, positives and negatives embedded in three forwards before one backward (the
non-GradCache path of training/contrastive_step.py)."""
import json, os, sys, tempfile, time
for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"),
             ("MASTER_PORT", "29517")):
    os.environ.setdefault(k, v)
import torch
from PIL import Image
from megatron_moca.distributed import runtime
runtime.init_process_group(megatron=False)
dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
from megatron_moca.config.model import preset
from megatron_moca.conversion.hf_io import copy_side_files, load_transformers_model
from megatron_moca.conversion.random_hf import write_random_hf
from megatron_moca.embed.inputs import EmbeddingInputs
from megatron_moca.training import fsdp as sharding
from megatron_moca.training.contrastive_step import PooledEncoder

name = sys.argv[1] if len(sys.argv) > 1 and not sys.argv[1].startswith("-") else "tiny"
autocast = "--no-autocast" not in sys.argv
forwards = 3 if "--three-forwards" in sys.argv else 1
work = tempfile.mkdtemp()
hf = os.path.join(work, "hf")
write_random_hf(hf, preset(name), torch.bfloat16, seed=0)
copy_side_files(None, hf)
img = os.path.join(work, "a.png")
Image.new("RGB", (448, 448), (200, 30, 90)).save(img)
batch = EmbeddingInputs(hf, max_length=512).batch(
    [{"text": "<|vision_start|><|image_pad|><|vision_end|> a red square on a page", "images": [img]}, "a text query"])


def run(gc: bool, fsdp: bool = True):
    torch.manual_seed(0)
    model = load_transformers_model(hf, torch.float32).to("cpu" if fsdp else dev)
    model.train()
    enc = PooledEncoder(model.model, dev, always_run_vision=fsdp)
    if fsdp:
        full = dict(enc.state_dict())
        sharding.shard(enc, dev, "bfloat16", None, "sum", checkpointing=gc)
        sharding.load_from_rank0(enc, full, dev)
    seen = []
    block = model.model.visual.blocks[0]
    block.register_forward_pre_hook(
        lambda m, a, kw: seen.append(str(kw["position_embeddings"][0].dtype).replace("torch.", "")), with_kwargs=True)
    t = time.perf_counter()
    error = None
    try:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
            e = sum(enc(batch) * (i + 1) for i in range(forwards))
        (e * torch.linspace(-1, 1, e.shape[1], device=e.device)).sum().backward()
    except Exception as exc:  # noqa: BLE001 - the probe reports what broke
        error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
    grads = {n: sharding.full_value(p.grad).float().cpu() for n, p in enc.named_parameters() if p.grad is not None}
    return {"seen_cos_dtypes": seen, "error": error, "seconds": round(time.perf_counter() - t, 2)}, grads


def rel(a, b):
    keys = sorted(set(a) & set(b))
    worst = max(keys, key=lambda k: float((a[k] - b[k]).norm() / (b[k].norm() + 1e-12)))
    return worst, float((a[worst] - b[worst]).norm() / (b[worst].norm() + 1e-12))


import transformers
out = {"transformers": transformers.__version__, "forwards": forwards, "torch": torch.__version__, "device": str(dev), "preset": name, "autocast": autocast}
r_plain, g_plain = run(gc=False)
r_plain2, g_plain2 = run(gc=False)
r_gc, g_gc = run(gc=True)
out.update(fsdp_no_gc=r_plain, fsdp_gc=r_gc)
if g_gc and g_plain:
    out["noise_no_gc_vs_no_gc"] = rel(g_plain2, g_plain)
    out["gc_vs_no_gc"] = rel(g_gc, g_plain)
out["verdict"] = ("forward and recompute saw float32 cos/sin" if set(r_gc["seen_cos_dtypes"]) == {"float32"}
                  else f"cos/sin dtypes seen: {sorted(set(r_gc['seen_cos_dtypes']))}")
print(json.dumps(out))
