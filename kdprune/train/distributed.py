"""Device choice and multi-process data parallelism (PyTorch's own DDP under ``torchrun``).

``runtime.device``: ``auto`` picks CUDA when ``torch.cuda.is_available()``, else the CPU; ``cuda``
without a GPU is an error. ``runtime.nproc_per_node = N > 1``: the training stages (teacher,
distill) run in N processes with ``DistributedDataParallel``: NCCL and one GPU per process
(``cuda:LOCAL_RANK``) on CUDA, gloo on the CPU. A stage started as a plain ``python -m stages.X``
(what ``dvc repro`` runs) re-executes itself as

    python -m torch.distributed.run --standalone --nproc_per_node N -m stages.X <its arguments>

so ``dvc exp run -S runtime.nproc_per_node=4`` just works; running that torchrun command by hand is
the same thing. Over several machines, ``runtime.nnodes = M`` and ``runtime.rdzv_endpoint = host:port``
(the same params on every node) make it

    python -m torch.distributed.run --nnodes M --rdzv-backend c10d --rdzv-endpoint host:port \
        --nproc_per_node N -m stages.X

on each node (torch's c10d rendezvous assigns the ranks; the endpoint travels as one argument, never
through a shell). Under torchrun:

- every rank iterates a disjoint shard of each *global* batch of the single-process run: the same
  seeded permutation, the same augmentation, ``batch_size / world_size`` images per rank
  (:class:`ShardedLoader`). So the global batch, the number of steps and the lr schedule are those
  of the single-process run, and DDP's gradient average is the gradient of the global batch's mean
  loss (BatchNorm statistics are per rank, as usual with DDP: results differ slightly from one
  process);
- masks are applied to the gradients after DDP's all-reduce and to the weights after the step,
  identically on every rank, so the ranks' weights stay identical;
- only rank 0 logs and writes files (model, metrics, curves, timings, resume checkpoints); its test
  accuracy is measured with the unwrapped model on the whole test split, i.e. exactly the saved
  model. The other ranks wait at a barrier and exit 0.
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator

import torch
import torch.distributed as dist
import torch.nn as nn

from kdprune.data import TensorLoader
from kdprune.params import ParamsError

TORCHRUN_ENV = ("LOCAL_RANK", "WORLD_SIZE")


def under_torchrun() -> bool:
    """Started by torchrun (or another launcher that sets the torch.distributed env variables)."""
    return any(k in os.environ for k in TORCHRUN_ENV)


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_world_size() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0, or the only process: the one that logs and writes files."""
    return rank() == 0


def resolve_device(runtime) -> torch.device:
    """``runtime.device`` -> a torch device; under torchrun on CUDA, this process's ``cuda:LOCAL_RANK``."""
    want = runtime.device
    has_cuda = torch.cuda.is_available()
    if want == "cuda" and not has_cuda:
        raise ParamsError("params.yaml: runtime.device = 'cuda' is invalid: no CUDA GPU is available here "
                          "(torch.cuda.is_available() is False); use 'auto' or 'cpu'")
    if want == "cpu" or (want == "auto" and not has_cuda):
        return torch.device("cpu")
    if not under_torchrun():
        return torch.device("cuda", torch.cuda.current_device())
    index, count = local_rank(), torch.cuda.device_count()
    if index >= count:
        raise ParamsError(f"params.yaml: runtime.nproc_per_node = {local_world_size()} is invalid: this node has "
                          f"{count} CUDA GPU(s) and DDP uses one GPU per process")
    return torch.device("cuda", index)


