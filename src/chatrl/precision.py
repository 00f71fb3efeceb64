"""The precision that suits the hardware: bf16 where it is native, fp32 elsewhere.

bf16 halves the bytes per weight, but on a CPU without bf16 instructions every bf16 matrix
product is emulated: measured 75x slower than fp32 on an AVX2 Zen 3 (0.9 against 68 GFLOP/s),
and 2.5x faster on a Zen 4 with AVX-512 BF16 (195 against 78). So every ``bf16`` setting
defaults to ``"auto"``, which turns bf16 on only where it is native.

torch is imported inside the functions: the settings (``config.py``) use ``Precision`` and
stay quick to import.
"""

from __future__ import annotations

import functools
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator


def parse_precision(value: Any) -> Any:
    """``"auto"``, ``"true"`` or ``"false"`` (any case) as a ``Precision``; other words fail."""
    if not isinstance(value, str):
        return value
    words = {"auto": "auto", "true": True, "false": False}
    if value.lower() not in words:
        raise ValueError(f"{value!r}: choose auto, true or false")
    return words[value.lower()]


# A ``bf16`` setting: on, off, or "auto" (bf16 where the hardware runs it natively).
Precision = Annotated[bool | Literal["auto"], BeforeValidator(parse_precision)]
# /proc/cpuinfo flags of native bf16 arithmetic: Intel AMX, AVX-512 BF16, Arm's BF16 extension.
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")


@dataclass(frozen=True)
class Hardware:
    """What the precision choice is made from: the device, its name and whether bf16 is native."""

    device: str  # "cpu" or "cuda"
    name: str  # the CPU model or the GPU's name
    capability: str  # torch's CPU capability (AVX2, AVX512…) or the GPU's compute capability
    bf16_native: bool
    reason: str  # why bf16 is or is not native, in a few words

    def to_json(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "name": self.name,
            "capability": self.capability,
            "bf16_native": self.bf16_native,
        }


def _cpuinfo() -> dict[str, str]:
    """The first value of each key of /proc/cpuinfo (empty where there is none: not Linux)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return {}
    info: dict[str, str] = {}
    for line in lines:
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    return info


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags (x86 ``flags``, Arm ``Features``), or None where unknown."""
    info = _cpuinfo()
    words = info.get("flags") or info.get("Features")
    return set(words.split()) if words else None


def cpu_model() -> str:
    """The CPU's model name, as lscpu shows it."""
    info = _cpuinfo()
    return info.get("model name") or info.get("Model") or platform.processor() or "unknown CPU"


def bf16_probe(size: int = 256, repeats: int = 8) -> bool:
    """Whether a bf16 matrix product runs at least as fast as an fp32 one here (measured, well
    under a second; for CPUs whose flags cannot be read)."""
    import torch

    def seconds(dtype) -> float:
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        a @ b  # warm-up
        started = time.perf_counter()
        for _ in range(repeats):
            a @ b
        return time.perf_counter() - started

    return seconds(torch.bfloat16) <= seconds(torch.float32)


def _torch_capability() -> str:
    """The instruction set torch's CPU kernels use here (AVX2, AVX512…; ATEN_CPU_CAPABILITY)."""
    import torch

    return torch.backends.cpu.get_cpu_capability()


def _cpu_hardware() -> Hardware:
    capability = _torch_capability()
    flags = cpu_flags()
    if flags is None:
        native = bf16_probe()
        reason = (
            f"a measured bf16 matrix product is {'as fast as' if native else 'slower than'} fp32"
        )
    else:
        found = [flag for flag in BF16_CPU_FLAGS if flag in flags]
        native = bool(found)
        reason = (
            f"the CPU has {found[0]}"
            if found
            else f"the CPU ({capability}) has no bf16 instructions"
        )
        if found and "avx2" in flags and capability in ("DEFAULT", "AVX2"):
            # An x86 CPU whose AVX-512 kernels torch does not use (ATEN_CPU_CAPABILITY=avx2):
            # its bf16 goes through AVX2 code, emulated.
            native, reason = False, f"torch runs {capability} kernels here, which emulate bf16"
    return Hardware("cpu", cpu_model(), capability, native, reason)


def _gpu_hardware() -> Hardware | None:
    """The CUDA GPU this process would use, or None without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    native = torch.cuda.is_bf16_supported()
    reason = f"the GPU {'supports' if native else 'does not support'} bf16"
    return Hardware("cuda", torch.cuda.get_device_name(), f"sm_{major}{minor}", native, reason)


@functools.cache
def hardware() -> Hardware:
    """The device this process trains and generates on (the GPU if there is one), described."""
    return _gpu_hardware() or _cpu_hardware()


def resolve_bf16(setting: Precision, what: str) -> bool:
    """Whether ``what`` (a stage or command) runs in bf16: ``"auto"`` where bf16 is native here.

    Says the choice once on stderr (the main process only, under torchrun). An explicit True
    on hardware without native bf16 is kept, with a warning that it will be slow.
    """
    hw = hardware()
    bf16 = hw.bf16_native if setting == "auto" else bool(setting)
    if os.environ.get("RANK", "0") != "0":
        return bf16
    why = f"auto: {hw.reason}" if setting == "auto" else f"bf16 = {str(bf16).lower()}"
    print(f"{what}: precision {'bf16' if bf16 else 'fp32'} ({why})", file=sys.stderr)
    if bf16 and not hw.bf16_native:
        print(
            f"warning: {what} runs in bf16, which this {hw.device} ({hw.name}) only emulates: "
            "expect it many times slower than fp32 (auto chooses by the hardware)",
            file=sys.stderr,
        )
    return bf16
