"""One precision vocabulary for training, prediction and evaluation, resolved in one place.

Values (``seg.config.Precision``): 'auto', 'bf16', 'fp16', 'fp32' ('no', Accelerate's word for
fp32, is accepted from older configs). 'auto' means bf16 where the device computes it natively
(CUDA GPUs with bf16, CPUs with AVX512-BF16 or AMX), else fp16 on a CUDA GPU, else fp32: bf16
keeps fp32's range (no gradient scaler) at half the memory traffic; on a CPU without native bf16
it is emulated and slower than fp32. 'fp16' needs a CUDA GPU (training adds a gradient scaler).

The CPU check reads the kernel's CPU flags (``/proc/cpuinfo``): torch has no public query for
native CPU bf16 (only private ``torch.ops.mkldnn`` / ``torch.cpu._is_*`` helpers). Elsewhere than
Linux the CPU counts as without native bf16 ('auto' is fp32 there; 'bf16' still works).
"""

from __future__ import annotations

import functools

RESOLVED = ("bf16", "fp16", "fp32")
CPU_BF16_FLAGS = {"avx512_bf16", "amx_bf16"}  # x86; aarch64 lists "bf16" in its Features line


@functools.cache
def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True when the CPU flags of ``cpuinfo`` include native bf16 arithmetic."""
    try:
        with open(cpuinfo) as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip().lower() in ("flags", "features"):
                    flags = set(value.split())
                    return bool(flags & CPU_BF16_FLAGS) or "bf16" in flags
    except OSError:
        pass
    return False


def resolve_precision(requested: str, device_type: str, cuda_bf16: bool | None = None) -> str:
    """'auto'/'bf16'/'fp16'/'fp32' (or 'no') on ``device_type`` -> 'bf16', 'fp16' or 'fp32'.

    Args:
        device_type: 'cpu', 'cuda' (or another torch device type, treated like the CPU).
        cuda_bf16: whether the CUDA device has bf16 (detected when None).
    Raises:
        ValueError: a precision the device cannot run, with the one to use instead.
    """
    requested = "fp32" if requested == "no" else requested
    if requested not in ("auto", *RESOLVED):
        raise ValueError(f"precision={requested!r} is not valid; allowed values are 'auto', 'bf16', 'fp16', 'fp32'")
    if device_type == "cuda":
        if cuda_bf16 is None:
            import torch

            cuda_bf16 = torch.cuda.is_bf16_supported()
        if requested == "auto":
            return "bf16" if cuda_bf16 else "fp16"
        if requested == "bf16" and not cuda_bf16:
            raise ValueError("precision 'bf16' is not supported by this GPU; use 'auto' (fp16 here) or 'fp32'")
        return requested
    if requested == "fp16":
        raise ValueError(f"precision 'fp16' needs a CUDA GPU (this run is on {device_type}); "
                         "use 'auto', 'bf16' or 'fp32'")
    if requested == "auto":
        return "bf16" if cpu_has_native_bf16() else "fp32"
    return requested


def autocast_dtype(resolved: str):
    """The torch autocast dtype of a resolved precision; None for fp32 (no autocast)."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[resolved]


def accelerate_name(resolved: str) -> str:
    """Accelerate's ``mixed_precision`` value for a resolved precision ('fp32' is 'no')."""
    return "no" if resolved == "fp32" else resolved
