"""phi2-prompter: learned prompt optimisation on Microsoft Phi-2, in plain PyTorch."""

from setuptools import find_packages, setup

setup(
    name="phi2-prompter",
    version="0.1.0",
    description="Rewrite a prompt into a better one with a LoRA-tuned Phi-2 and a small head per target LLM",
    python_requires=">=3.10",
    # Only the model package is installed: the commands (train_sft.py, generate.py, ...) and what they share
    # (support/, serving/, lora.py, head_adapter.py, prompts.py) run from the checkout, so that nothing with a
    # generic name (evaluate, serve, cli...) lands in site-packages.
    packages=find_packages(include=["phi2", "phi2.*"]),
    # Install torch first (pip install torch==2.13.0 here): a bare requirement with no torch present
    # would fetch a multi-GB CUDA build. Any 2.5+ satisfies this range (SDPA's enable_gqa).
    install_requires=["torch>=2.5", "tokenizers>=0.19", "safetensors>=0.8", "numpy", "tqdm"],
    extras_require={
        # calling LLMs (target_data.py, evaluate.py): the official client, never a hand-written one
        "api": ["openai>=1.40"],
        # serve.py: the OpenAI-compatible server and the proxy
        "serve": ["fastapi>=0.110", "uvicorn>=0.29", "httpx>=0.27"],
        # training curves where users watch them (--report-to): TensorBoard and Weights & Biases
        "tensorboard": ["tensorboard>=2.14"],
        "wandb": ["wandb>=0.17"],
        # transformers and peft are numerical oracles for the tests and benchmarks, never used by the product
        "test": ["pytest", "pytest-xdist", "hypothesis", "ruff>=0.6", "transformers>=5.0,<6", "peft>=0.17",
                 "openai>=1.40", "fastapi>=0.110", "uvicorn>=0.29", "httpx>=0.27", "tensorboard>=2.14",
                 "wandb>=0.17"],
        "bench": ["transformers>=5.0,<6", "peft>=0.17", "psutil", "openai>=1.40", "fastapi>=0.110", "uvicorn>=0.29",
                  "httpx>=0.27"],
    },
)
