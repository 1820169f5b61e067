"""Packaging for mtl_lm."""

import setuptools

setuptools.setup(
    name="mtl_lm",
    version="0.1.0",
    description=("Multi-objective pretraining (next-token, masked LM, replaced-"
                 "token detection, sentence order) of Llama-3-style decoders "
                 "in JAX."),
    packages=setuptools.find_packages(include=["mtl_lm", "mtl_lm.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "grain>=0.2.18",
        "sentencepiece>=0.2.3",
        "absl-py>=2.1",
        "ml_collections>=1.1.0",
        "numpy>=2.0",
        "pyarrow>=18.0",
        "array_record>=0.8.1",
    ],
    extras_require={
        "test": ["pytest>=8.0"],
        "plots": ["matplotlib>=3.8"],
    },
)
