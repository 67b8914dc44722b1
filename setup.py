from setuptools import find_packages, setup

# Lower bounds are the oldest versions with the APIs the code calls (noted where one is newer than
# the package's long-standing API); requirements.lock pins the versions the test suite passed with.
setup(
    name="subliminal-jax",
    version="0.1.0",
    description="Subliminal learning experiments (Cloud et al., arXiv 2507.14805) in JAX/Flax",
    packages=find_packages(include=["subliminal_jax", "subliminal_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.7.1",  # jax.set_mesh
        "flax>=0.12",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "ml-collections>=1.0",
        "absl-py>=2.0",
        "tokenizers>=0.20",
        "datasets>=3.0",
        "safetensors>=0.4",
        "gguf>=0.16",
        "jinja2>=3.1",
        "numpy>=1.26",
        "scipy>=1.15",  # scipy.stats.bootstrap(rng=...)
        "matplotlib>=3.8",
        "tqdm>=4.66",
        "interegular>=0.3",
        "tensorboardX>=2.6",  # config.tensorboard
    ],
    extras_require={
        # Accelerator builds of jax (the default is the CPU build): `make setup-tpu` / `setup-cuda`.
        "tpu": ["jax[tpu]>=0.7.1"],
        "cuda": ["jax[cuda12]>=0.7.1"],
        # Only to convert an HF tokenizer directory without tokenizer.json.
        "transformers": ["transformers>=4.50"],
        # torch and transformers are reference implementations for parity tests and benchmarks
        # only; peft checks the exported adapters; import-linter checks the package's layers
        # (.importlinter; 2.14 for broken_contract_guidance).
        "test": ["pytest>=8", "pytest-xdist>=3", "hypothesis>=6", "torch==2.13.0", "accelerate>=1.0",
                 "transformers>=4.50", "peft>=0.21", "import-linter>=2.14"],
    },
)
