from setuptools import find_packages, setup

# Ranges, not pins: this package goes into environments that already train (Sa2VA's two stacks, both
# on Python 3.11 with xtuner 0.1.23: `latest`, transformers 4.57.0 + peft 0.17.1, and `legacy`, transformers
# 4.49.0 + peft 0.11.1, with mmengine 0.10.7 and torch >= 2.6). Each lower bound but torch's is the lowest
# version the whole test suite runs on: requirements/legacy.txt. torch is the exception: the suite runs on
# torch 2.14.1 only (this machine's pip cap; every stack has it); the bound is Sa2VA's own floor, 2.6,
# because a higher one would make pip replace the CUDA torch of a Sa2VA environment (docs/environment.md).
# The newest tested versions are in requirements/newest.txt.
# No upper bounds: none is known to break (README, "Install into an existing environment").
INSTALL_REQUIRES = [
    "torch>=2.6",
    "transformers>=4.49.0",
    "peft>=0.11.1",
    "mmengine>=0.10.7",
    "safetensors>=0.4.3",
    "xxhash>=3.4.1",
    "numpy>=2.0.2",
    "packaging>=24.1",
    "tqdm>=4.66.4",
]

setup(
    name="sa2va_hooks",
    version="0.1.0",
    description="mmengine/xtuner hooks that export exactly what was trained: merged LoRA, HF snapshots, "
                "fingerprints, and verify/diff tools",
    python_requires=">=3.10",
    packages=find_packages(include=["sa2va_hooks", "sa2va_hooks.*"]),
    include_package_data=True,
    install_requires=INSTALL_REQUIRES,
    extras_require={
        # Sa2VA pins xtuner 0.1.23 (not on PyPI; install it from its source tag or a wheel first, README).
        # xtuner 0.2.0 also satisfies this, but pins bitsandbytes==0.45.0, which PEFT cannot use with
        # torch >= 2.6 (triton.ops is gone): then run pip install 'bitsandbytes>=0.45.1' (importing
        # sa2va_hooks says so if it is needed).
        "xtuner": ["xtuner>=0.1.23"],
        # DeepSpeed launch modes. 0.19 removed deepspeed.runtime.fp16.onebit, which mmengine 0.10.x imports,
        # so it cannot train under mmengine (docs/environment.md).
        "deepspeed": ["deepspeed>=0.18.9,<0.19"],
        "test": ["pytest>=8.3", "psutil>=5.9", "matplotlib>=3.8"],
    },
    entry_points={"console_scripts": ["sa2va-hooks=sa2va_hooks.cli:main"]},
)
