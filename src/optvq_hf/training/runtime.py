"""The process a training run lives in: CPU threads per process, and a fresh process for a run whose Accelerate
settings differ from an earlier run's in the same Python process."""

from __future__ import annotations

import multiprocessing
import os
import queue as queue_module
import traceback

import torch

__all__ = ["set_cpu_threads", "several_processes_on_cpu", "distributed_state", "accelerate_state_conflicts",
           "run_in_fresh_process"]


def set_cpu_threads(num_threads: int | None = None, num_local_processes: int = 1):
    """torch's CPU threads for this process: `num_threads` if given; else, unless `OMP_NUM_THREADS` says otherwise,
    the CPU cores available to this process divided among the `num_local_processes` processes of this machine (so
    that several processes do not oversubscribe the cores)."""
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    elif "OMP_NUM_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(max(1, cores // max(1, num_local_processes)))


def several_processes_on_cpu() -> bool:
    """Whether this process is one of several that a launcher (`torchrun`, `accelerate launch --multi_gpu`) started
    on a machine without a GPU or XPU. Accelerate then sets up `DistributedType.MULTI_CPU` (gloo) only when asked
    for the CPU: pass this as `cpu=` to `Accelerator` / `PartialState`; without it every process runs alone, on all
    the data, as if it were the only one."""
    world_size = max(int(os.environ.get(name) or 1) for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"))
    has_accelerator = torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
    return world_size > 1 and not has_accelerator


def distributed_state():
    """Accelerate's `PartialState` of this process, for scripts that split work over processes without an
    `Accelerator` (inference, tokenization): the CPU (gloo) state when several launched processes share a machine
    without a GPU (`several_processes_on_cpu`), so they get `DistributedType.MULTI_CPU` with their real ranks instead
    of each believing it is the only one."""
    from accelerate import PartialState

    return PartialState(cpu=several_processes_on_cpu())


def accelerate_state_conflicts(mixed_precision: str | None = None) -> bool:
    """Whether `Accelerator(mixed_precision=...)` would clash with the Accelerate state an earlier run left in this
    process. Accelerate keeps one state per process (its mixed precision included) and has no public way to reset
    it, so such a run needs a fresh process ([`run_in_fresh_process`]); runs with the same settings share it."""
    from accelerate.state import AcceleratorState, is_initialized

    if not is_initialized():
        return False
    requested = (mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION") or "no").lower()
    return AcceleratorState().mixed_precision != requested


def _call_and_send(queue, function, args, kwargs):
    try:
        result = function(*args, **kwargs)
    except BaseException as error:  # noqa: BLE001 - handed to the parent, which raises it
        queue.put(("error", f"{type(error).__name__}: {error}\n{traceback.format_exc()}"))
        raise
    queue.put(("result", result))


def run_in_fresh_process(function, *args, **kwargs):
    """`function(*args, **kwargs)` in a new Python process (started with `spawn`, so it inherits no state), and its
    return value. `function`, its arguments and its result must be picklable (a module-level function such as a
    training script's `main`). A failure in the child raises a `RuntimeError` here with the child's traceback."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_call_and_send, args=(queue, function, args, kwargs))
    child.start()
    try:
        while True:
            try:
                kind, payload = queue.get(timeout=1.0)
                break
            except queue_module.Empty:
                if not child.is_alive() and queue.empty():
                    raise RuntimeError(f"The fresh process running {getattr(function, '__name__', function)} exited "
                                       f"with code {child.exitcode} without a result.") from None
    finally:
        child.join()
    if kind == "error":
        raise RuntimeError(f"{getattr(function, '__name__', function)} failed in its fresh process:\n{payload}")
    return payload
