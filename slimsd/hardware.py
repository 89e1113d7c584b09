"""What this CPU is and can do, read once from the kernel: shared by serve (``--backend auto``),
the load-test reports and the benchmarks' machine lines."""

from __future__ import annotations

import platform


def cpu_model_and_flags() -> tuple[str, frozenset[str]]:
    """CPU model name and feature flags from ``/proc/cpuinfo`` (Linux); elsewhere the platform's
    processor name and no flags."""
    model, flags = "", frozenset()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and not model:
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return model or platform.processor() or platform.machine(), flags


def cpu_bf16() -> str | None:
    """How this CPU does bf16 matrix math: ``"amx"`` (AMX-BF16 tiles), ``"avx512_bf16"``, or None
    (unknown counts as none, so nothing picks bf16 on a CPU it cannot vouch for)."""
    flags = cpu_model_and_flags()[1]
    return "amx" if "amx_bf16" in flags else ("avx512_bf16" if "avx512_bf16" in flags else None)
