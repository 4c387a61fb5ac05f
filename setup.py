from setuptools import find_packages, setup

# Ranges, not pins: this package goes into environments that already train (Sa2VA's: torch 2.4,
# transformers 4.42-4.49, peft 0.11.1). Each lower bound is the lowest version the whole test
# suite passes on (requirements/sa2va.txt); the newest tested versions are in requirements/newest.txt.
# No upper bounds: none is known to break (README, "Install into an existing environment").
INSTALL_REQUIRES = [
    "torch>=2.4.1",
    "transformers>=4.42.4",
    "peft>=0.11.1",
    "mmengine>=0.10.6",
    "safetensors>=0.4.3",
    "xxhash>=3.4.1",
    "numpy>=1.26.4",
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
        # xtuner 0.2.0 pins bitsandbytes==0.45.0, which PEFT cannot use with torch >= 2.6 (triton.ops is
        # gone); after this extra run: pip install 'bitsandbytes>=0.45.1' (README; importing sa2va_hooks
        # says so if it is needed).
        "xtuner": ["xtuner>=0.2.0"],
        # DeepSpeed launch modes. 0.19 removed deepspeed.runtime.fp16.onebit, which mmengine 0.10.x imports,
        # so it cannot train under mmengine (docs/environment.md).
        "deepspeed": ["deepspeed>=0.18.9,<0.19"],
        "test": ["pytest>=8.3", "psutil>=5.9", "matplotlib>=3.8"],
    },
    entry_points={"console_scripts": ["sa2va-hooks=sa2va_hooks.cli:main"]},
)
