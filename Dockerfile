# megatron_moca on an NGC PyTorch image (torch, Transformer Engine, flash-attn, apex, DALI preinstalled).
# The base is pinned in one ARG; the package is installed without touching the image's torch/TE/flash-attn.
ARG NGC_PYTORCH=nvcr.io/nvidia/pytorch:25.10-py3
FROM ${NGC_PYTORCH}

WORKDIR /workspace/megatron_moca
COPY setup.py README.md ./
COPY megatron_moca ./megatron_moca
COPY examples ./examples
COPY tools ./tools

# --no-deps for the package itself; its pure-Python needs are installed under the image's own pip
# constraints (NGC ships /etc/pip/constraint.txt pinning torch and friends), so nothing GPU-side is replaced.
RUN pip install --no-cache-dir --no-deps -e . \
 && pip install --no-cache-dir ${PIP_CONSTRAINT:+-c $PIP_CONSTRAINT} \
      "megatron-core>=0.16.1,<0.20" "transformers>=4.52" "safetensors>=0.4" "pyyaml>=6" psutil \
 && python -c "import torch, megatron_moca; print('torch', torch.__version__)"

ENTRYPOINT ["moca"]
CMD ["env"]
