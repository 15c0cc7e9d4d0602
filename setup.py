"""Build and install `pretrain`.

Install torch first, then `pip install --no-build-isolation -e .` so the DCNv3 extension builds against that torch.
"""
from setuptools import find_packages, setup

setup(
    name="internimage-pretrain",
    version="0.1.0",
    description="Distributed pretraining of InternImage vision foundation models",
    python_requires=">=3.10",
    packages=find_packages(include=["pretrain", "pretrain.*", "launch", "launch.*"]),
    entry_points={"console_scripts": ["pretrain = pretrain.cli:main"]},
)
