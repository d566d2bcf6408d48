"""Two-process gloo runs on CPU for the data-parallel tests (torch.multiprocessing spawn)."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Iterator

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on localhost that was free a moment ago (for ``init_method``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(worker: Callable[..., None], world: int, *args: object) -> None:
    """Run ``worker(rank, world, port, *args)`` in ``world`` fresh processes and wait for all of them."""
    mp.spawn(worker, args=(world, free_port(), *args), nprocs=world, join=True)


@contextlib.contextmanager
def gloo_group(rank: int, world: int, port: int) -> Iterator[None]:
    """The default process group (gloo, TCP on localhost) for the body of the ``with``."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()
