"""Peak-memory estimate of a build, for host and device separately, checked before any weight is loaded.

A build holds the weights once: a local checkpoint is mapped and the model's weights are views of the
mapping (models/mapped.py; a copy only where the build dtype differs from the file's), the graphs are exported
and compiled without their constants, and engines bind the weights at load (build/bound.py). What a backend
adds on top is its `Backend.weight_copies` (peak over weight bytes, measured on a FLUX.1-width model: see
the README's "Full-size models"), plus the activations of one full step and a fixed overhead (the Python
process, PyTorch and the compilers' working memory).

Where the weights live: on a CPU build, in host memory; on a CUDA build, on the GPU, while the host holds the
mapped checkpoint pages only transiently (the page cache can drop them).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from svdexport.errors import SvdExportError

GiB = 2**30
HOST_OVERHEAD = int(1.5 * GiB)  # the process itself (PyTorch, diffusers, Inductor or the ONNX exporter)


@dataclass
class Estimate:
    parameters: int  # transformer parameters
    weight_bytes: int  # parameters x bytes per element of the build dtype
    activation_bytes: int  # largest activations of one full step at the build shapes
    peak_bytes: int  # estimated peak on the build device (host memory on a CPU build)
    available_bytes: int  # memory free for it on the build device
    device: str  # "cpu" or "cuda"
    host_peak_bytes: int = 0  # estimated peak of host memory (equal to peak_bytes on a CPU build)
    host_available_bytes: int = 0  # host memory free for it

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def describe(self) -> str:
        gpu = (f"; host {self.host_peak_bytes / GiB:.1f} of {self.host_available_bytes / GiB:.1f} GiB"
               if self.device == "cuda" else "")
        return (f"estimated peak {self.peak_bytes / GiB:.1f} GiB on {self.device} "
                f"({self.parameters / 1e9:.2f}B parameters, {self.weight_bytes / GiB:.1f} GiB of weights), "
                f"{self.available_bytes / GiB:.1f} GiB available{gpu}")


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
    if device == "cuda":
        return Estimate(parameters, weights, activations, peak, available_bytes("cuda"), device,
                        HOST_OVERHEAD, available_bytes("cpu"))
    host = peak + HOST_OVERHEAD
    free = available_bytes("cpu")
    return Estimate(parameters, weights, activations, host, free, device, host, free)


def check(e: Estimate, what: str) -> None:
    short = [(e.device, e.peak_bytes, e.available_bytes)]
    if e.device == "cuda":
        short.append(("the host", e.host_peak_bytes, e.host_available_bytes))
    for where, need, have in short:
        if need > have:
            raise SvdExportError(
                f"{what} needs about {need / GiB:.0f} GiB on {where} ({e.parameters / 1e9:.1f}B parameters, "
                f"{e.weight_bytes / GiB:.1f} GiB of weights), but {where} has {have / GiB:.1f} GiB available: "
                "build on a machine with more memory, or with smaller --dtype, --height/--width or --batch")
