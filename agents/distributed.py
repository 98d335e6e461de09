"""Data-parallel training over N processes, started by a standard launcher (``torchrun``).

``tw train`` (both phases) and ``tw gkd`` read the process group from the environment variables
every launcher sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``:
``torchrun``, ``python -m torch.distributed.run`` and ``accelerate launch`` all set them), so a
config runs unchanged on 1 process or on N, on one machine or several::

    torchrun --nproc-per-node 2 -m scripts.cli train --config configs/synthetic.json

What data parallelism means here (docs/architecture.md, "Training on N processes"):

- The config's batch sizes (``num_envs``, ``bc_batch_size``, GKD's ``batch_size``) are global:
  each of the N ranks takes its 1/N of the rows (:func:`rows_per_rank`), so N processes train the
  same run as one process would, with the same learning rates.
- Each rank draws its own examples, budgets and samples from its own seeded streams
  (:func:`rank_seed`: rank 0 keeps the single-process seeds).
- Gradients are averaged by ``DistributedDataParallel``; every loss is first rescaled by
  :func:`data_parallel_loss_scale` so that the average of the ranks' gradients is the gradient of
  the mean over *all* ranks' rows or tokens, as one process with the whole batch would compute it.
- λ per budget steps on the teacher use summed over every rank (:func:`all_sum_counts`) and the
  reward normalisers take every rank's values (:func:`merge_reward_stats`), so λ, μ_r and σ_r
  stay identical on every rank.
- Selection evaluations are sharded (:func:`shard`) and gathered; rank 0 writes checkpoints,
  TensorBoard and the summary (:attr:`Distributed.is_main`).

With one process every helper here is the identity and nothing is initialised.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.tensorboard import SummaryWriter

from agents.lagrangian import Counts, merge_counts
from tw_env.rewards import RunningRewardStats

T = TypeVar("T")


@dataclass(frozen=True)
class Distributed:
    """This process's place in the job: its rank, how many there are, its rank on its machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes every file (checkpoints, TensorBoard, summaries, selected models)."""
        return self.rank == 0


SINGLE = Distributed()


def from_environment(device: torch.device) -> tuple[Distributed, torch.device]:
    """The process group the launcher described, initialised once, and this rank's device.

    Without ``WORLD_SIZE`` (or with 1) this is a single process and nothing is initialised. CUDA
    ranks use NCCL and their ``LOCAL_RANK``'s GPU; CPU ranks use gloo.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return SINGLE, device
    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise RuntimeError(
            f"WORLD_SIZE={world_size} but {', '.join(missing)} not set: start data-parallel runs with a "
            "launcher (torchrun --nproc-per-node N ..., or accelerate launch), which sets them"
        )
    info = Distributed(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return info, device


# ---------------------------------------------------------------------------------------------- pure helpers
def rows_per_rank(global_rows: int, world_size: int, name: str) -> int:
    """Each rank's share of a global batch; the batch must split evenly."""
    if global_rows % world_size:
        raise ValueError(
            f"{name}={global_rows} does not split over {world_size} processes: batch sizes are global "
            f"(each rank takes {name} / N rows), so {name} must be a multiple of the number of processes"
        )
    return global_rows // world_size


def rank_seed(seed: int, rank: int) -> int:
    """The seed of a rank's own random streams; rank 0 keeps the run's seed (a 1-process run is unchanged)."""
    return seed if rank == 0 else seed + 100_003 * rank


def data_parallel_loss_scale(local_count: float, global_count: float, world_size: int) -> float:
    """Factor that turns a rank's mean loss into its share of the global mean, under DDP's averaging.

    DDP averages gradients over ranks: ∇ = (1/N) Σ_r ∇ℓ_r. With ℓ_r = s_r · mean_r and
    s_r = N · n_r / n, that is Σ_r (n_r / n) ∇ mean_r, the gradient of the mean over all n rows
    (or tokens) of the global batch. With equal counts on every rank s_r = 1.
    """
    if global_count <= 0:
        return 1.0
    return world_size * local_count / global_count


def shard_bounds(total: int, world_size: int, rank: int) -> tuple[int, int]:
    """The contiguous ``[start, stop)`` of ``total`` items a rank evaluates (sizes differ by at most 1)."""
    base, extra = divmod(total, world_size)  # the first `extra` ranks take one more
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def fingerprint(tensors: Sequence[torch.Tensor], *extra: Any) -> str:
    """A digest of tensors' exact bytes (and of JSON-able extras): equal on two ranks iff they hold the same."""
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    digest.update(repr(extra).encode())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------- collectives
def all_gather_objects(obj: T, info: Distributed) -> list[T]:
    """Every rank's ``obj`` in rank order (``[obj]`` for one process)."""
    if not info.enabled:
        return [obj]
    gathered: list[Any] = [None] * info.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def all_sum(value: float, info: Distributed) -> float:
    """The sum of a number over ranks."""
    return float(sum(all_gather_objects(float(value), info)))


