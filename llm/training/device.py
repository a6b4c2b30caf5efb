"""Device and precision choice, shared by training, evaluation and generation."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets, matched by device name.
GPU_PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10": 125e12,
    "L4": 121e12,
    "4090": 165e12,
    "3090": 71e12,
}


def select_device(name: str = "auto") -> torch.device:
    """Return the torch device for ``name``; ``auto`` picks cuda, then mps, then cpu.

    Raises ValueError when a named device is not available on this machine.
    """
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for, but torch sees no CUDA GPU; use device: auto or cpu")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("device 'mps' was asked for, but it is not available; use device: auto or cpu")
    return torch.device(name)


def select_dtype(name: str, device: torch.device) -> torch.dtype:
    """Compute dtype for autocast: ``auto`` is bf16 on CUDA GPUs that support it, else float32."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name == "bfloat16" and device.type == "cpu":
        log.warning("bfloat16 autocast on CPU is slow on most processors; float32 is usually faster")
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Autocast context for the forward pass; a no-op for float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels so wall-clock timings are honest."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


_measured_cpu_peak: float | None = None


def peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """Peak FLOP/s used as the MFU denominator.

    GPUs: the data-sheet dense peak for bf16 (half of it for fp32 TF32 is not assumed; fp32 uses the
    same table, so fp32 MFU reads low). CPUs have no data sheet here, so the peak is *measured* once
    as the best of a few 1024x1024 float32 matmuls: CPU MFU is relative to what this machine's BLAS reaches.
    """
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in GPU_PEAK_BF16_FLOPS.items():
            if key in name:
                return flops
        log.warning("unknown GPU %r: MFU is reported against 312 TFLOP/s (A100 bf16)", name)
        return 312e12
    global _measured_cpu_peak
    if _measured_cpu_peak is None:
        _measured_cpu_peak = matmul_flops()
    return _measured_cpu_peak


def matmul_flops(clock: Callable[[], float] = time.perf_counter, n: int = 1024) -> float:
    """The best float32 n x n matmul rate on this CPU, in FLOP/s, of ten timed by ``clock`` after three warm-ups
    (``time.thread_time`` times only this thread's CPU, for a shared machine)."""
    g = torch.Generator().manual_seed(0)  # own generator: measuring must not move the global RNG
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    for _ in range(3):  # warm up the thread pool and caches
        a @ b
    best = float("inf")
    for _ in range(10):
        t0 = clock()
        a @ b
        best = min(best, clock() - t0)
    return 2 * n**3 / best
