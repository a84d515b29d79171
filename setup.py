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
    # The range holds every triton a supported torch pins (torch 2.13 -> 3.7.1, 2.14 -> 3.8.x) and
    # 3.9, each tested (README, "Support matrix"), so pip keeps the triton the user's torch brought.
    # Below 3.7 the kernels' APIs are missing; 3.10 and later are untested.
    install_requires=["torch>=2.13", "triton>=3.7.1,<3.10"],
    extras_require={
        "test": ["pytest>=8", "pytest-benchmark>=4", "hypothesis>=6", "numpy", "scikit-learn>=1.3",
                 "matplotlib>=3.7", "tqdm>=4.60"],
        "bench": ["matplotlib>=3.7", "tqdm>=4.60", "numpy"],
        "examples": ["scikit-learn>=1.3", "matplotlib>=3.7"],
    },
)
