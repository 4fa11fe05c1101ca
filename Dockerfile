# megatron_moca on an NGC PyTorch image (torch, Transformer Engine, flash-attn, apex, DALI preinstalled).
# The base is pinned in one ARG; the package is installed without touching the image's torch/TE/flash-attn.
ARG NGC_PYTORCH=nvcr.io/nvidia/pytorch:25.10-py3
FROM ${NGC_PYTORCH}

WORKDIR /workspace/megatron_moca
COPY setup.py README.md ./
COPY megatron_moca ./megatron_moca
COPY examples ./examples
COPY tools ./tools

# The image's torch (and TE, flash-attn, apex, DALI) already satisfy or are outside install_requires
# (torch>=2.6 only), so pip adds the pure-Python needs and leaves the GPU stack alone; NGC's own
# PIP_CONSTRAINT, where set, pins it further. The last line fails the build if torch was replaced.
RUN TORCH_BEFORE=$(python -c "import torch; print(torch.__version__)") \
 && pip install --no-cache-dir -e . \
 && python -c "import torch, megatron_moca, sys; sys.exit(torch.__version__ != '$TORCH_BEFORE')"

ENTRYPOINT ["moca"]
CMD ["env"]
