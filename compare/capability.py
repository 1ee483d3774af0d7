"""What the device a worker runs on can do, and its peak rate for MFU."""

from __future__ import annotations

# Dense peak TFLOP/s by (device name fragment, precision column), from the vendors' data
# sheets. fp16/bf16: tensor cores; tf32: TF32 tensor cores; fp32: the CUDA cores.
PEAK_TFLOPS = {
    "H200": {"fp32": 66.9, "tf32": 494.7, "fp16": 989.4, "bf16": 989.4},
    "H100": {"fp32": 66.9, "tf32": 494.7, "fp16": 989.4, "bf16": 989.4},
    "A100": {"fp32": 19.5, "tf32": 156.0, "fp16": 312.0, "bf16": 312.0},
    "A30": {"fp32": 10.3, "tf32": 82.0, "fp16": 165.0, "bf16": 165.0},
    "A10": {"fp32": 31.2, "tf32": 62.5, "fp16": 125.0, "bf16": 125.0},
}


def peak_tflops(device_name: str, precision: str) -> float | None:
    """The data-sheet peak for this device and column, or None (CPUs, unknown GPUs)."""
    for fragment, rates in PEAK_TFLOPS.items():
        if fragment in device_name:
            return rates[precision]
    return None


def unsupported(precision: str, platform: str, compute_capability: float | None) -> str | None:
    """Why this device cannot run the column, or None if it can."""
    if precision == "tf32" and (platform != "gpu" or (compute_capability or 0) < 8.0):
        return "TF32 needs an NVIDIA GPU of compute capability 8.0 or newer (Ampere+)"
    if precision == "bf16" and platform == "gpu" and (compute_capability or 0) < 8.0:
        return "bf16 needs an NVIDIA GPU of compute capability 8.0 or newer (Ampere+)"
    return None
