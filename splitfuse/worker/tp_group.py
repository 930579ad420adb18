"""A tensor-parallel group of processes: rendezvous, starting the ranks, and ending them together.

One replica is one group. Its rank 0 is the worker process the router starts: it runs the scheduler
and the ZeroMQ link, opens the rendezvous (a torch.distributed TCPStore), and starts the other ranks
of its host as its children (`python -m splitfuse.worker.tp_group`), which load their shard of the
model and then run each step rank 0 hands them (compiled/parallel.py, StepBroadcast). With
nnodes > 1, host k > 0 runs `splitfuse worker --node-rank k` (`serve_node`), which starts that host's
ranks and starts them again whenever the group breaks, so that they join the next rank 0.

Any rank's death ends the group: rank 0 exits when a child of its own dies (a watcher thread) or a
collective fails (the next step's broadcast raises GroupLost); the others see their broadcast fail
and exit; a child dies with its parent (PR_SET_PDEATHSIG), so nothing outlives rank 0 or a node's
supervisor. The router then restarts rank 0, and errors the requests it held, as for any worker."""
import argparse
import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta

import msgspec
import torch
import torch.distributed as dist

from splitfuse.compiled.loader import resolve_model_dir
from splitfuse.compiled.parallel import Shard, StepBroadcast
from splitfuse.config import EngineConfig
from splitfuse.worker.engine import Engine

log = logging.getLogger("splitfuse.worker.tp_group")  # by name: run with -m, __name__ is __main__

RENDEZVOUS_TIMEOUT = timedelta(minutes=15)  # ranks on other hosts may start late and load slowly
# Ranks other than 0 wait in a broadcast for as long as rank 0 has no work: a collective never times out.
# A dead rank makes the others' collectives fail at once (the connection closes); a hung one makes rank 0
# miss its heartbeats, and the router kills it.
COLLECTIVE_TIMEOUT = timedelta(days=365)
NODE_RESTART_DELAY = 2.0  # seconds before a node's ranks try to join the next group


def ranks_per_node(config: EngineConfig) -> int:
    return config.tensor_parallel_size // config.nnodes


def start_leader(config: EngineConfig, replica: int, replicas_on_device: int) -> Engine:
    """Rank 0 of one replica's group: start this host's other ranks, join, and build the engine (which
    hands its steps to the others)."""
    if config.nnodes > 1 and replica > 0:
        raise ValueError("a tensor-parallel group over several hosts serves one replica (its master_port is "
                         "the group's); start one frontend per group")
    resolve_model_dir(config.model, config.cache_dir)  # the bundled model is converted once, before any rank reads it
    local = ranks_per_node(config)
    threads = max(1, torch.get_num_threads() // local)  # this host's ranks split the cores the replica has
    torch.set_num_threads(threads)
    store = dist.TCPStore(config.master_addr, config.master_port or 0, is_master=True, wait_for_workers=False,
                          timeout=RENDEZVOUS_TIMEOUT)
    config = msgspec.structs.replace(config, master_port=store.port)  # the free one it took, when none was given
    children = [_spawn(config, rank, replica * local + rank, replicas_on_device, threads) for rank in range(1, local)]
    _watch(children)
    shard = _join(config, 0, store)
    return Engine(_on_device(config, replica * local), replicas_on_device=replicas_on_device, shard=shard)


def _on_device(config: EngineConfig, index: int) -> EngineConfig:
    """On GPU every rank of a host has its own device: the `index`th (round-robin over the visible ones)."""
    gpu = config.device.startswith("cuda") or (config.device == "auto" and torch.cuda.is_available())
    return msgspec.structs.replace(config, device=f"cuda:{index % torch.cuda.device_count()}") if gpu else config


def _backend(config: EngineConfig) -> str:
    return "nccl" if _on_device(config, 0).device.startswith("cuda") else "gloo"


def _join(config: EngineConfig, rank: int, store: dist.Store) -> Shard:
    dist.init_process_group(_backend(config), store=store, rank=rank, world_size=config.tensor_parallel_size,
                            timeout=COLLECTIVE_TIMEOUT)
    return Shard(rank, config.tensor_parallel_size, dist.group.WORLD)


def _spawn(config: EngineConfig, rank: int, device_index: int, replicas_on_device: int,
           threads: int) -> subprocess.Popen:
    cmd = [sys.executable, "-P", "-m", "splitfuse.worker.tp_group", "--rank", str(rank), "--device-index", str(device_index),
           "--replicas-on-device", str(replicas_on_device), "--threads", str(threads),
           "--config", config.to_json()]
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL)


def _watch(children: list[subprocess.Popen]) -> None:
    """Leave as soon as one of this host's other ranks dies: the group cannot step without it. os._exit from
    this thread, because the serving thread may be waiting in a collective; the children die with us."""
    def wait(child: subprocess.Popen) -> None:
        code = child.wait()
        log.warning("tensor-parallel rank (pid %d) exited with code %s; the group ends", child.pid, code)
        os._exit(1)
    for child in children:
        threading.Thread(target=wait, args=(child,), name=f"rank-{child.pid}", daemon=True).start()


def _die_with_parent() -> None:
    """Linux: the kernel kills this process when the one that started it exits, however it exits."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG


def serve_node(config: EngineConfig, node_rank: int) -> None:
    """Host `node_rank` > 0 of a group over several hosts: run its ranks, and run them again each time the
    group breaks (rank 0 restarted by its router, or a rank lost), until SIGTERM or Ctrl-C."""
    if not 0 < node_rank < config.nnodes:
        raise ValueError(f"node_rank must be in [1, {config.nnodes}) on the hosts that join rank 0's; "
                         f"node 0 is the frontend's host (`splitfuse serve`)")
    resolve_model_dir(config.model, config.cache_dir)
    local = ranks_per_node(config)
    threads = max(1, torch.get_num_threads() // local)
    while True:
        children = [_spawn(config, node_rank * local + i, i, 1, threads) for i in range(local)]
        try:
            while all(child.poll() is None for child in children):
                time.sleep(0.5)
        finally:
            for child in children:
                child.kill()
                child.wait()
        log.warning("node %d: the tensor-parallel group ended; joining the next one", node_rank)
        time.sleep(NODE_RESTART_DELAY)


def rank_main(argv: list[str] | None = None) -> None:
    """A rank other than 0: join the group, load this rank's shard, run rank 0's steps until the group breaks."""
    parser = argparse.ArgumentParser(description="a splitfuse tensor-parallel rank (started by rank 0 or a node)")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--device-index", type=int, required=True)
    parser.add_argument("--replicas-on-device", type=int, required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--config", required=True, help="EngineConfig fields as JSON")
    args = parser.parse_args(argv)
    _die_with_parent()
    torch.set_num_threads(args.threads)
    config = _on_device(EngineConfig.from_json(args.config), args.device_index)
    store = dist.TCPStore(config.master_addr, config.master_port, is_master=False, timeout=RENDEZVOUS_TIMEOUT)
    shard = _join(config, args.rank, store)
    engine = Engine(config, progress=False, replicas_on_device=args.replicas_on_device, shard=shard)
    try:
        StepBroadcast(shard, engine.runner.device).follow(engine.runner)
    except RuntimeError as e:  # rank 0 or another rank is gone
        sys.exit(f"tensor-parallel rank {args.rank}: the group ended ({str(e).splitlines()[0]})")


if __name__ == "__main__":
    rank_main()
