"""vlm_jax: vision-language models in JAX/Flax, from a laptop CPU to TPU pods."""

from setuptools import find_packages, setup

setup(
    name="vlm_jax",
    version="0.1.0",
    description="Train, evaluate and sample image-text model families in JAX/Flax.",
    python_requires=">=3.11",
    packages=find_packages(include=["vlm_jax", "vlm_jax.*"]),
    install_requires=[
        "jax>=0.10",
        "flax>=0.10",
        "optax>=0.2",
        "orbax-checkpoint>=0.11",
        "chex",
        "ml-collections>=1.0",
        "grain>=0.2.12",
        "tensorflow-datasets>=4.9.9",
        "array-record",
        "sentencepiece>=0.2",
        "pillow>=10",
        "numpy>=1.26",
        "scipy",
        "safetensors>=0.4",
        "tensorboardX>=2.6",
        "tqdm",
    ],
    extras_require={
        # Parity tests compare against Hugging Face transformers and diffusers on PyTorch (CPU build).
        "test": ["pytest>=8", "pytest-xdist>=3", "torch==2.13.0", "transformers>=5,<6", "diffusers>=0.30"],
        "torch": ["torch==2.13.0", "transformers>=5,<6"],
    },
    entry_points={"console_scripts": ["vlm-jax=vlm_jax.cli:main"]},
)
