"""Facts about the machine a verdict or a served answer comes from: the cores a process may use, and the CPU
features that choose ONNX Runtime's INT8 kernels.

INT8 answers differ between kernel families (AVX2's u8s8 path saturates 16-bit sums, AVX-512 VNNI and AMX do
not), so a parity record says where it was judged (``judged_on``) and a load test says where the model was
served (``served_on``); when the two differ, the served check is the evidence for the serving machine.
"""

from __future__ import annotations

import functools
import os
import platform

# the CPU flags that pick ONNX Runtime's (MLAS) integer kernels, strongest first
KERNEL_FLAGS = ("amx_int8", "amx_tile", "avx512_vnni", "avx_vnni", "avx512bw", "avx512f", "avx2", "asimddp", "i8mm")
FAMILIES = (("amx_int8", "amx"), ("avx512_vnni", "avx512-vnni"), ("avx_vnni", "avx-vnni"), ("avx512bw", "avx512"),
            ("avx2", "avx2"), ("i8mm", "arm-i8mm"), ("asimddp", "arm-dotprod"))


def cores() -> int:
    """Compute threads this process may use: the CPU affinity, or OMP_NUM_THREADS where the user set it lower."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    omp = os.environ.get("OMP_NUM_THREADS", "")
    return max(1, min(n, int(omp))) if omp.isdigit() and int(omp) > 0 else n


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> tuple[str, tuple[str, ...]]:
    model, flags = platform.processor() or platform.machine(), ()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "Hardware") and model in ("", platform.machine(), platform.processor()):
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = tuple(value.split())
                if model and flags and key == "":
                    break
    except OSError:
        pass
    return model, tuple(f for f in KERNEL_FLAGS if f in flags)


def kernel_family(flags) -> str:
    """The INT8 kernel family these CPU flags select: amx, avx512-vnni, avx-vnni, avx512, avx2, arm-..., or other."""
    return next((name for flag, name in FAMILIES if flag in flags), "other")


EXACT_INT8_ENV = "MODELSHIP_INT8_EXACT"
EXACT_FAMILIES = ("amx", "avx512-vnni", "avx-vnni", "arm-i8mm", "arm-dotprod")  # INT8 dot products summed exactly


def exact_int8() -> bool:
    """Whether ONNX Runtime should use its exact INT8 path on x86 CPUs without VNNI ($MODELSHIP_INT8_EXACT=1): their
    fast u8s8 kernels saturate 16-bit sums, so INT8 answers (and verdicts) differ from what VNNI and AMX CPUs
    compute; the exact path computes the same integers as those, slower (see the README)."""
    return os.environ.get(EXACT_INT8_ENV, "").strip().lower() in ("1", "true", "yes")


def kernel_facts(provider: str | None = None) -> dict:
    """Where a computation ran: CPU model, the flags that choose ONNX Runtime's kernels, their family, how INT8 sums
    accumulate there (``exact`` or ``saturating``), the onnxruntime version and the provider (``torch`` for
    PyTorch eager)."""
    model, flags = _cpuinfo()
    try:
        import onnxruntime

        ort = onnxruntime.__version__
    except Exception:  # noqa: BLE001 — not installed where only torch runs
        ort = None
    family = kernel_family(flags)
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")  # SSE4.1 / AVX2 / AVX-512 saturate
    exact = family in EXACT_FAMILIES or exact_int8() or not x86
    return {"cpu": model, "flags": list(flags), "kernels": family, "int8": "exact" if exact else "saturating",
            "onnxruntime": ort, "provider": provider, "arch": platform.machine()}


def differences(judged: dict | None, served: dict | None) -> list[str]:
    """What differs between where a verdict was judged and where the model is served that can change an answer
    (empty: the same INT8 arithmetic, runtime and provider)."""
    if not judged or not served:
        return []
    out = []
    for key, what in (("int8", "INT8 arithmetic"), ("onnxruntime", "onnxruntime version"),
                      ("provider", "execution provider")):
        if judged.get(key) != served.get(key):
            out.append(f"{what}: judged with {judged.get(key)} ({judged.get('kernels')}), served with "
                       f"{served.get(key)} ({served.get('kernels')})")
    return out


def describe(facts: dict | None) -> str:
    if not facts:
        return "unknown"
    return (f"{facts.get('cpu')} ({facts.get('kernels')} kernels, {facts.get('int8')} INT8), onnxruntime "
            f"{facts.get('onnxruntime')}, {facts.get('provider')}")
