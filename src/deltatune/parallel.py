"""How a run spreads over processes: DDP (each process a full replica, gradients averaged) or FSDP2
(each transformer block sharded over the processes), from ``torchrun``'s environment."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from deltatune.train import Distributed

logger = logging.getLogger("deltatune")


def distributed_wrapper(fsdp: bool, distributed: Distributed) -> Callable[[nn.Module], nn.Module] | None:
    """What wraps the model for several processes (None on one): FSDP2 with ``fsdp``, else DDP."""
    if distributed.world == 1:
        if fsdp:
            logger.warning("--fsdp needs several processes (torchrun); training on one process without it")
        return None
    if fsdp:
        return shard_with_fsdp
    from torch.nn.parallel import DistributedDataParallel

    def wrap(module: nn.Module) -> nn.Module:
        on_gpu = next(module.parameters()).is_cuda  # a CPU model on a GPU machine (--device cpu) takes none
        return DistributedDataParallel(module, device_ids=[distributed.local_rank] if on_gpu else None)

    return wrap


def shard_with_fsdp(model: nn.Module) -> nn.Module:
    """FSDP2: each transformer block is its own shard unit, then the root (gloo on CPU, NCCL on GPU)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(next(model.parameters()).device.type, (torch.distributed.get_world_size(),))
    for module in list(model.modules()):
        if isinstance(module, nn.ModuleList):
            for block in module:
                fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model
