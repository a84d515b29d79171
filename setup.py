from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="fusedres",
    version="0.1.0",
    description="Fused Triton kernels for the pre-activation residual block y = x + relu(x) @ W.T + b",
    long_description=Path(__file__).with_name("README.md").read_text(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["fusedres", "fusedres.*"]),
    package_data={"fusedres": ["py.typed"]},
    # The ranges hold the last five torch releases and the triton each one's CUDA wheel pins
    # (2.11 -> 3.6.0, 2.12 -> 3.7.0, 2.13 -> 3.7.1, 2.14 -> 3.8.x, 2.15 -> 3.9.x), each tested
    # (README, "Support matrix"), so pip keeps the torch and triton a machine already has.
    # torch 2.16 and triton 3.10 and later are untested: the upper bounds say so.
    install_requires=["torch>=2.11,<2.16", "triton>=3.6.0,<3.10"],
    extras_require={
        # rtdl_revisiting_models: third-party code that tests/test_adopt.py fuses by structure
        # pytest-xdist: the test command runs the compile gate's file beside the interpreter's tests
        "test": ["pytest>=8", "pytest-benchmark>=4", "pytest-xdist>=3", "hypothesis>=6", "numpy",
                 "scikit-learn>=1.3", "matplotlib>=3.7", "tqdm>=4.60", "rtdl_revisiting_models==0.0.2"],
        "bench": ["matplotlib>=3.7", "tqdm>=4.60", "numpy"],
        "examples": ["scikit-learn>=1.3", "matplotlib>=3.7"],
    },
)