def default_threads() -> int:
    """``runtime.threads = 0``: the node's cores, shared among its processes (no oversubscription)."""
    return max(1, (os.cpu_count() or 1) // local_world_size())


def main_module() -> str | None:
    """``stages.X`` when this process was started as ``python -m stages.X``; None for a script path."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return spec.name if spec is not None else None


def launch_command(nproc: int, argv: list[str], module: str | None, nnodes: int = 1,
                   rdzv_endpoint: str = "") -> list[str]:
    """The torchrun command that runs ``module`` (or, when None, the script ``argv[0]``) with the arguments
    ``argv[1:]`` in ``nproc`` processes; with ``nnodes > 1``, as one of ``nnodes`` nodes that meet at
    ``rdzv_endpoint`` (c10d rendezvous: every node runs this same command; the ranks are assigned there)."""
    target = ["-m", module] if module else [argv[0]]
    if nnodes > 1:
        where = [f"--nnodes={nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}"]
    else:
        where = ["--standalone"]
    return [sys.executable, "-m", "torch.distributed.run", *where, f"--nproc_per_node={nproc}",
            *target, *argv[1:]]


def relaunch_if_needed(runtime) -> None:
    """Replace this process by ``torchrun`` when ``runtime.nproc_per_node > 1`` and it is not already under it.

    ``os.execve``: torchrun takes over the process id, its signals and its exit status, so DVC (or a shell)
    sees exactly torchrun's exit code. The device is checked first, so a bad one fails here, once.
    """
    nnodes = runtime.nnodes
    if (runtime.nproc_per_node <= 1 and nnodes <= 1) or under_torchrun():
        return
    if nnodes > 1 and not runtime.rdzv_endpoint:
        raise ParamsError(f"params.yaml: runtime.rdzv_endpoint = '' is invalid: runtime.nnodes = {nnodes} needs the "
                          "rendezvous 'host:port' that every node reaches (the same on all nodes), or start the "
                          "stage under torchrun yourself")
    if resolve_device(runtime).type == "cuda" and runtime.nproc_per_node > torch.cuda.device_count():
        raise ParamsError(f"params.yaml: runtime.nproc_per_node = {runtime.nproc_per_node} is invalid: this node has "
                          f"{torch.cuda.device_count()} CUDA GPU(s) and DDP uses one GPU per process")
    cmd = launch_command(runtime.nproc_per_node, sys.argv, main_module(), nnodes, runtime.rdzv_endpoint)
    env = dict(os.environ)
    # torchrun would set OMP_NUM_THREADS=1 (with a warning); give each process its share of the cores instead
    env.setdefault("OMP_NUM_THREADS", str(runtime.threads or max(1, (os.cpu_count() or 1) // runtime.nproc_per_node)))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, cmd, env)


@contextlib.contextmanager
def process_group(runtime, log=print) -> Iterator[None]:
    """Under torchrun: join the process group for the body (NCCL on CUDA, gloo on CPU), then wait for every
    rank at a barrier (rank 0 writes the outputs) and leave. Not under torchrun: nothing."""
    if not under_torchrun():
        yield
        return
    if local_world_size() != runtime.nproc_per_node:
        raise ParamsError(
            f"params.yaml: runtime.nproc_per_node = {runtime.nproc_per_node} is invalid: torchrun started "
            f"{local_world_size()} processes on this node; set runtime.nproc_per_node={local_world_size()} "
            "(or run the stage without torchrun: it launches itself)")
    check_world(runtime)
    device = resolve_device(runtime)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    try:
        if is_main():
            log(f"DDP: {world_size()} processes, backend {dist.get_backend()}, device {device.type}")
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()


def check_world(runtime) -> None:
    """Under torchrun: its WORLD_SIZE must be runtime.nnodes x runtime.nproc_per_node (the params that DVC
    records and that the batch-size checks assumed)."""
    world = os.environ.get("WORLD_SIZE")
    nnodes = runtime.nnodes
    if world is not None and world.isdigit() and int(world) != nnodes * runtime.nproc_per_node:
        raise ParamsError(f"params.yaml: runtime.nnodes = {nnodes} is invalid: torchrun started {world} processes "
                          f"in all ({runtime.nproc_per_node} per node); set runtime.nnodes to the number of nodes")


def check_batch_size(batch_size: int, key: str) -> None:
    """Every rank takes the same share of a global batch (also checked in params for single-node runs)."""
    w = world_size()
    if batch_size % w:
        raise ParamsError(f"params.yaml: {key} = {batch_size} is invalid: must be divisible by the number of "
                          f"DDP processes ({w})")


class ShardedLoader(TensorLoader):
    """Rank ``rank``'s shard of every batch that a single-process :class:`TensorLoader` would yield.

    Every rank draws the same permutation and augmentation from the same seeded generator (so the
    generators stay in step) and keeps its slice ``[rank * b, (rank + 1) * b)`` of each global batch,
    ``b = batch_size / world``: the ranks' shards together are exactly the single-process batch. The
    last, partial batch is padded to a multiple of ``world`` by repeating its first images, so every
    rank runs the same number of steps (``len(loader)``, the single-process count) on equal shares.
    """

    def __init__(self, *args, rank: int, world: int, **kwargs):
        super().__init__(*args, **kwargs)
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"ShardedLoader: rank {rank} is not in [0, {world})")
        self.rank, self.world = rank, world

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for xb, yb in super().__iter__():
            n = len(yb)
            pad = -n % self.world
            if pad:
                xb, yb = torch.cat([xb, xb[:pad]]), torch.cat([yb, yb[:pad]])
            b = (n + pad) // self.world
            lo = self.rank * b
            yield xb[lo:lo + b], yb[lo:lo + b]


def wrap(model: nn.Module) -> nn.Module:
    """``DistributedDataParallel(model)`` inside a process group, else ``model`` itself. The wrapper shares
    the model's parameters: train through it, read and save ``model`` (no ``module.`` prefixes)."""
    if not is_distributed():
        return model
    device = next(model.parameters()).device
    return nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def sum_over_ranks(*values):
    """Sums of the given tensors / numbers over all ranks (the same values back with one process)."""
    if not is_distributed():
        return values
    device = next((v.device for v in values if isinstance(v, torch.Tensor)), torch.device("cpu"))
    t = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in values])
    dist.all_reduce(t)
    return tuple(x.to(v.dtype) if isinstance(v, torch.Tensor) else type(v)(x.item()) for v, x in zip(values, t))
