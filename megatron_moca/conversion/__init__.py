"""Checkpoint conversion between Hugging Face Qwen2.5-VL folders and megatron_moca dist checkpoints.

The Python API (what `moca convert` calls; one CPU process, errors are megatron_moca.errors.UserError):

    from megatron_moca.conversion import hf_to_mcore, mcore_to_hf, verify
    hf_to_mcore("/models/Qwen2.5-VL-3B-Instruct", "/ckpt/mcore", tp=2)      # -> {"output", "seconds", "dtype"}
    mcore_to_hf("/runs/stage1", "/models/stage1_hf", hf_base="/models/Qwen2.5-VL-3B-Instruct")
    result = verify("/models/Qwen2.5-VL-3B-Instruct", "/ckpt/mcore")     # .max_abs_diff, .mismatched_tensors

On a GPU node, hide the GPUs from the process first (CUDA_VISIBLE_DEVICES=): the unsharded model is built
on the CPU. Imported lazily, so `megatron_moca.conversion.mapping` stays free of torch-heavy imports.
"""

__all__ = ["hf_to_mcore", "mcore_to_hf", "verify"]


def __getattr__(name):
    if name in ("hf_to_mcore", "mcore_to_hf"):
        from megatron_moca.conversion import convert

        return getattr(convert, name)
    if name == "verify":
        from megatron_moca.conversion.verification import verify

        return verify
    raise AttributeError(f"module 'megatron_moca.conversion' has no attribute {name!r}")
