from setuptools import find_packages, setup

setup(
    name="vq-layers",
    version="0.1.0",
    description="Vector-quantization layers (VQ, residual VQ, LFQ, FSQ) exact under every precision mix",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["vq_layers", "vq_layers.*"]),
    python_requires=">=3.10",  # torch 2.13's own floor
    # torch 2.13 is the oldest release the test suite passes on: torch <= 2.6 cannot import vq_layers
    # (torch.library.custom_op rejects its list[Tensor | None] annotations), and on 2.7-2.12 the
    # torch.compile(fullgraph=True) tests fail inside dynamo
    install_requires=["torch>=2.13", "einops>=0.8"],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-timeout",
            "hypothesis>=6",
            # the README's test command runs `ruff check .` first (rules in ruff.toml)
            "ruff==0.17.6",
            # the examples' smoke tests and the drop-in parity tests need these
            "tqdm",
            "matplotlib",
            "scikit-learn",
            "vector-quantize-pytorch==1.32.0",
            # the Triton kernels' tests run them in triton's interpreter on the CPU
            "triton>=3.2; platform_system == 'Linux'",
        ],
        "triton": ["triton>=3.2"],
        "examples": ["tqdm", "matplotlib", "scikit-learn"],
        "bench": ["vector-quantize-pytorch==1.32.0", "matplotlib"],
    },
)
