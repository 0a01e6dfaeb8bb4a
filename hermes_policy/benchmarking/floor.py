"""The physical floor of a forward pass: weights read once at the measured bandwidth.

A question prefill (tens of tokens) and one decode step are memory-bound: every weight
matrix must be read from device memory at least once, and at these token counts the
arithmetic takes less time than that read. So the floor of either is

    max(weight bytes / memory bandwidth, 2 * parameters * tokens / matmul rate)

with both rates *measured* on the machine (a large device-to-device copy, counting bytes
read plus written; a large bf16 matrix product), not taken from a datasheet.

"Weights read" counts every parameter of the language model that a forward reads in
full: the decoder layers, the final norm and the LM head. The input embedding table is
not counted: a forward reads only the rows of its tokens.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch

from hermes_policy.models.base import ModelAdapter


def forward_weight_bytes(adapter: ModelAdapter) -> tuple[int, int]:
    """(bytes, parameters) of the language-model weights one forward reads in full."""
    text_model = adapter.text_model
    embedding = text_model.get_input_embeddings().weight
    seen: set[int] = {id(embedding)}
    total_bytes = total_params = 0
    modules = [text_model, adapter.model.get_output_embeddings()]
    for module in modules:
        for param in module.parameters():
            if id(param) in seen:
                continue
            seen.add(id(param))
            total_bytes += param.numel() * param.element_size()
            total_params += param.numel()
    return total_bytes, total_params


def floor_ms(weight_bytes: int, bandwidth: float, flops: float = 0.0, flop_rate: float | None = None) -> float:
    """Floor in milliseconds: ``max(bytes / bandwidth, flops / flop_rate)``.

    Parameters
    ----------
    weight_bytes : bytes that must be read
    bandwidth : bytes per second
    flops : arithmetic of the forward (``2 * params * tokens``)
    flop_rate : FLOP per second (None: memory term only)
    """
    if bandwidth <= 0:
        raise ValueError("bandwidth must be positive")
    memory = weight_bytes / bandwidth
    compute = flops / flop_rate if flop_rate else 0.0
    return max(memory, compute) * 1e3


def forward_flops(params: int, tokens: int) -> float:
    """Matrix arithmetic of a forward over ``tokens`` tokens: ``2 * params * tokens``."""
    return 2.0 * params * tokens


@dataclass
class DeviceCeilings:
    """Measured ceilings of one GPU."""

    name: str
    bandwidth: float  # bytes/s, read + write
    matmul_rate: float  # FLOP/s, bf16

    def as_dict(self) -> dict[str, float | str]:
        return {
            "device": self.name,
            "copy_bandwidth_tb_s": self.bandwidth / 1e12,
            "bf16_matmul_tflop_s": self.matmul_rate / 1e12,
        }


def median_cuda_ms(fn: Callable[[], object], repeats: int = 10, warmup: int = 3) -> float:
    """Median milliseconds of ``fn`` on the current CUDA stream, timed with events after a warm-up."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def measure_ceilings(device: torch.device | str = "cuda", copy_gb: float = 4.0, repeats: int = 20) -> DeviceCeilings:
    """Measure copy bandwidth and bf16 matmul rate (random data, warmed up, median)."""
    device = torch.device(device)
    with torch.cuda.device(device):  # the timing events live on the current device
        return _measure_ceilings(device, copy_gb, repeats)


def _measure_ceilings(device: torch.device, copy_gb: float, repeats: int) -> DeviceCeilings:
    n = int(copy_gb * 1e9) // 2
    src = torch.randn(n, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    copy_ms = median_cuda_ms(lambda: dst.copy_(src), repeats)
    bandwidth = 2 * src.numel() * src.element_size() / (copy_ms / 1e3)
    size = 8192
    a = torch.randn(size, size, dtype=torch.bfloat16, device=device)
    b = torch.randn(size, size, dtype=torch.bfloat16, device=device)
    mm_ms = median_cuda_ms(lambda: a @ b, repeats)
    rate = 2 * size**3 / (mm_ms / 1e3)
    return DeviceCeilings(torch.cuda.get_device_name(device), bandwidth, rate)
