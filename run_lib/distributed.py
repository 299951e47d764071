"""Several processes (torchrun): where this process stands, and the network forward that
spreads one global batch over the ranks.

With WORLD_SIZE > 1 there is one process group (nccl on CUDA, gloo on the CPU) and one
device per process (cuda:LOCAL_RANK). The global batch config.training.batch_size is split
across the ranks: rank r reads rows r, r + W, ... of each global batch
(run_lib.datasets.shard_indices), runs the network on them only, and the network outputs
are all-gathered, so every rank evaluates the DSM loss of the whole global batch with the
same times and noise as a single process (drawn from the same seeded generator; cheap next
to the network). The training curve therefore does not depend on the number of processes
(up to float summation order; dropout masks and random flips, drawn per rank, excepted).

Gradient accumulation (config.training.batch_per_device) splits the global batch into K
equal blocks of consecutive rows, block k = rows [k B/K, (k+1) B/K); as rank r owns rows
r, r + W, ..., its share of block k is its own k-th micro-batch of B/(W K) rows. One
optimizer step evaluates the loss of the whole global batch K times with the same draws
(``NetworkForward.micro_batch``): pass k runs the network on block k only, with gradient,
and fills the other rows with the detached outputs of the blocks already done (zeros for
those still to come), so pass k's backward gives block k's share of the full-batch
gradient, the K shares sum to it, and the last pass's loss is the full-batch loss.
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .utils import pick_device

__all__ = ["DistContext", "init_distributed", "NetworkForward", "interleave_into_global",
           "micro_batches", "rng_state", "set_rng_state"]

log = logging.getLogger(__name__)


@dataclass
class DistContext:
    """Where this process stands in a (possibly one-process) run."""
    rank: int = 0
    world_size: int = 1
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def init_distributed(device_name: str) -> tuple[DistContext, torch.device]:
    """(context, device) from torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK).

    WORLD_SIZE > 1: starts the default process group (nccl for CUDA devices, gloo for the
    CPU) unless one exists, and gives each process cuda:LOCAL_RANK on CUDA. Otherwise a
    one-process context and ``pick_device(device_name)``.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(device_name)
    if world_size <= 1:
        return DistContext(), device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    initialized_here = not dist.is_initialized()
    if initialized_here:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(),
                       initialized_here=initialized_here), device


