"""fastewc: fast, exact Elastic Weight Consolidation kernels for TensorFlow 2 / Keras 3.

TensorFlow is an extra, not a hard requirement (as in tensorflow-probability): pick
``fastewc[tf-cpu]`` on a CPU-only machine, ``fastewc[tf]`` for the standard build, or
``fastewc[cuda]`` for the CUDA wheels.  Bounds are the versions we have tested.

``fastewc[peers]`` holds the PyTorch peers of ``benchmarks/peers_kfac.py`` (ASDL and
curvlinops, with torch): a benchmark's needs, never the package's.  Install torch's CPU
build first (``torch==2.13.0+cpu``, from PyTorch's CPU wheel index): the plain ``torch``
wheel of the registry is the CUDA build, gigabytes of libraries.  ``make bench-peers``
does both in a venv of its own, ``.venv-peers``.

``fastewc[hub]`` holds what keras_hub needs at run time, except ``tensorflow-text``:
that wheel requires the ``tensorflow`` distribution unconditionally, which pip would
install over ``tensorflow-cpu`` (two distributions writing one ``tensorflow`` package).
keras_hub imports ``tensorflow_text`` only for its tokenizers, lazily, so keras_hub
itself is installed with ``pip install --no-deps "keras-hub<KERAS_HUB bounds>"`` (the
Makefile does it); its models and layers then run on ``tensorflow-cpu``.
"""
from setuptools import find_packages, setup

TF_BOUNDS = ">=2.21,<2.22"
KERAS_HUB = "keras-hub>=0.32,<0.33"      # installed with --no-deps (see above)

setup(
    name="fastewc",
    version="0.1.0",
    description="Fast, exact Elastic Weight Consolidation for TensorFlow 2 / Keras 3",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["fastewc", "fastewc.*"]),
    install_requires=["numpy>=1.26,<3"],
    extras_require={
        "tf": [f"tensorflow{TF_BOUNDS}", "keras>=3.15,<3.16"],
        "tf-cpu": [f"tensorflow-cpu{TF_BOUNDS}", "keras>=3.15,<3.16"],
        "cuda": [f"tensorflow[and-cuda]{TF_BOUNDS}", "keras>=3.15,<3.16"],
        "hub": [
            "regex>=2024.4,<2027",
            "tokenizers>=0.21,<0.24",
            "huggingface-hub>=0.30,<3",
            "sentencepiece>=0.2,<0.3",
            "kagglehub>=0.3,<2,!=1.0.1",
            "kagglesdk==0.1.28",
            "packaging>=23,<27",
            "rich>=13,<16",
        ],
        "peers": [    # tested: torch 2.13.0+cpu, asdfghjkl 0.1a5, curvlinops-for-pytorch 3.0.1
            "torch>=2.13,<2.14",
            "asdfghjkl>=0.1a5,<0.2",
            "curvlinops-for-pytorch>=3.0.1,<3.1",
        ],
        "dev": [
            "pytest>=9.0,<10",
            "pytest-benchmark>=5.3,<6",
            "pytest-xdist>=3.6,<4",    # make test runs on every core (-n 2; tested 3.8.0)
            "tensorboard>=2.21,<2.22",
            "tensorboard-plugin-profile>=2.24,<2.25",
            "scikit-learn>=1.9,<1.10",
            "hypothesis>=6.170,<7",
            "matplotlib>=3.11,<3.12",
        ],
    },
    entry_points={"console_scripts": ["fastewc=fastewc.__main__:main"]},
)
