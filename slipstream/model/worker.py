"""Tensor-parallel worker processes: one per rank other than 0, each holding its model shard."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp

from slipstream.config import EngineConfig

logger = logging.getLogger(__name__)


def ranks_per_node(config: EngineConfig) -> int:
    n, nodes = config.tensor_parallel_size, config.nnodes
    if n % nodes:
        raise ValueError(f"--tensor-parallel-size {n} must be a multiple of --nnodes {nodes}")
    return n // nodes


def cpu_threads(config: EngineConfig) -> int:
    """Compute threads for this node: --cpu-threads, else OMP_NUM_THREADS, else the cores this process may
    run on (its affinity mask: taskset, a container's cpuset), not every core of the machine."""
    if config.cpu_threads is not None:
        return config.cpu_threads
    env = os.environ.get("OMP_NUM_THREADS", "")
    return int(env) if env.isdigit() and int(env) > 0 else len(os.sched_getaffinity(0))


# OpenMP's thread binding. Exported as CPU tuning guides suggest (OMP_PROC_BIND=close OMP_PLACES=cores), it pins each
# compute thread to one core, and the server's other threads (HTTP, detokenization) then preempt a compute thread that
# cannot move, while the rest of the team waits for it: served at 32 clients on 2 cores, 323 / 326 output tok/s against
# 511 / 499 without (0.64x; Intel Xeon, exact mode, two rounds alternated).
THREAD_BINDING_ENV = ("OMP_PROC_BIND", "OMP_PLACES", "GOMP_CPU_AFFINITY")


def thread_binding_warning() -> str | None:
    """What to log when the environment binds OpenMP's threads to cores (OMP_PROC_BIND=false binds none)."""
    if os.environ.get("OMP_PROC_BIND", "").strip().lower() == "false":
        return None
    bound = [f"{name}={os.environ[name]}" for name in THREAD_BINDING_ENV if os.environ.get(name, "").strip()]
    if not bound:
        return None
    return (f"{' '.join(bound)} binds the compute threads to cores, which costs this server about a third of its "
            "throughput under load (the HTTP and tokenizer threads then preempt a pinned compute thread); unset it")


def threads_per_rank(config: EngineConfig) -> int:
    """Each rank gets its share of the node's threads, so ranks do not oversubscribe the cores."""
    return max(1, cpu_threads(config) // ranks_per_node(config))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """Ask Linux to kill this worker when the process that started it dies, so no rank outlives the
    server however it ends (a SIGKILL included)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _worker_main(config: EngineConfig, model_dir: Path, max_model_len: int, rank: int) -> None:
    from slipstream.model.loader import load_config
    from slipstream.model.parallel import init_distributed
    from slipstream.model.runner import ModelRunner, resolve_device

    _die_with_parent()
    torch.set_num_threads(threads_per_rank(config))
    logging.basicConfig(level=logging.WARNING)
    init_distributed(rank, config.tensor_parallel_size, config.master_addr, config.master_port,
                     resolve_device(config.device))
    runner = ModelRunner(config, load_config(model_dir), model_dir, max_model_len)
    try:
        runner.worker_loop()
    except RuntimeError as e:  # rank 0 went away: nothing left to serve
        logger.warning("tensor-parallel rank %d stops: %s", rank, e)
    finally:
        torch.distributed.destroy_process_group()


class WorkerGroup:
    """The worker processes of this node (all ranks of the node except rank 0)."""

    def __init__(self, config: EngineConfig, model_dir: Path, max_model_len: int) -> None:
        per_node = ranks_per_node(config)
        first = config.node_rank * per_node
        ranks = range(max(first, 1), first + per_node)
        ctx = mp.get_context("spawn")
        self.ranks = list(ranks)
        self.procs = [
            ctx.Process(target=_worker_main, args=(config, Path(model_dir), max_model_len, r), daemon=True,
                        name=f"slipstream-tp{r}")
            for r in ranks
        ]
        for p in self.procs:
            p.start()

    def alive(self) -> dict[int, bool]:
        """Whether each worker's process still runs, by rank."""
        return {r: p.is_alive() for r, p in zip(self.ranks, self.procs, strict=True)}

    def dead(self) -> list[str]:
        return [f"{p.name} (exit code {p.exitcode})" for p in self.procs if not p.is_alive()]

    def join(self, timeout: float = 10.0) -> None:
        for p in self.procs:
            p.join(timeout)
            if p.is_alive():
                p.kill()
                p.join()


def run_node_workers(config: EngineConfig) -> int:
    """Entry point of a node other than 0: run its ranks until rank 0 stops them."""
    from slipstream.model.loader import hf_directory, load_config
    from slipstream.model.runner import trained_context

    if config.master_port is None:
        raise ValueError("--master-port is required with --nnodes > 1")
    model_dir = hf_directory(config.model)
    hf_config = load_config(model_dir)
    max_len = min(config.max_model_len or trained_context(hf_config), trained_context(hf_config))
    group = WorkerGroup(config, model_dir, max_len)
    for p in group.procs:
        p.join()
    dead = [p for p in group.procs if p.exitcode]
    return 1 if dead else 0
