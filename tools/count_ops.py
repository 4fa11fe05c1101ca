"""Count the compute ops (kernel launches on a GPU, roughly) of a training step, on the CPU.

    python tools/count_ops.py [--preset tiny] [--dtype bfloat16]

On the GPU both stacks are partly bound by the host launching kernels (benchmarks/RESULTS.md), so the
number of ops per ViT block and per LLM layer (forward + backward, view ops excluded), ours and HF's
on the same input in the same run, is a proxy worth tracking between GPU sessions. Counted with a TorchDispatchMode below autograd: composite ops appear
decomposed (a fused CUDA kernel, e.g. rms_norm, counts as its parts here).
"""

import argparse
import collections
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from helpers import OpNames, build_batch, hf_model  # noqa: E402 - the tests' helpers

_VIEWS = {"view", "detach", "t", "transpose", "slice", "_unsafe_view", "expand", "permute", "unsqueeze", "squeeze",
          "select", "alias", "as_strided", "split", "split_with_sizes", "unbind", "chunk", "reshape",
          "_reshape_alias", "empty_like", "empty", "lift_fresh", "unflatten", "new_empty", "new_empty_strided",
          "empty_strided"}


def count(fn):
    """Compute ops (view-like ops excluded) dispatched by one call of fn, after a warm-up call."""
    fn()  # warm caches (masks, layouts) so they do not count
    with OpNames() as ops:
        fn()
    return collections.Counter(name for name in ops.names if name not in _VIEWS)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    from megatron_moca.config.model import preset
    from megatron_moca.distributed import runtime
    from megatron_moca.models.transformer_configs import DTYPES
    from megatron_moca.models.vlm import MocaVLM

    runtime.initialize(1, 1, seed=0)
    cfg = preset(args.preset)
    cfg.params_dtype, cfg.attention = args.dtype, "bidirectional"
    torch.manual_seed(0)
    model = MocaVLM(cfg)
    _, _, pixels, grid = build_batch(cfg, [[(1, 16, 16)]], seed=3)
    text = torch.randint(0, 1000, (1, 64))

    def vision():
        model.zero_grad(set_to_none=True)
        model.vision(pixels, grid).float().sum().backward()

    def language():
        model.zero_grad(set_to_none=True)
        model(text).float().pow(2).mean().backward()

    hf = hf_model(cfg, seed=0).to(DTYPES[args.dtype]).train()

    def hf_vision():
        hf.zero_grad(set_to_none=True)
        out = hf.model.visual(pixels.to(DTYPES[args.dtype]), grid_thw=grid)
        (out if torch.is_tensor(out) else out.pooler_output).float().sum().backward()

    def hf_language():
        hf.zero_grad(set_to_none=True)
        hf.model.language_model(input_ids=text).last_hidden_state.float().pow(2).mean().backward()

    print(f"preset {args.preset}, {args.dtype}, one {pixels.shape[0]}-patch image / 64 text tokens; "
          "compute ops per block, forward + backward")
    for name, ours, theirs, blocks in (("vision tower", vision, hf_vision, cfg.vision.depth),
                                       ("language model, text only", language, hf_language, cfg.language.num_layers)):
        mine, ref = count(ours), count(theirs)
        print(f"{name}: ours {sum(mine.values()) / blocks:.1f}, HF {sum(ref.values()) / blocks:.1f}; "
              f"ours' top: {', '.join(f'{k} {v}' for k, v in mine.most_common(6))}")
    runtime.shutdown()


if __name__ == "__main__":
    main()
