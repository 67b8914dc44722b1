from setuptools import find_packages, setup

setup(
    name="subliminal-jax",
    version="0.1.0",
    description="Subliminal learning experiments (Cloud et al., arXiv 2507.14805) in JAX/Flax",
    packages=find_packages(include=["subliminal_jax", "subliminal_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.7",
        "flax>=0.12",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "ml-collections>=1.0",
        "absl-py>=2.0",
        "transformers>=4.50",
        "tokenizers>=0.20",
        "datasets>=3.0",
        "safetensors>=0.4",
        "gguf>=0.16",
        "jinja2>=3.1",
        "numpy>=1.26",
        "scipy>=1.11",
        "matplotlib>=3.8",
        "tqdm>=4.66",
        "interegular>=0.3",
    ],
    extras_require={
        # torch is a reference implementation for parity tests and benchmarks only.
        "test": ["pytest>=8", "pytest-xdist>=3", "hypothesis>=6", "torch==2.13.0", "accelerate>=1.0"],
    },
)