def all_sum_counts(counts: Counts, info: Distributed) -> dict[float, tuple[float, float]]:
    """{budget: (teacher calls, tokens)} summed over every rank's rollout (λ steps on all of them)."""
    return merge_counts(all_gather_objects(dict(counts), info))


def shard(items: Sequence[T], info: Distributed) -> list[T]:
    """This rank's contiguous part of ``items``; :func:`all_gather_objects` of the parts restores the order."""
    start, stop = shard_bounds(len(items), info.world_size, info.rank)
    return list(items[start:stop])


def barrier(info: Distributed) -> None:
    """Wait for every rank (e.g. until rank 0 has published a folder the others read)."""
    if info.enabled:
        dist.barrier()


def merge_reward_stats(stats: RunningRewardStats, before: dict[str, Any], info: Distributed) -> None:
    """Give every rank the normalisers of all ranks' new values since ``before`` (``stats.mark()``).

    Each rank's env added its own episodes' log-likelihoods; here every rank rewinds to ``before``
    and adds every rank's new values in rank order, so μ_r and σ_r are identical everywhere.
    """
    if not info.enabled:
        return
    parts = all_gather_objects(stats.added_since(before), info)
    stats.load_state_dict(before["state"])
    stats.update([x for teacher, _ in parts for x in teacher], [x for _, student in parts for x in student])


def wrap(module: torch.nn.Module, info: Distributed, find_unused_parameters: bool = False) -> torch.nn.Module:
    """``module`` under ``DistributedDataParallel`` (gradients averaged in backward), or itself alone.

    Only the training forwards go through the wrapper; rollouts and evaluation call the module
    itself under ``no_grad``. ``find_unused_parameters`` for a module whose loss does not reach
    every parameter (the value network never reads its copy of the LM head).
    """
    if not info.enabled:
        return module
    device_ids = [module_device(module).index] if module_device(module).type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=device_ids,
                                                     find_unused_parameters=find_unused_parameters)


def module_device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def check_replicas(info: Distributed, tensors: Sequence[torch.Tensor], *extra: Any, what: str = "state") -> None:
    """Raise unless every rank holds bit-identical ``tensors`` and ``extra`` (weights, λ, μ_r, σ_r)."""
    if not info.enabled:
        return
    prints = all_gather_objects(fingerprint(tensors, *extra), info)
    if len(set(prints)) != 1:
        differing = [r for r, p in enumerate(prints) if p != prints[0]]
        raise RuntimeError(f"data-parallel ranks disagree on their {what}: ranks {differing} differ from rank 0")


class NullWriter:
    """What ranks other than 0 log to: nothing (rank 0's ``SummaryWriter`` logs the run)."""

    def add_scalar(self, tag: str, scalar_value: float, global_step: int | None = None) -> None:
        pass

    def close(self) -> None:
        pass


def summary_writer(log_dir: str, info: Distributed) -> SummaryWriter | NullWriter:
    """TensorBoard on rank 0, nothing elsewhere."""
    return SummaryWriter(log_dir) if info.is_main else NullWriter()


def example_range(total: int, info: Distributed) -> tuple[int, int]:
    """The training examples a rank draws from: its contiguous shard (all of them for one process)."""
    if total < info.world_size:
        raise ValueError(f"{total} training examples cannot be sharded over {info.world_size} processes")
    return shard_bounds(total, info.world_size, info.rank)


def draw_examples(rng: np.random.Generator, total: int, size: int, info: Distributed) -> np.ndarray:
    """``size`` example indices drawn with replacement from this rank's shard of ``total`` examples.

    One process draws ``rng.integers(total, size=size)`` exactly, as before data parallelism.
    """
    start, stop = example_range(total, info)
    return start + rng.integers(stop - start, size=size)


def check_world_size(state: dict[str, Any], info: Distributed, folder: Path) -> None:
    """Refuse a checkpoint written by another number of processes, saying what to do instead.

    A checkpoint holds one random state (and replay buffer) per rank, so it resumes exactly only
    with the number of processes that wrote it (a single-process checkpoint has no ``world_size``: 1).
    """
    written_by = int(state.get("world_size", 1))
    if written_by != info.world_size:
        raise ValueError(
            f"checkpoint {folder} was written by {written_by} process(es) but this run has {info.world_size}: a "
            f"checkpoint resumes exactly only with the world size that wrote it. Relaunch with "
            f"--nproc-per-node/--nnodes giving {written_by} processes, or start a new output_dir "
            f"(e.g. with init pointing at {folder}/policy to continue from its weights)"
        )


def rank_part(state: dict[str, Any], key: str, info: Distributed, folder: Path) -> Any:
    """This rank's entry of a checkpoint's per-rank list (``rank_<key>``), after :func:`check_world_size`."""
    check_world_size(state, info, folder)
    return state[f"rank_{key}"][info.rank] if f"rank_{key}" in state else state[key]
