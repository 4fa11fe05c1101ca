"""Conversion benchmark: wall time and peak RSS of `moca convert` on a random Qwen2.5-VL checkpoint.

    python tools/bench_conversion.py --preset qwen25vl_3b --workdir /tmp/convbench

Writes a random bf16 HF folder of the preset's exact shapes (cached in the workdir), then runs
hf-to-mcore and mcore-to-hf each in a fresh process, and prints seconds and peak RSS as a multiple
of the model's bytes (targets for 3B: <= 60 s and <= 1.3x).
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

import torch


def run(cmd):
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.time() - t0
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak_kib <= before:
        print("warning: peak RSS not above an earlier child's; run each direction in its own invocation")
    return seconds, peak_kib * 1024


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="qwen25vl_3b")
    parser.add_argument("--workdir", default="/tmp/moca_convbench")
    parser.add_argument("--direction", choices=("hf-to-mcore", "mcore-to-hf", "both"), default="both")
    args = parser.parse_args()
    from megatron_moca.config.model import preset
    from megatron_moca.conversion.random_hf import hf_shapes, write_random_hf

    cfg = preset(args.preset)
    n_params = sum(torch.Size(s).numel() for s in hf_shapes(cfg).values())
    model_bytes = 2 * n_params
    hf_dir = os.path.join(args.workdir, f"{args.preset}_hf")
    if not os.path.isfile(os.path.join(hf_dir, "config.json")):
        t0 = time.time()
        write_random_hf(hf_dir, cfg, torch.bfloat16, seed=0)
        print(f"wrote random {args.preset} ({n_params / 1e9:.3f}B params) in {time.time() - t0:.0f} s")
    mcore_dir, back_dir = os.path.join(args.workdir, "mcore"), os.path.join(args.workdir, "hf_back")
    moca = [sys.executable, "-m", "megatron_moca.cli", "convert"]
    results = {"preset": args.preset, "params_B": round(n_params / 1e9, 3), "model_GiB": round(model_bytes / 2**30, 2),
               "cpu_cores": os.cpu_count(), "torch": torch.__version__}
    if args.direction in ("hf-to-mcore", "both"):
        shutil.rmtree(mcore_dir, ignore_errors=True)
        sec, rss = run(moca + ["hf-to-mcore", "--hf", hf_dir, "--output", mcore_dir])
        results["hf_to_mcore"] = {"seconds": round(sec, 1), "peak_rss_GiB": round(rss / 2**30, 2),
                                  "rss_over_model": round(rss / model_bytes, 2)}
    if args.direction in ("mcore-to-hf", "both"):
        shutil.rmtree(back_dir, ignore_errors=True)
        sec, rss = run(moca + ["mcore-to-hf", "--checkpoint", mcore_dir, "--output", back_dir])
        results["mcore_to_hf"] = {"seconds": round(sec, 1), "peak_rss_GiB": round(rss / 2**30, 2),
                                  "rss_over_model": round(rss / model_bytes, 2)}
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
