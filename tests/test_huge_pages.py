"""The weights are copied onto huge pages at load (slipstream/model/huge_pages.py); the fidelity tests check that
the copies are the weights, this that they are one region on huge pages, shared tensors still shared."""

from __future__ import annotations

from pathlib import Path

import pytest


def _mapping_of(address: int) -> dict[str, int]:
    """The /proc/self/smaps fields (kB) of the mapping holding `address`."""
    fields: dict[str, int] = {}
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(a, 16) for a in head.split("-"))
            inside = lo <= address < hi
        elif inside and line.split()[-1] == "kB":
            fields[head.rstrip(":")] = int(line.split()[1])
    return fields


def test_weights_live_in_one_huge_page_region(llm_fp32):
    model = llm_fp32.engine.runner.model
    blocks = [m for m in model.modules() if getattr(m, "gguf_parts", None) is not None]
    assert blocks, "the embedded model serves its layers from GGUF blocks"
    tensors = [t for m in blocks for split, _ in m.gguf_parts for t in split if t.numel()]
    tensors += [p for p in model.parameters() if p.numel()]
    starts = sorted(t.data_ptr() for t in tensors)
    region = _mapping_of(starts[0])
    # every weight in the one mapping, whose start is 2 MiB aligned (the region begins at a huge page)
    assert all(_mapping_of(s) == region for s in (starts[len(starts) // 2], starts[-1]))
    assert starts[0] % (2 << 20) == 0
    # the tied embedding and LM head still share their blocks
    assert model.embed_tokens.gguf_parts[0].split[0].data_ptr() == model.lm_head.gguf_parts[0].split[0].data_ptr()
    mode = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not mode.exists() or "[never]" in mode.read_text():
        pytest.skip("this kernel gives no transparent huge pages (the copy is plain memory)")
    assert region["AnonHugePages"] >= 2048, region
