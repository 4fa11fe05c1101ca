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
# (torch>=2.6 only), so pip adds the pure-Python needs (megatron-core, transformers in the tested window,
# ...) and leaves the GPU stack alone. NGC images pin every preinstalled package in PIP_CONSTRAINT
# (/etc/pip/constraint.txt), which can stop megatron-core's or transformers' requirements from resolving:
# Megatron-LM's install guide clears it for the install, as this step does. The check after the install
# fails the build if torch was replaced; `moca env` prints every resolved version.
RUN TORCH_BEFORE=$(python -c "import torch; print(torch.__version__)") \
 && PIP_CONSTRAINT= pip install --no-cache-dir -e . \
 && python -c "import torch, megatron_moca, sys; sys.exit(torch.__version__ != '$TORCH_BEFORE')" \
 && moca env

ENTRYPOINT ["moca"]
CMD ["env"]
