"""The weights on transparent huge pages (CPU).

A small-batch decode step streams every weight from DRAM. On 4 KiB pages the hardware prefetchers stop at each page
boundary (a 17 GB/s stream crosses one every 240 ns); on 2 MiB pages they run on. Where the kernel's transparent huge
pages are `madvise` (a common default), memory gets them only when asked for, as here: an anonymous private mapping,
madvise(MADV_HUGEPAGE), the tensors copied into it. Where they are `never` this is plain memory, where `always` what
malloc would have given anyway. AMD EPYC Zen 4, 2 cores, w4a8 decode step: batch 1 6.98 -> 6.14 ms, batch 32 the
same.

The KV cache stays on 4 KiB pages: a huge page is zeroed (and compacted for) at its first touch, in the middle of a
step, which made batch-32 steps 20 % slower; touching the whole cache at start-up instead would make the server's
resident memory its whole KV budget from the first second. (Intel Xeon with AMX, 2 cores: a float32 cache on huge
pages read 1.10-1.14x faster by the decode attention, and batch-32 steps over a cache touched beforehand ran 1.03x
(1.014x for one on 4 KiB pages touched beforehand), but a fresh one's steps 0.96x, and touching 3 GiB of them took
4.6 s against 0.6 on 4 KiB pages.)
"""

from __future__ import annotations

import ctypes
import logging
import mmap

import torch
from torch import nn

logger = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20
_ALIGN = 64  # each tensor starts on a cache line (the kernels' vector loads)


def huge_page_buffer(nbytes: int) -> torch.Tensor:
    """`nbytes` of zeroed uint8 CPU memory starting on a 2 MiB boundary, asked for on huge pages; the tensor keeps
    the mapping alive (torch.frombuffer holds it)."""
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        region.madvise(mmap.MADV_HUGEPAGE)
    whole = torch.frombuffer(region, dtype=torch.uint8)
    start = -whole.data_ptr() % HUGE_PAGE
    return whole[start:start + nbytes]


def _key(t: torch.Tensor) -> tuple:  # the same tensor, whichever Python object holds it (a tied one, p.data)
    return t.data_ptr(), t.dtype, tuple(t.shape)


def move_weights_to_huge_pages(model: nn.Module) -> int:
    """Copy `model`'s CPU weights (dense parameters and GGUF blocks, each shared tensor once) into one huge-page
    region and point the model at the copies, one tensor at a time (the old one freed before the next is copied:
    the load's peak memory grows by one tensor, not by the model); returns the bytes moved. Run before anything else
    holds the weights (the layer stack binds them on the first step)."""
    tensors: dict[tuple, torch.Tensor] = {}
    holders: dict[tuple, list] = {}  # a tensor -> the parameters and (module, part, index in its split) holding it

    def hold(t: torch.Tensor, holder) -> None:
        if t.device.type == "cpu" and t.numel() and t.is_contiguous() and not t.is_mkldnn:
            tensors.setdefault(_key(t), t)
            holders.setdefault(_key(t), []).append(holder)

    for p in model.parameters():
        hold(p.data, p)
    for m in model.modules():
        for j, (split, _) in enumerate(getattr(m, "gguf_parts", None) or ()):
            for i, t in enumerate(split):
                hold(t, (m, j, i))
    if not tensors:
        return 0
    sizes = {key: -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN for key, t in tensors.items()}
    region = huge_page_buffer(sum(sizes.values()))
    offset = 0
    for key in list(tensors):
        t = tensors.pop(key)
        copy = region[offset:offset + t.numel() * t.element_size()].view(t.dtype).view(t.shape).copy_(t)
        del t
        offset += sizes[key]
        for holder in holders[key]:
            if isinstance(holder, nn.Parameter):
                holder.data = copy
            else:
                module, j, i = holder
                split = module.gguf_parts[j].split
                part = module.gguf_parts[j]._replace(split=(*split[:i], copy, *split[i + 1:]))
                module.gguf_parts = (*module.gguf_parts[:j], part, *module.gguf_parts[j + 1:])
    _return_freed_memory()
    logger.debug("weights on huge pages: %d tensors, %.0f MiB", len(sizes), offset / 2**20)
    return offset


def _return_freed_memory() -> None:
    """Give the old copies' memory back to the system: glibc keeps freed heap memory resident. The embedded model in
    w4a8, resident after its first request: 630 MB without this, 500 MB with it (560 MB without the move)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
