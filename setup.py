"""ftjax: fine-tuning and post-training of decoder language models in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="ftjax",
    version="0.1.0",
    description="Fine-tuning of decoder LMs (LoRA, QLoRA, SFT, reward models, DPO) "
                "in JAX/Flax with Hugging Face checkpoint parity",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["ftjax", "ftjax.*"]),
    install_requires=[
        "jax>=0.6",
        "flax>=0.10",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "transformers>=4.46",
        "jinja2>=3.1.6",  # transformers' apply_chat_template needs it but does not require it
        "datasets>=3.0",
        "einops>=0.8",
        "absl-py>=2.0",
        "ml-collections>=0.1.1",
        "safetensors>=0.4",
        # 0.7.0 takes ~1 s to import (it registers numpy ufunc loops one by one; 0.6.0: 10 ms),
        # a second more on every script's start (jax imports it).
        "ml-dtypes>=0.4,!=0.7.0",
        "numpy>=1.26",
        "tqdm>=4.66",
        "tokenizers>=0.20",
        "tensorboardX>=2.6",
        "matplotlib>=3.7",  # tables and plots of sweeps (the DPO beta study)
    ],
    extras_require={
        # torch is pinned: 2.13.0 is the CPU build our test machines carry; other specs pull CUDA.
        "test": ["pytest>=8", "pytest-xdist>=3.5", "chex>=0.1.87", "torch==2.13.0", "peft>=0.13",
                 "ruff>=0.6",
                 "bitsandbytes>=0.45",  # NF4 parity with quantize_4bit (CPU build)
                 "tensorflow-datasets>=4.9",  # TFDS source tests (no TensorFlow needed)
                 "trl>=1.0"],  # DPO and reward losses checked against TRL's own code
        "tfds": ["tensorflow-datasets>=4.9"],
        "gpu": ["jax[cuda12]>=0.6"],
        "tpu": ["jax[tpu]>=0.6"],
    },
)
