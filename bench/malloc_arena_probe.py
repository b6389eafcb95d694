"""How much memory glibc keeps after loader-style threads free expert-sized buffers (a lead for bench/RESULTS.md run
6: the bench process held 32-47 GB resident under a 12 GB host budget). 16 threads each allocate, touch and free
the parts of V3-width experts (7.3 MB packed + 0.9 MB scales, x3) as disk reads do, holding two at a time; then
every buffer is freed and the resident set is printed: with the default malloc (per-thread arenas, a dynamic mmap
threshold that rises to the freed sizes), with a fixed 1 MB mmap threshold, and after malloc_trim(0). Linux/glibc.

    python bench/malloc_arena_probe.py [default|threshold|trim]
"""

from __future__ import annotations

import ctypes
import random
import sys
import threading
import time

import numpy as np

PARTS = [7_340_032, 917_504] * 3                   # one V3 expert: gate, up, down packed bytes and scales


def rss_mb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) // 1024 for line in f if line.startswith("VmRSS"))


def worker(seed: int, reads: int) -> None:
    r, held = random.Random(seed), []
    for _ in range(reads):
        held.append([np.ones(n, np.uint8) for n in PARTS])             # a read, touched
        if len(held) > 2:
            held.pop(r.randrange(len(held)))                              # consumed in some order


def main(mode: str = "default") -> int:
    libc = ctypes.CDLL("libc.so.6")
    if mode == "threshold":
        libc.mallopt(-3, 1 << 20)                                         # M_MMAP_THRESHOLD: fixed 1 MB
    base = rss_mb()
    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i, 300)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(f"{mode}: every buffer freed; resident {rss_mb()} MB (at start {base} MB), "
          f"{time.perf_counter() - t0:.1f} s of allocating")
    if mode == "trim":
        libc.malloc_trim(0)
        print(f"after malloc_trim(0): resident {rss_mb()} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
