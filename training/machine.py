"""Which machine a figure was measured on, recorded next to it.

Training is seeded, so on one machine a run reproduces its accuracy to the digit; on another CPU
the math libraries pick other kernels (AVX-512 or AVX2 code paths, other summation orders), the
floating-point results differ in the last bits, and twelve epochs carry that into a few offers of
difference. A figure without its machine cannot tell that apart from a change in the code.
"""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path

__all__ = ["describe_machine", "parse_cpuinfo"]

_PACKAGES = ("torch", "numpy", "onnxruntime", "scikit-learn")
# The vector extensions the math libraries dispatch on; virtual machines often name the CPU only
# "Intel(R) Xeon(R) Processor", so the model name alone does not tell two of them apart
_CPU_FEATURES = (
    "avx2",
    "fma",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "avx_vnni",
    "asimd",
    "sve",
)


def describe_machine() -> dict:
    """CPU model and vector extensions, core count, the instruction set torch computes with, and
    the versions that decide the arithmetic (torch, numpy, ONNX Runtime, scikit-learn; absent
    ones left out)."""
    model, flags = _cpu_info()
    facts = {
        "cpu": model,
        "cpu_features": [flag for flag in _CPU_FEATURES if flag in flags],
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    try:
        import torch
    except ImportError:  # serving installs and benchmarks without the training extra
        pass
    else:
        facts["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        facts["torch_threads"] = torch.get_num_threads()
        facts["cuda_device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    versions = {}
    for package in _PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    facts["versions"] = versions
    return facts


def _cpu_info() -> tuple[str, set[str]]:
    """The CPU's model name and feature flags, read from /proc/cpuinfo where there is one."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    model, flags = parse_cpuinfo(text)
    return model or platform.processor() or platform.machine(), flags


def parse_cpuinfo(text: str) -> tuple[str, set[str]]:
    """The first processor's model name and feature flags (x86 ``flags``, Arm ``Features``) in
    /proc/cpuinfo text; empty where the text has none."""
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    return model, flags
