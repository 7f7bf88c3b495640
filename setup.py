"""Install metadata for alignjax.

Ranges are the ones tested (see .ci/constraints.txt for the exact pins CI installs). Extras:
  [dev]  tests, notebook execution, lint
  [ref]  fixture generation only: torch (CPU wheel, exact pin; a bare `torch` pulls a CUDA build)
         plus the reference packages. Never needed to run or test alignjax.
"""

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(
    r'^__version__ = "([^"]+)"', (HERE / "alignjax" / "__init__.py").read_text(), re.M
).group(1)

INSTALL_REQUIRES = [
    "jax>=0.10.0,<0.11",
    "jaxlib>=0.10.0,<0.11",
    "flax>=0.12.0,<0.13",
    "optax>=0.2.5,<0.3",
    "orbax-checkpoint>=0.11.0,<0.13",
    "chex>=0.1.90,<0.2",
    "transformers>=5.0,<6",
    "datasets>=4.0,<6",
    "tokenizers>=0.21,<0.24",
    "jinja2>=3.1,<4",
    "safetensors>=0.5,<1",
    "tqdm>=4.66,<5",
    "tensorboardX>=2.6,<3",
    "pyyaml>=6.0,<7",
    "matplotlib>=3.8,<4",  # training curves (curves.png)
    "numpy>=1.26,<3",
]

EXTRAS = {
    "dev": [
        "pytest>=8.0,<10",
        "pytest-xdist>=3.5,<4",
        "nbclient>=0.10,<0.12",
        "nbformat>=5.10,<6",
        "ipykernel>=6.29,<8",
        "ruff>=0.6,<0.18",
    ],
    "ref": [
        "torch==2.13.0",
        "trl==1.16.0",
        "peft==0.21.2",
        "adamp==0.3.0",
        "transformers>=5.0,<6",
    ],
}

setup(
    name="alignjax",
    version=VERSION,
    description="Exact, fast, composable preference alignment in JAX/Flax",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["alignjax", "alignjax.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    # The shipped synthetic data and tokenizer (alignjax/data/synthetic.py writes them).
    package_data={
        "alignjax.data": ["assets/reviews/*.jsonl", "assets/tokenizer/*.json"],
        "alignjax.train": ["trl_fields.json"],
    },
    entry_points={"console_scripts": ["alignjax = alignjax.cli:entry"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3.11",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
