"""Peak-memory estimate of a build, checked before any weight is loaded.

A build holds the weights while it calibrates, exports and compiles; the backends copy them to different
degrees. Each backend states its factor (`Backend.weight_copies`, peak resident memory over weight bytes),
measured for aoti and onnx on the full-width depth-reduced FLUX.1 variant (bundled:flux1-reduced, 1.03B
parameters) on CPU; see the README.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from svdexport.errors import SvdExportError

GiB = 2**30


@dataclass
class Estimate:
    parameters: int  # transformer parameters
    weight_bytes: int  # parameters x bytes per element of the build dtype
    activation_bytes: int  # largest activations of one full step at the build shapes
    peak_bytes: int  # estimated peak of the whole build
    available_bytes: int  # memory free for it on the build device
    device: str  # "cpu" or "cuda"

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}

    def describe(self) -> str:
        return (f"estimated peak {self.peak_bytes / GiB:.1f} GiB "
                f"({self.parameters / 1e9:.2f}B parameters, {self.weight_bytes / GiB:.1f} GiB of weights), "
                f"{self.available_bytes / GiB:.1f} GiB available on {self.device}")


def available_bytes(device: str) -> int:
    """Memory free for a build: the GPU's free memory, or the host's MemAvailable within any cgroup limit."""
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        limit = open("/sys/fs/cgroup/memory.max").read().strip()
        if limit != "max":
            used = int(open("/sys/fs/cgroup/memory.current").read())
            free = min(free, int(limit) - used)
    except (OSError, ValueError):
        pass
    return free


def estimate(parameters: int, itemsize: int, activations: int, weight_copies: float, device: str) -> Estimate:
    weights = parameters * itemsize
    peak = int(weights * weight_copies) + activations
    return Estimate(parameters, weights, activations, peak, available_bytes(device), device)


def check(e: Estimate, what: str) -> None:
    if e.peak_bytes > e.available_bytes:
        raise SvdExportError(
            f"{what} needs about {e.peak_bytes / GiB:.0f} GiB ({e.parameters / 1e9:.1f}B parameters, "
            f"{e.weight_bytes / GiB:.1f} GiB of weights), but {e.device} has {e.available_bytes / GiB:.1f} GiB "
            "available: build on a machine with more memory, or with smaller --dtype, --height/--width or --batch")
