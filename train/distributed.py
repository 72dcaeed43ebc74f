"""Multi-process training under torchrun: DDP or FSDP2, and their checkpoint plumbing.

Single-process runs go through the same functions with ``world_size == 1``, so the training
loop has one code path. torchrun sets RANK / LOCAL_RANK / WORLD_SIZE; the backend is NCCL on
CUDA and gloo on CPU.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> DistInfo:
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"]))
    if device.startswith("cuda"):
        torch.cuda.set_device(info.local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", info.local_rank))
    else:
        dist.init_process_group("gloo")
    return info


def shutdown(info: DistInfo, clean: bool = True) -> None:
    """Leave the process group; ``clean=False`` on an error path, where peers may be mid-collective."""
    if info.enabled and dist.is_initialized():
        if clean:
            # Without this barrier a rank may tear down while a peer still talks to it
            # (SIGABRT "terminate called without an active exception"; see docs/field-notes.md).
            # On an error path a barrier could pair with a peer's all-reduce and hang, so skip it
            # and let torchrun stop the other ranks.
            dist.barrier()
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def wrap_model(model: nn.Module, info: DistInfo, strategy: str, device: torch.device) -> nn.Module:
    """DDP or FSDP2-sharded model; the bare model when running alone."""
    if not info.enabled:
        return model
    if strategy == "fsdp":
        import warnings

        from torch.distributed.fsdp import fully_shard

        # A Block returns its (key, value) views beside its output; FSDP2 warns that an in-place
        # op on a returned view would skip its backward hook. Nothing modifies them in place.
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        for block in model.transformer.h:
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain GPT under DDP and torch.compile wrappers (FSDP2 shards in place)."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


@contextlib.contextmanager
def no_grad_sync(model: nn.Module, info: DistInfo, skip: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on accumulation micro-steps (all but the last)."""
    if not (info.enabled and skip):
        yield
        return
    if hasattr(model, "no_sync"):  # DDP
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def full_model_state(model: nn.Module, info: DistInfo, strategy: str) -> dict[str, torch.Tensor]:
    """A full, unsharded CPU state dict (collective under FSDP: every rank must call it).

    Under FSDP only rank 0 receives the tensors (the others get ``{}``): rank 0 writes checkpoints.
    """
    if info.enabled and strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(unwrap(model), options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}


def _optim_options(**kw: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, info: DistInfo,
                         strategy: str) -> dict[str, Any]:
    """The full optimizer state keyed by parameter name (collective under FSDP).

    One format for every strategy and world size: ``optimizer.state_dict()`` keys state by
    position while FSDP's full state is keyed by name, so a checkpoint written by one could
    not be resumed by the other. Names work everywhere (DDP, FSDP, one process).
    """
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    if not optimizer.state:
        # Before the first step: torch's helper would create the state with a zero-gradient
        # step() at lr 0, which leaves the weights alone but advances Adam's step count, and so
        # changes the bias correction of every later update. There is no state to gather anyway
        # (and no rank has any, so skipping the collective is safe).
        return _name_keyed(model, optimizer, optimizer.state_dict())
    return get_optimizer_state_dict(unwrap(model), optimizer, options=_optim_options(cpu_offload=True))


def _name_keyed(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
    """Convert a positional ``optimizer.state_dict()`` (older checkpoints) to the name-keyed form."""
    if all(isinstance(k, str) for k in state.get("state", {})) and all(
            isinstance(p, str) for g in state.get("param_groups", []) for p in g["params"]):
        return state
    names = {id(p): n for n, p in unwrap(model).named_parameters()}
    # position -> name, in the order the optimizer numbers its parameters
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    groups = [dict(g, params=[order[i] for i in g["params"]]) for g in state["param_groups"]]
    return {"state": {order[i]: v for i, v in state["state"].items()}, "param_groups": groups}


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any],
                         info: DistInfo, strategy: str) -> None:
    """Load a full optimizer state (every rank holds all of it); FSDP keeps only its shard."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    if not state.get("state"):
        return  # saved before the first step: a fresh optimizer is that state (see full_optimizer_state)
    set_optimizer_state_dict(unwrap(model), optimizer, _name_keyed(model, optimizer, state),
                             options=_optim_options(broadcast_from_rank0=False))


def all_gather_object(obj: Any, info: DistInfo) -> list[Any]:
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def all_reduce_mean(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= info.world_size
    return t


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank when ``flag`` is true on any: ranks must agree on when to stop, because a
    rank that leaves the loop alone leaves its peers waiting in the next all-reduce."""
    return max_over_ranks(1.0 if flag else 0.0, info) > 0.0 if info.enabled else flag


def max_over_ranks(value: float, info: DistInfo) -> float:
    """The largest of every rank's ``value`` (the same float on every rank)."""
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())
