from setuptools import find_packages, setup

setup(
    name="ia3-kernels",
    version="0.1.0",
    description="Triton kernels that make (IA)^3 fine-tuning and serving cost what the frozen "
                "base model costs: fused drop-in layers for Hugging Face PEFT.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["ia3_kernels", "ia3_kernels.*", "ia3", "ia3.*", "benchmarks",
                                    "benchmarks.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.6",
        "triton>=3.3",
        "peft>=0.15",
        "transformers>=4.45",
        "bitsandbytes>=0.45",
        "safetensors",
    ],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "hypothesis", "matplotlib"],
        "bench": ["matplotlib"],
    },
)
