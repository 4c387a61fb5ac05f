from pathlib import Path

from setuptools import find_packages, setup


def _pins(name: str) -> list[str]:
    return [line.strip() for line in Path(name).read_text().splitlines()
            if line.strip() and not line.startswith("#")]


setup(
    name="sa2va_hooks",
    version="0.1.0",
    description="mmengine/xtuner hooks that export exactly what was trained: merged LoRA, HF snapshots, "
                "fingerprints, and verify/diff tools",
    python_requires=">=3.10",
    packages=find_packages(include=["sa2va_hooks", "sa2va_hooks.*"]),
    install_requires=_pins("requirements.txt"),
    extras_require={
        # xtuner pins bitsandbytes==0.45.0, which does not import with torch 2.14.1 and breaks PEFT;
        # scripts/setup_env.sh installs bitsandbytes==0.49.2 afterwards (docs/environment.md).
        "xtuner": ["xtuner==0.2.0"],
        # DeepSpeed launch modes (in-loop ZeRO-3 gathers, offline re-export of iter_N.pth/ directories).
        # 0.19 removed deepspeed.runtime.fp16.onebit, which mmengine 0.10.x imports, so it cannot train
        # under mmengine; 0.18.9 is the version the tests run (docs/environment.md).
        "deepspeed": ["deepspeed>=0.18.9,<0.19"],
        "test": ["xtuner==0.2.0", "deepspeed==0.18.9", "pytest==8.3.4", "psutil==7.2.2", "matplotlib==3.11.2"],
    },
    entry_points={"console_scripts": ["sa2va-hooks=sa2va_hooks.cli:main"]},
)
