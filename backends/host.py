"""Facts about the host machine: memory, peak RSS, chip name, memory bandwidth.

Framework-free, so both engines and the application layer can use it.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

# Published unified-memory bandwidths (GB/s) of Apple chips; the decode-speed
# ceiling on Metal is computed from these (measuring it from Python would
# understate it). Keys are matched against the CPU brand string, longest first.
APPLE_BANDWIDTH_GBS = {
    "M1": 68.25, "M1 Pro": 200, "M1 Max": 400, "M1 Ultra": 800,
    "M2": 100, "M2 Pro": 200, "M2 Max": 400, "M2 Ultra": 800,
    "M3": 100, "M3 Pro": 150, "M3 Max": 400, "M3 Ultra": 819,
    "M4": 120, "M4 Pro": 273, "M4 Max": 546,
    "M5": 153,
}


def is_apple_silicon() -> bool:
    return sys.platform == "darwin" and platform.machine() == "arm64"


def chip_name() -> str:
    if sys.platform == "darwin":
        try:
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"],
                                  capture_output=True, text=True, timeout=5).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def apple_bandwidth_gbs(chip: str) -> float | None:
    for key in sorted(APPLE_BANDWIDTH_GBS, key=len, reverse=True):
        if re.search(rf"\b{re.escape(key)}\b", chip):
            return APPLE_BANDWIDTH_GBS[key]
    return None


def total_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def available_memory_bytes() -> int:
    """Memory a new model can use: MemAvailable on Linux, physical memory elsewhere."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return total_memory_bytes()


def peak_rss_bytes() -> int:
    """Process peak resident set size (VmHWM on Linux, ru_maxrss elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def current_rss_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return peak_rss_bytes()


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux only); False where impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


_measured_bandwidth: float | None = None


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def measured_read_bandwidth_gbs(size_mb: int = 1024, repeats: int = 10) -> float:
    """Host memory read bandwidth: 1 GiB read on every core at once, by the fastest of a few
    read kernels, best of `repeats`.

    Any kernel's read rate is a lower bound on the bandwidth (contention only lowers it), so the
    best one wins. A numpy sum alone was not enough: it read 11.7-17 GB/s where llama.cpp's
    float32 decode read 14.7 on the same machine. A dot product of each core's two halves (STREAM's
    read-only kernel, SIMD in the BLAS) and a max read ~21-24 there. Cached per process.
    """
    global _measured_bandwidth
    if _measured_bandwidth is None:
        workers = usable_cores()
        data = np.ones(size_mb * 2**20 // 4, dtype=np.float32)
        parts = [p[: len(p) // 2 * 2] for p in np.array_split(data, workers)]
        kernels = (lambda p: np.dot(p[: len(p) // 2], p[len(p) // 2:]), np.max, np.sum)
        read = sum(p.nbytes for p in parts)
        best = 0.0
        with ThreadPoolExecutor(workers) as pool:  # numpy releases the GIL in each kernel
            for kernel in kernels:
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    list(pool.map(kernel, parts))
                    best = max(best, read / (time.perf_counter() - t0) / 1e9)
        _measured_bandwidth = best
    return _measured_bandwidth


def memory_bandwidth(device: str) -> tuple[float | None, str]:
    """(GB/s, source) of the memory a model on `device` reads its weights from during decode,
    where the host can tell: Apple GPUs (gpu, mps), the chip's published figure; otherwise the
    host's memory, measured here. Engines with other devices (CUDA) measure their own."""
    if device in ("gpu", "mps"):
        chip = chip_name()
        value = apple_bandwidth_gbs(chip)
        return value, f"published figure for {chip}" if value else f"unknown chip {chip!r}"
    return (measured_read_bandwidth_gbs(),
            "measured host read bandwidth (1 GiB read on every core by the fastest of numpy dot, max "
            "and sum, best of 10)")