class NetworkForward:
    """The network as the loss sees it: ``forward(x (B, ...), cond (B,)[, labels (B,)])``.

    Runs ``net`` under bfloat16 autocast when ``amp_dtype`` is given and returns float32 (the
    loss is reduced in float32). With ``world_size`` W > 1 the inputs are a whole global
    batch: this rank runs ``net`` on rows rank, rank + W, ... only, and the other ranks'
    outputs are all-gathered (without gradient) into their rows, so every rank sees the
    output of the whole batch; gradients flow through this rank's rows only.

    Inside ``micro_batch(k, K)`` the network runs on block k of K equal blocks of rows only
    (see the module docstring): the outputs of the blocks before k are the detached ones of
    the earlier passes, those after k are zeros.
    """

    def __init__(self, net, *, amp_dtype: torch.dtype | None = None, rank: int = 0,
                 world_size: int = 1):
        self.net, self.amp_dtype, self.rank, self.world_size = net, amp_dtype, rank, world_size
        self._block: tuple[int, int] | None = None     # (k, K) inside micro_batch
        self._done: list[list[torch.Tensor]] = []      # per call of a pass: blocks 0..k-1
        self._call = 0

    @contextlib.contextmanager
    def micro_batch(self, k: int, num: int):
        """The calls inside run the network on block ``k`` of ``num`` (one pass of an
        optimizer step; the passes k = 0, 1, ..., num - 1 in order, each calling the network
        the same number of times). ``num`` = 1 is the plain forward."""
        if not 0 <= k < num:
            raise ValueError(f"micro-batch {k} of {num}")
        if k == 0:
            self._done = []
        self._block, self._call = (k, num), 0
        try:
            yield
        finally:
            self._block = None
            if k == num - 1:
                self._done = []

    def _run(self, *inputs):
        device_type = inputs[0].device.type
        with torch.autocast(device_type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            out = self.net(*inputs)
        return out.float()

    def _global(self, x, cond, *labels):
        """The network's output for the global batch (or block) x, this rank's rows with
        gradient and the others all-gathered."""
        if self.world_size == 1:
            return self._run(x, cond, *labels).to(x.dtype)
        r, w = self.rank, self.world_size
        own = self._run(*(v[r::w] for v in (x, cond, *labels)))          # (B / W, ...)
        parts = [torch.empty_like(own) for _ in range(w)]
        dist.all_gather(parts, own.detach().contiguous())
        parts[r] = own
        # rows of rank r are r, r + W, ...: interleave (W, B/W, ...) -> (B/W, W, ...) -> (B, ...)
        return torch.stack(parts, dim=1).reshape(x.shape[:1] + own.shape[1:]).to(x.dtype)

    def __call__(self, x, cond, *labels):
        if self._block is None or self._block[1] == 1:
            return self._global(x, cond, *labels)
        (k, num), batch = self._block, x.shape[0]
        if batch % (num * self.world_size):
            raise ValueError(f"a batch of {batch} rows does not split into {num} micro-batches "
                             f"on {self.world_size} processes")
        size = batch // num
        out = self._global(*(v[k * size:(k + 1) * size] for v in (x, cond, *labels)))
        if k == 0:
            self._done.append([])
        done = self._done[self._call]
        self._call += 1
        rest = out.new_zeros((batch - (k + 1) * size,) + tuple(out.shape[1:]))
        full = torch.cat([*done, out, rest])
        done.append(out.detach())
        return full


def micro_batches(batch_size: int, batch_per_device, world_size: int) -> int:
    """K, the micro-batches of one optimizer step: each process's share S = batch_size / W of
    the global batch in K = ceil(S / batch_per_device) equal micro-batches of S / K <=
    batch_per_device rows; 1 when batch_per_device is 0 or None. A ValueError names both
    numbers and the fix when S / K is not a whole number (or S is not)."""
    batch_size, world_size = int(batch_size), int(world_size)
    if batch_size % world_size:
        raise ValueError(f"config.training.batch_size={batch_size} (the global batch) is not "
                         f"divisible by the {world_size} processes; use a multiple of "
                         f"{world_size}")
    share, most = batch_size // world_size, int(batch_per_device or 0)
    if most < 0:
        raise ValueError(f"config.training.batch_per_device={most} must be >= 0 (0: the "
                         f"whole per-process batch of {share} at once)")
    num = -(-share // most) if most else 1
    if share % num:
        fits = max(d for d in range(1, most + 1) if share % d == 0)
        raise ValueError(f"config.training.batch_per_device={most} splits the per-process "
                         f"batch of {share} (config.training.batch_size={batch_size} over "
                         f"{world_size} processes) into {num} unequal micro-batches; use a "
                         f"divisor of {share} such as {fits}")
    return num


def interleave_into_global(local: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """This rank's rows (B/W, ...) placed at rows rank, rank + W, ... of a zero (B, ...)
    tensor: the loss draws times and noise for the whole global batch."""
    if ctx.world_size == 1:
        return local
    full = local.new_zeros((local.shape[0] * ctx.world_size,) + tuple(local.shape[1:]))
    full[ctx.rank::ctx.world_size] = local
    return full


# ----------------------------------------------------------------------------- RNG states

def _own_rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def rng_state(noise_gen: torch.Generator, device: torch.device, ctx: DistContext) -> dict:
    """RNG states for a checkpoint: {"torch", ["cuda"], "noise", ["ranks"]}; a collective
    when world_size > 1 (every rank calls it)."""
    state = {**_own_rng_state(device), "noise": noise_gen.get_state()}
    if ctx.world_size > 1:
        ranks = [None] * ctx.world_size
        dist.all_gather_object(ranks, _own_rng_state(device))
        state["ranks"] = [{k: v.cpu() for k, v in r.items()} for r in ranks]
    return state


def set_rng_state(state: dict, noise_gen: torch.Generator, device: torch.device,
                  ctx: DistContext) -> None:
    """Restore what ``rng_state`` saved; with several ranks each takes its own entry."""
    own = state
    if ctx.world_size > 1:
        ranks = state.get("ranks") or []
        if len(ranks) == ctx.world_size:
            own = ranks[ctx.rank]
        elif ctx.rank > 0:
            log.warning("checkpoint holds no dropout RNG state for %d ranks; rank %d keeps "
                        "its freshly seeded one", ctx.world_size, ctx.rank)
            own = None
    noise_gen.set_state(state["noise"].cpu())
    if own is None:
        return
    torch.set_rng_state(own["torch"].cpu())
    if device.type == "cuda" and "cuda" in own:
        torch.cuda.set_rng_state(own["cuda"].cpu(), device)
