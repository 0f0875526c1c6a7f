"""phi2-prompter: learned prompt optimisation on Microsoft Phi-2, in plain PyTorch."""

from setuptools import find_packages, setup

setup(
    name="phi2-prompter",
    version="0.1.0",
    description="Rewrite a prompt into a better one with a LoRA-tuned Phi-2 and a small head per target LLM",
    python_requires=">=3.10",
    packages=find_packages(include=["phi2", "phi2.*"]),
    py_modules=["cli", "hardware", "runs", "lora", "head_adapter", "prompts", "train_sft", "train_head", "generate",
                "target_data", "quickstart", "ddp", "llm", "evaluate", "export", "serve"],
    # Install torch first (pip install torch==2.13.0 here): a bare requirement with no torch present
    # would fetch a multi-GB CUDA build. Any 2.5+ satisfies this range (SDPA's enable_gqa).
    install_requires=["torch>=2.5", "tokenizers>=0.19", "safetensors>=0.8", "numpy", "tqdm"],
    extras_require={
        # calling LLMs (target_data.py, evaluate.py): the official client, never a hand-written one
        "api": ["openai>=1.40"],
        # serve.py: the OpenAI-compatible server and the proxy
        "serve": ["fastapi>=0.110", "uvicorn>=0.29", "httpx>=0.27"],
        # transformers and peft are numerical oracles for the tests and benchmarks, never used by the product
        "test": ["pytest", "pytest-xdist", "hypothesis", "transformers>=5.0,<6", "peft>=0.17", "openai>=1.40",
                 "fastapi>=0.110", "uvicorn>=0.29", "httpx>=0.27"],
        "bench": ["transformers>=5.0,<6", "peft>=0.17", "psutil", "openai>=1.40", "fastapi>=0.110", "uvicorn>=0.29",
                  "httpx>=0.27"],
    },
)
