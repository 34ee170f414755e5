"""Running under ``torchrun`` (one machine or several) or as a single process.

``torchrun`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; :func:`init`
reads them and joins the process group (gloo on CPU, nccl on CUDA). Without
them everything here is a no-op for one process, so the same commands work
unchanged with and without ``torchrun``.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as td

# Ranks of an importance run wait at the final barrier for the slowest rank's last
# entries, which can take longer than the 30 minutes gloo and nccl wait by default.
DEFAULT_TIMEOUT_MIN = 240


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def from_env() -> DistInfo:
    """The process's place in a ``torchrun`` job (rank 0 of 1 without torchrun)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    if world < 1 or not 0 <= rank < world:
        raise RuntimeError(f"bad torchrun environment: RANK={rank}, WORLD_SIZE={world}")
    return DistInfo(rank, world, local)


def select_device(requested: str | None, dist: DistInfo | None = None) -> torch.device:
    """``requested`` ('cpu', 'cuda', 'cuda:1', ...) or the best available; under
    torchrun each process takes the GPU of its local rank."""
    dist = dist or from_env()
    if requested in (None, "auto"):
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(requested)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for, but CUDA is not available")
        if dev.index is None:
            dev = torch.device("cuda", dist.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    return dev


def init(device: torch.device | None = None) -> DistInfo:
    """Join the process group when launched by torchrun (idempotent)."""
    dist = from_env()
    if dist.active and not td.is_initialized():
        backend = "nccl" if device is not None and device.type == "cuda" else "gloo"
        minutes = int(os.environ.get("LAYERMERGE_DIST_TIMEOUT_MIN", DEFAULT_TIMEOUT_MIN))
        td.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=minutes))
    return dist


def barrier(dist: DistInfo) -> None:
    if dist.active and td.is_initialized():
        td.barrier()


def all_reduce_sum(t: torch.Tensor, dist: DistInfo) -> torch.Tensor:
    """Sum of ``t`` over ranks (``t`` itself for one process)."""
    if not (dist.active and td.is_initialized()):
        return t
    # gloo reduces CPU tensors, nccl CUDA tensors: reduce where the group lives.
    dev = torch.device("cuda", torch.cuda.current_device()) if _nccl() else torch.device("cpu")
    out = t.detach().to(dev).clone()
    td.all_reduce(out, op=td.ReduceOp.SUM)
    return out.to(t.device)


def broadcast_buffers(model: torch.nn.Module, dist: DistInfo) -> None:
    """Copy rank 0's buffers (BatchNorm statistics) to every rank."""
    if not (dist.active and td.is_initialized()):
        return
    for b in model.buffers():
        td.broadcast(b.data, src=0)


def broadcast_object(obj, dist: DistInfo):
    """Rank 0's ``obj`` (anything JSON-like) on every rank; ``obj`` itself for one process."""
    if not (dist.active and td.is_initialized()):
        return obj
    box = [obj if dist.is_main else None]
    td.broadcast_object_list(box, src=0)
    return box[0]


def _nccl() -> bool:
    return td.get_backend() == "nccl"


def shutdown() -> None:
    if td.is_initialized():
        td.destroy_process_group()
