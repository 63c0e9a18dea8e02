"""The Ray engine of ``promptbake benchmark --engine ray``: every cell a Ray task.

A cell's task trains (or resumes) and evaluates it exactly as the local engine's worker process
does (:func:`training.grid._worker_cell`), with ``cpus_per_cell`` torch threads and Ray's CPU/GPU
resources. Checkpoints are written after every epoch into the grid's folder, so a task whose
worker died (a killed process, a lost node) is retried by Ray (``max_retries``) and resumes from
the last checkpoint instead of starting over; results come back to the driver, which writes
results.json / results.md as the local engine does. On a cluster the output folder must be a path
every node sees (NFS, a mounted bucket), and promptbake must be installed on every node.

Nothing here is imported unless ``--engine ray`` is asked for; Ray is the optional ``ray`` extra.
"""
from __future__ import annotations

import logging
import os
import time
from concurrent.futures import Future
from typing import Any

logger = logging.getLogger(__name__)

#: Ray retries a task whose worker process died this many times (its default for tasks)
RETRIES = 3


class RayCells:
    """Submit grid cells as Ray tasks; :meth:`submit` returns a ``concurrent.futures.Future``.

    Args:
        address: ``None`` starts a Ray instance on this machine for the grid (and stops it after);
            ``"auto"`` or ``HOST:PORT`` joins a running cluster (``ray start``, KubeRay, ...).
        cpus_per_cell: Ray CPUs each task asks for, and its torch threads.
        gpus_per_cell: Ray GPUs each task asks for (0: CPU training; > 0: the task trains on CUDA).
        level: the driver's log level for the workers' logging.
    """

    def __init__(self, address: str | None, cpus_per_cell: int, gpus_per_cell: float = 0.0,
                 level: int = logging.INFO, retries: int = RETRIES) -> None:
        try:
            import ray
        except ImportError:
            raise RuntimeError("--engine ray needs Ray: pip install 'promptbake[ray]' (or ray>=2.40)") from None
        self._ray = ray
        self._owns = not ray.is_initialized()
        self._refs: list[Any] = []
        t0 = time.perf_counter()
        if self._owns:
            kwargs: dict[str, Any] = dict(include_dashboard=False, logging_level=logging.WARNING,
                                          log_to_driver=True)
            if address is None:  # "local": a new instance even where RAY_ADDRESS or a `ray start` cluster exists
                kwargs["num_cpus"] = os.cpu_count() or 1
            ray.init(address=address or "local", **kwargs)
        self.startup_seconds = time.perf_counter() - t0
        try:
            nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        except BaseException:
            self.shutdown()
            raise
        fits = [n for n in nodes if n.get("CPU", 0) >= cpus_per_cell and n.get("GPU", 0) >= gpus_per_cell]
        logger.info("Ray %s: %d node(s), %g CPUs, %g GPUs (started in %.1fs); %d CPU(s), %g GPU(s) per cell",
                    "local instance" if address is None else f"cluster at {address}", len(nodes),
                    sum(n.get("CPU", 0) for n in nodes), sum(n.get("GPU", 0) for n in nodes), self.startup_seconds,
                    cpus_per_cell, gpus_per_cell)
        if not fits:  # a cell runs on one node: cluster totals would leave it waiting forever
            self.shutdown()
            biggest = max(nodes, key=lambda n: (n.get("CPU", 0), n.get("GPU", 0)), default={})
            raise RuntimeError(f"no node offers {cpus_per_cell} CPU(s) and {gpus_per_cell:g} GPU(s) per cell (the "
                               f"largest has {biggest.get('CPU', 0):g} CPUs, {biggest.get('GPU', 0):g} GPUs)")
        from training.grid import _ray_cell

        self._task = ray.remote(num_cpus=cpus_per_cell, num_gpus=gpus_per_cell, max_retries=retries)(_ray_cell)
        self._args = (cpus_per_cell, gpus_per_cell > 0, level)

    def submit(self, cell: Any, label: str) -> Future:
        ref = self._task.remote(cell, label, *self._args)
        self._refs.append(ref)
        return ref.future()

    def shutdown(self, cancel_futures: bool = False, timeout_s: float = 60.0) -> None:
        """Stop; with ``cancel_futures`` the cells not finished are stopped first, and waited for, so
        the driver releases their claims only once nothing writes to them (their last finished
        epoch's checkpoint stays for a resume). ``force=True`` kills a task's worker process at once,
        so the wait is for the kill to be seen; should one outlast ``timeout_s`` (an unreachable
        node), disconnecting a Ray connection this engine opened ends the job, and Ray kills every
        task of a job whose driver has gone, before the grid releases the locks."""
        if cancel_futures and self._refs:
            for ref in self._refs:
                self._ray.cancel(ref, force=True)
            self._ray.wait(self._refs, num_returns=len(self._refs), timeout=timeout_s)
        if self._owns and self._ray.is_initialized():
            self._ray.shutdown()
