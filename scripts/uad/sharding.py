"""Cases split over processes: the ranks of one ``torchrun`` job, or the tasks of a job array (SLURM, Kubernetes).

A shard ``[i, n]`` is every n-th case from the i-th, as MONAI's ``DistributedSampler`` deals them
(``even_divisible=False``, ``shuffle=False``): no case twice, none missing, for any case count. Each shard is dealt
from the full list of a run's cases, before finished cases are skipped, so a rerun keeps every case on its shard.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.distributed as dist
from monai.data import DistributedSampler

from .errors import InputError

__all__ = ["process_shard", "shard_cases", "shard_of"]


def shard_of(shard: Sequence[int] | None) -> tuple[int, int]:
    """``shard`` as ``(i, n)``; None is the whole run ``(0, 1)``.

    Raises:
        InputError: not two integers with ``0 <= i < n``.
    """
    if shard is None:
        return 0, 1
    values = list(shard) if isinstance(shard, Sequence) and not isinstance(shard, str) else None
    if values is None or len(values) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise InputError(f"shard must be [i, n], two integers (this task, the number of tasks); got {shard!r}")
    index, count = values
    if not 0 <= index < count:
        raise InputError(f"shard [{index}, {count}]: the task index must be in [0, {count}) (0-based)")
    return index, count


def process_shard() -> list[int]:
    """``[rank, world size]`` of the initialised process group (``torchrun``), else ``[0, 1]``."""
    return [dist.get_rank(), dist.get_world_size()] if dist.is_available() and dist.is_initialized() else [0, 1]


def shard_cases(entries: Sequence[dict], shard: Sequence[int] | None) -> list[dict]:
    """The cases of shard ``[i, n]`` of ``entries`` (all of them for None or ``[0, 1]``).

    Raises:
        InputError: a bad ``shard`` (see :func:`shard_of`), or more shards than cases (some would have none).
    """
    index, count = shard_of(shard)
    if count == 1:
        return list(entries)
    if len(entries) < count:
        raise InputError(
            f"{count} shards (processes or tasks) for {len(entries)} case(s): every shard needs a case; run at most "
            f"{len(entries)}"
        )
    sampler = DistributedSampler(entries, even_divisible=False, num_replicas=count, rank=index, shuffle=False)
    return [entries[i] for i in sampler]
