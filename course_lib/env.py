"""Device, dtype, run sizes and the hardware stamp. Built in notebooks/00_setup.ipynb."""

from __future__ import annotations

import os
import platform
import sys
from dataclasses import asdict, dataclass
from importlib import metadata

import torch

DEVICE_ENV = "COURSE_DEVICE"  # force a device: cpu, cuda, cuda:1, mps
DTYPE_ENV = "COURSE_DTYPE"  # force a dtype: float32, bfloat16, float16
MODEL_ENV = "COURSE_MODEL"  # which preset the notebooks load (see course_lib.models)

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """CUDA, then MPS, then CPU; `device` or $COURSE_DEVICE overrides, and is checked."""
    requested = device if device is not None else os.environ.get(DEVICE_ENV) or None
    if requested is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(requested)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {requested!r}: use cpu, cuda, cuda:N or mps") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"device {requested!r} was asked for, but this machine has no CUDA GPU that torch "
            f"can use (torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}). "
            f"Unset {DEVICE_ENV} or pass device='cpu'."
        )
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise RuntimeError(f"device {requested!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError(f"device {requested!r} was asked for, but MPS is not available here")
    return dev


def pick_dtype(device: torch.device, dtype: str | torch.dtype | None = None) -> torch.dtype:
    """fp32 on CPU, bf16 on GPUs that support it, fp16 on older GPUs (T4) and MPS."""
    requested = dtype if dtype is not None else os.environ.get(DTYPE_ENV) or None
    if isinstance(requested, torch.dtype):
        return requested
    if requested is not None:
        if requested not in _DTYPES:
            raise ValueError(f"unknown dtype {requested!r}: choose one of {sorted(set(_DTYPES))}")
        return _DTYPES[requested]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


def synchronize(device: torch.device | str) -> None:
    """Wait for queued GPU work, so that a clock read after this means something."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def free_memory_bytes(device: torch.device | str) -> int:
    """Memory a new allocation can still get on the device: free GPU memory on CUDA, available RAM
    on the CPU (and on MPS, which shares it)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def fits_in_memory(needed_bytes: float, device: torch.device | str, headroom: float = 0.8) -> bool:
    """True when needed_bytes fit in headroom x the device's free memory. Notebooks use it to
    shrink or skip a cell, with a printed reason, instead of running out of memory."""
    return needed_bytes <= headroom * free_memory_bytes(device)


@dataclass(frozen=True)
class RunSizes:
    """How big the notebooks' experiments are; one place that adapts to the device."""

    new_tokens: int  # tokens generated per timed run
    repeats: int  # timed repeats (we report the median)
    warmup: int  # untimed runs first
    max_batch: int  # largest batch in batching sweeps


def run_sizes(device: torch.device | str) -> RunSizes:
    """Small sizes on CPU (each notebook in a few minutes), larger ones on a GPU."""
    if torch.device(device).type == "cpu":
        return RunSizes(new_tokens=32, repeats=3, warmup=1, max_batch=8)
    return RunSizes(new_tokens=128, repeats=5, warmup=2, max_batch=64)


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@dataclass(frozen=True)
class HardwareStamp:
    """Where a measurement was taken; attached to every saved result."""

    cpu: str
    cpu_cores: int
    ram_gib: float | None
    gpu: str | None
    gpu_memory_gib: float | None
    platform: str
    python: str
    torch: str
    transformers: str | None
    bitsandbytes: str | None

    def short(self) -> str:
        """One line for printing next to a number."""
        where = f"{self.gpu} ({self.gpu_memory_gib:.0f} GiB)" if self.gpu else f"{self.cpu_cores}-core CPU"
        return f"{where}, torch {self.torch}"

    def as_dict(self) -> dict:
        return asdict(self)


def hardware_stamp() -> HardwareStamp:
    """CPU model and cores, RAM, GPU name and memory, and the library versions."""
    gpu = gpu_mem = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu, gpu_mem = props.name, round(props.total_memory / 2**30, 1)
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        gpu = "Apple MPS"
    ram = None
    try:
        ram = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    return HardwareStamp(
        cpu=_cpu_model(),
        cpu_cores=os.cpu_count() or 1,
        ram_gib=ram,
        gpu=gpu,
        gpu_memory_gib=gpu_mem,
        platform=platform.platform(),
        python=sys.version.split()[0],
        torch=torch.__version__,
        transformers=_version("transformers"),
        bitsandbytes=_version("bitsandbytes"),
    )
