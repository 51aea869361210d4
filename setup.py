"""Install with `make install` (or `pip install -e .[test]` once torch is present).

torch is required as `torch>=2.1` without a pin: a GPU user keeps the CUDA build they already have,
and `make install` installs torch==2.13.0 first where none is present (on this project's CPU machines
that version is a local CPU wheel, so no multi-GB CUDA build is ever pulled in by a dependency).
"""
from setuptools import find_packages, setup

setup(
    name="ds-pipeline",
    version="0.1.0",
    description="DeepSpeed pipeline from raw text to a compressed, deployable language model",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["pipeline", "pipeline.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.1",
        "deepspeed>=0.19",
        "transformers>=4.46",
        "datasets>=3.0",
        "sentencepiece>=0.2",
        "tensorboard>=2.15",
        "numpy>=1.24",
        "tqdm>=4.66",
        "pyarrow>=15",
        "safetensors>=0.4",
    ],
    extras_require={
        "lora": ["peft>=0.13"],
        "test": ["pytest>=8", "pytest-timeout>=2.3", "ruff>=0.6", "peft>=0.13", "matplotlib>=3.8"],
    },
)
