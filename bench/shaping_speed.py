"""Benchmark: our out-of-place ASH variants vs the authors' in-place topk + scatter reference.

For each float32 CPU input shape and variant, times the reference (on a fresh copy of the input made
outside the timed region, since it works in place) and ours (on the input itself), interleaved, and
reports the medians and the ratio ours / reference (target: <= 1.05).

Run: ``PYTHONPATH=. python bench/shaping_speed.py``
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from ash_lightning.shaping.functional import ash_b, ash_p, ash_rand, ash_s

SHAPES = ((256, 2048), (64, 2048, 7, 7), (256, 512, 4, 4))
PERCENTILE = 65
WARMUP = 2
REPEATS = 15
TARGET = 1.05


def _reference(x: Tensor, variant: str, percentile: float = PERCENTILE) -> Tensor:
    """The authors' in-place ASH (ash_p / ash_b / ash_s / ash_rand), on a (B, n) view of any rank."""
    b = x.shape[0]
    t = x.view(b, -1)
    n = t.shape[1]
    k = n - int(np.round(n * percentile / 100.0))
    s1 = t.sum(dim=1)
    v, i = torch.topk(t, k, dim=1)
    if variant == "ash_p":
        t.zero_().scatter_(dim=1, index=i, src=v)
    elif variant == "ash_b":
        fill = s1 / k
        t.zero_().scatter_(dim=1, index=i, src=torch.ones_like(v) * fill[:, None])
    elif variant == "ash_rand":
        t.zero_().scatter_(dim=1, index=i, src=v.uniform_(0, 10))
    else:
        t.zero_().scatter_(dim=1, index=i, src=v)
        s2 = t.sum(dim=1)
        return x * torch.exp((s1 / s2).view(b, *[1] * (x.dim() - 1)))
    return x


OURS: dict[str, Callable[[Tensor, float], Tensor]] = {
    "ash_p": ash_p,
    "ash_b": ash_b,
    "ash_s": ash_s,
    "ash_rand": ash_rand,
}


def _time(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def compare(x: Tensor, variant: str) -> tuple[float, float]:
    """Median seconds of (reference, ours), timed interleaved after a warm-up."""
    ours = OURS[variant]
    ref_times, our_times = [], []
    for rep in range(WARMUP + REPEATS):
        fresh = x.clone()
        ref_time = _time(functools.partial(_reference, fresh, variant))  # binds this rep's clone
        our_time = _time(lambda: ours(x, PERCENTILE))
        if rep >= WARMUP:
            ref_times.append(ref_time)
            our_times.append(our_time)
    return statistics.median(ref_times), statistics.median(our_times)


def main() -> None:
    torch.manual_seed(0)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, percentile {PERCENTILE}, "
        f"median of {REPEATS} runs\n"
    )
    print("| shape | variant | ref ms | ours ms | ratio |")
    print("|---|---|---:|---:|---:|")
    ratios = []
    for shape in SHAPES:
        x = torch.randn(shape).relu_()
        for variant in OURS:
            ref, ours = compare(x, variant)
            ratios.append(ours / ref)
            print(f"| {tuple(shape)} | {variant} | {ref * 1e3:.2f} | {ours * 1e3:.2f} | {ours / ref:.3f} |")
    verdict = "yes" if max(ratios) <= TARGET else "NO"
    print(f"\nEvery ratio <= {TARGET}: {verdict} (max {max(ratios):.3f})")


if __name__ == "__main__":
    main()
