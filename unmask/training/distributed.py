"""Training on several processes with PyTorch's own stack: `torchrun` for launching, DDP or FSDP2
(`fully_shard`) for the model, `torch.distributed.checkpoint` (DCP) for sharded checkpoints.

A run started without torchrun (no `WORLD_SIZE` in the environment, or 1) initialises nothing and
takes the single-process path unchanged. Under torchrun every rank builds the same global batch of
step `s` (a pure function of the seed and `s`) and draws the *same* noise for it, then computes
the loss on its contiguous share of the rows, scaled so that the gradient DDP/FSDP average equals
the gradient of the global batch's mean loss. So the loss curve and the weights do not depend on
the number of processes (up to float reduction order), and a run resumes on another world size.

The step's model and loss form one module (`Objective`), so DDP and FSDP see every parameter use
inside one `forward` (the BD3-LM vectorised pass is a method of the model, not its forward).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from unmask.config import ConfigError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    strategy: str = "none"  # none (one process), ddp, fsdp

    @property
    def main(self) -> bool:
        return self.rank == 0

    def rows(self, batch_size: int) -> slice | None:
        """This rank's contiguous share of a global batch's rows (None: all of them, one process)."""
        if self.world == 1:
            return None
        share = batch_size // self.world
        return slice(self.rank * share, (self.rank + 1) * share)

    def sum(self, value: float, device: torch.device) -> float:
        """The sum of a float over ranks (itself with one process)."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return float(t)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def check_world(strategy: str, batch_size: int, world: int) -> None:
    """The settings a run on `world` processes needs: checked before any process starts (by
    `--nproc`) and again in each rank, so every world size gives the same one-line error."""
    if world == 1:
        return
    if strategy == "none":
        raise ConfigError(f"launched on {world} processes: choose --dist.strategy ddp or fsdp")
    if batch_size % world:
        raise ConfigError(
            f"--train.batch_size {batch_size} must be divisible by the {world} processes "
            "(each takes an equal share of every global batch)"
        )


def die_with_parent() -> None:
    """Linux: this process gets SIGTERM when its parent dies (torchrun killed with -9 must not
    leave workers writing checkpoints); exits at once if the parent is already gone."""
    import ctypes
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
    except OSError:
        return
    if os.getppid() != parent or parent == 1:
        os._exit(143)


def init_distributed(strategy: str, batch_size: int) -> tuple[Dist, torch.device]:
    """Read torchrun's environment; start the process group (gloo on CPU, nccl on CUDA), one device
    per rank. Without torchrun: nothing is started, and `strategy` must be `none` or is ignored."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world == 1:
        return Dist(), torch.device("cuda" if cuda else "cpu")
    check_world(strategy, batch_size, world)
    die_with_parent()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return Dist(rank, world, local_rank, strategy), device


class Objective(nn.Module):
    """`model` and the step's loss as one module: forward(**kw) = loss_fn(model, **kw)."""

    def __init__(self, model: nn.Module, loss_fn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, **kw: Any):
        return self.loss_fn(self.model, **kw)


def wrap(objective: Objective, d: Dist, *, precision: str, checkpoint_activations: bool) -> nn.Module:
    """DDP, or FSDP2 with one `fully_shard` per transformer block and one for the rest; the mixed-
    precision policy follows the resolved precision."""
    if checkpoint_activations:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

        from unmask.models.transformer import Block

        apply_activation_checkpointing(objective.model, check_fn=lambda m: isinstance(m, Block))
    if d.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device = [d.local_rank] if torch.cuda.is_available() else None
        return DistributedDataParallel(objective, device_ids=device)
    if d.strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16 if precision == "bf16" else torch.float32, reduce_dtype=torch.float32
        )
        for block in objective.model.blocks:
            fully_shard(block, mp_policy=policy)
        fully_shard(objective, mp_policy=policy)
        return objective
    return objective


def memory_report(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """What this process holds: its parameters, gradients and optimizer state (its shard under FSDP),
    in MB, and its peak resident memory."""
    import resource

    def local(x: torch.Tensor) -> torch.Tensor:
        return x.to_local() if hasattr(x, "to_local") else x

    mb = 1 / 2**20
    params = sum(local(p).numel() * local(p).element_size() for p in model.parameters())
    grads = sum(
        local(p.grad).numel() * local(p.grad).element_size() for p in model.parameters() if p.grad is not None
    )
    state = sum(
        local(v).numel() * local(v).element_size()
        for s in optimizer.state.values()
        for v in s.values()
        if torch.is_tensor(v)
    )
    return {
        "params_mb": params * mb,
        "grads_mb": grads * mb,
        "optimizer_mb": state * mb,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


@contextmanager
def unsharded(step_module: torch.nn.Module, d: Dist):
    """Under FSDP, gather the root's parameters so the model can be called outside the step's forward
    (validation); the blocks gather their own in their forward hooks."""
    if d.strategy != "fsdp":
        yield
        return
    step_module.unshard()
    try:
        yield
    finally:
        step_module.reshard()


# ------------------------------------------------------------------------------------ checkpoints


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's whole state dict on the CPU (gathered from the shards under FSDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_sharded(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every rank writes its shard of the model and optimizer state into `folder` (DCP)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(folder))


def load_sharded(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Read a DCP checkpoint into `model` / `optimizer` whatever their sharding now (any world size,
    FSDP or a plain module)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def load_full_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """A single-process / DDP `optimizer.pt` (parameters by index) into an optimizer over a possibly
    sharded `model` whose parameters are listed in the same order."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    by_id = {id(p): n for n, p in model.named_parameters()}
    order = [by_id[id(p)] for g in optimizer.param_groups for p in g["params"]]  # index -> name
    groups = [{**g, "params": [order[i] for i in g["params"]]} for g in saved["param_groups"]]
    keyed = {"state": {order[i]: s for i, s in saved["state"].items()}, "param_groups": groups}
    set_optimizer_state_dict(model, optimizer, keyed, options=StateDictOptions(full_state_dict=True))
