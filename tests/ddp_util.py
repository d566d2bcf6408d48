"""Two-process gloo runs on CPU for the data-parallel tests (torch.multiprocessing spawn).

The ranks meet through a file store, not TCP, so there is no host process and no port to race for.

Teardown: on CI a rank has twice died with SIGABRT ("terminate called without an active
exception") *after* its work was done and the peers had met at the final barrier -- a gloo
background thread torn down at process exit, with the file store as with TCP. That is not what the
tests are about, so each rank leaves a marker once its body has finished and the barrier passed;
`spawn` accepts a rank killed by a signal only if every rank left its marker, and warns. A rank
that dies before its marker (a crash in the body, a Python exception) still fails the test.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator

import torch.distributed as dist
import torch.multiprocessing as mp

_STORE = "store"


def _marker(init_method: str, rank: int) -> str:
    return os.path.join(os.path.dirname(init_method.removeprefix("file://")), f"done.{rank}")


def spawn(worker: Callable[..., None], world: int, *args: object) -> None:
    """Run ``worker(rank, world, init_method, *args)`` in ``world`` fresh processes and wait for all."""
    with tempfile.TemporaryDirectory() as d:
        init_method = "file://" + os.path.join(d, _STORE)
        try:
            mp.spawn(worker, args=(world, init_method, *args), nprocs=world, join=True)
        except mp.ProcessExitedException as e:
            if not (e.signal_name and all(os.path.exists(_marker(init_method, r)) for r in range(world))):
                raise
            warnings.warn(f"rank {e.error_index} died with {e.signal_name} in teardown, after its work "
                          "and the final barrier; its results stand", RuntimeWarning, stacklevel=2)


@contextlib.contextmanager
def gloo_group(rank: int, world: int, init_method: str) -> Iterator[None]:
    """The default process group (gloo over loopback) for the body of the ``with``.

    Every rank waits at a barrier before the group is destroyed, so none tears down while a peer
    still talks to it. If the body raises, the group is left alone: destroying it while the peer
    waits in a collective aborts the process in C++, and mp.spawn would then report a bare
    SIGABRT instead of the Python traceback.
    """
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # not whatever interface the hostname resolves to
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    yield
    dist.barrier()
    with open(_marker(init_method, rank), "w"):
        pass
    dist.destroy_process_group()
