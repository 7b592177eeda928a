"""The CPU a benchmark ran on: its model name and the flags that decide which kernels run."""

import platform
import re
from pathlib import Path

FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "asimd", "sve")


def cpu_name(threads: int = 2) -> dict:
    """`{"model", "family_model", "flags", "threads"}` from /proc/cpuinfo (platform's name elsewhere)."""
    name, flags, family, model = platform.processor() or platform.machine(), set(), None, None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key, value = key.strip(), value.strip()
            if key == "model name" and name in ("", platform.machine(), platform.processor()):
                name = value
            elif key in ("flags", "Features"):
                flags = set(value.split())
            elif key == "cpu family" and family is None:
                family = value
            elif key == "model" and model is None:
                model = value
    except OSError:
        pass
    return {"model": name, "family_model": f"{family}/{model}" if family else None,
            "flags": [f for f in FLAGS if f in flags], "threads": threads}


def cpu_slug(cpu: dict) -> str:
    """A file-name part naming the CPU kind: model words and its widest vector unit."""
    words = re.sub(r"[^a-z0-9]+", "-", cpu["model"].lower()).strip("-")
    flags = cpu["flags"]
    unit = ("amx" if "amx_bf16" in flags else "avx512-bf16" if "avx512_bf16" in flags else
            "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "neon" if "asimd" in flags else "base")
    family = (cpu.get("family_model") or "").replace("/", "-")
    return "-".join(p for p in (words, f"f{family}" if family else "", unit) if p)


def describe(cpu: dict) -> str:
    return f"{cpu['model']} (family/model {cpu.get('family_model')}; {', '.join(cpu['flags']) or 'no AVX2'})"
