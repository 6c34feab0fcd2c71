"""Peak memory of one forward: the CUDA allocator's peak, or on CPU the profiler's allocator trace."""

from __future__ import annotations

import torch
from torch import nn

# ------------------------------------------------------------------------------------------ peak memory


def _cpu_peak_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Peak bytes held by the c10 CPU allocator above the start, over one forward.

    torch.profiler(profile_memory=True) records each alloc (+bytes) and free (-bytes) with a timestamp;
    the running sum in time order is the bytes live, its maximum the peak. Exact for tensors; buffers
    allocated outside c10 (oneDNN/MKL scratch, the native scan's per-thread workspace) are not seen.
    """
    from torch._C._profiler import _EventType  # the event tree torch's own memory profiler reads

    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.inference_mode(), torch.profiler.profile(activities=activities, profile_memory=True) as prof:
        model(x)
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
    events.sort()
    live = peak = 0
    for _, size in events:
        live += size
        peak = max(peak, live)
    return peak


CPU_MEMORY_METHOD = "cpu: torch.profiler profile_memory, peak running sum of c10 alloc/free events"
CUDA_MEMORY_METHOD = "cuda: max_memory_allocated minus memory_allocated before the forward"


def peak_memory_mb(model: nn.Module, x: torch.Tensor) -> tuple[float, str]:
    """(peak MiB above the pre-forward baseline, method) for one forward on x's device."""
    device = x.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
        with torch.inference_mode():
            model(x)
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - baseline) / 2**20, CUDA_MEMORY_METHOD
    return _cpu_peak_bytes(model, x) / 2**20, CPU_MEMORY_METHOD
