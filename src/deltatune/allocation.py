"""A ceiling on the memory that building tensors may claim, checked before each allocation.

An adapter file is a stranger's input: its ``adapter_config.json`` sets the sizes the adapter's
tensors are built with (LoRA's ``r``, a prompt's ``num_virtual_tokens``), and a crafted one
(``"r": 1000000000``) would make the model allocate terabytes before the weights file is even read,
or, with the kernel's overcommit, let the process be killed later while the tensors are filled.
Loading runs under :class:`AllocationBudget`: every tensor-creating operation (``torch.empty``,
``zeros``, ``randn`` and the rest, which is how modules make their parameters) states its size
before it runs, and the first request that would take the total past the budget raises
:class:`AllocationBudgetExceeded` instead of allocating. Operations that compute on existing
tensors are not counted: their outputs are bounded by tensors that already exist.

The count is cumulative (freed tensors are not subtracted), so it bounds what the guarded code
allocates in all, not only at its peak.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Creation operators whose first argument is the new tensor's size.
_SIZED = {
    aten.empty.memory_format,
    aten.empty_strided.default,
    aten.zeros.default,
    aten.ones.default,
    aten.full.default,
    aten.rand.default,
    aten.randn.default,
    aten.randint.default,
    aten.randint.low,
    aten.randperm.default,
}
# Creation operators called on a tensor, whose second argument is the size.
_SIZED_FROM_TENSOR = {
    aten.new_empty.default,
    aten.new_empty_strided.default,
    aten.new_zeros.default,
    aten.new_ones.default,
    aten.new_full.default,
}


class AllocationBudgetExceeded(MemoryError):
    """Building tensors would claim more memory than the budget allows."""


class AllocationBudget(TorchDispatchMode):
    """Refuse any tensor creation that takes the running total past ``limit_bytes``.

    ``describe`` says what is being built, for the error (``"the adapter in /path"``); ``used``
    holds the bytes requested so far, ``largest`` the largest single request.
    """

    def __init__(self, limit_bytes: int, describe: str) -> None:
        super().__init__()
        self.limit = int(limit_bytes)
        self.describe = describe
        self.used = 0
        self.largest = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        requested = _requested_bytes(func, args, kwargs)
        if requested:
            if requested > self.limit - self.used:
                raise AllocationBudgetExceeded(
                    f"{self.describe} asks for a tensor of {_readable(requested)} ({_shape(func, args)}), "
                    f"past the {_readable(self.limit)} that a file of its size can justify; its config "
                    "sets a size (a rank, a number of tokens, a dimension) far beyond its weights"
                )
            self.used += requested
            self.largest = max(self.largest, requested)
        return func(*args, **kwargs)


def _size(func: Any, args: tuple) -> Any:
    """The requested shape among a creation operator's arguments."""
    if func in _SIZED_FROM_TENSOR:
        return args[1]
    if func in (aten.randint.default, aten.randint.low):
        return args[-1]  # randint(high, size) and randint(low, high, size)
    if func is aten.randperm.default:
        return [args[0]]
    return args[0]


def _requested_bytes(func: Any, args: tuple, kwargs: dict) -> int:
    if func in _SIZED:
        size = _size(func, args)
        integer = func in (aten.randint.default, aten.randint.low, aten.randperm.default)
        dtype = kwargs.get("dtype") or (torch.int64 if integer else torch.get_default_dtype())
    elif func in _SIZED_FROM_TENSOR:
        size, dtype = _size(func, args), kwargs.get("dtype") or args[0].dtype
    else:
        return 0
    try:
        elements = math.prod(int(s) for s in size)
    except TypeError:  # symbolic or odd sizes: let the operator judge them
        return 0
    return max(elements, 0) * dtype.itemsize


def _shape(func: Any, args: tuple) -> str:
    size = _size(func, args)
    return f"shape {tuple(size) if isinstance(size, (list, tuple)) else size}"


def _readable(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def adapter_loading_budget(
    model: torch.nn.Module, files: list[Path], describe: str, input_method: bool = False
) -> AllocationBudget:
    """The budget for building and loading an adapter from ``files`` onto ``model``.

    An adapter's tensors are at most its files' size again (16x leaves room for a file stored in a
    narrower dtype and for the copies made while loading), plus what a method builds that is not
    saved, sized by the base model: VeRA's regenerated projections, within four times the base
    model's largest non-embedding parameter (1 MiB at least); and for an input method
    (``input_method``) its prompt or prefix encoder, which the file does not hold (PEFT saves the
    encoder's output), within the base model's own size.
    """
    file_bytes = sum(Path(f).stat().st_size for f in files if Path(f).is_file())
    largest = max(
        (
            p.numel() * p.element_size()
            for module in model.modules()
            if not isinstance(module, torch.nn.Embedding)
            for p in module.parameters(recurse=False)
        ),
        default=0,
    )
    allowance = max(4 * largest, 1 << 20)
    if input_method:
        allowance = max(allowance, sum(p.numel() * p.element_size() for p in model.parameters()))
    return AllocationBudget(16 * file_bytes + allowance, describe)
