"""The torch.distributed env:// rendezvous (MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK) for a rank process.

Under SLURM it is derived from the task's environment (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_JOB_NODELIST,
SLURM_JOB_ID), parsing the node list with submitit's parser. The master is the first node of the allocation, where
rank 0 runs; when that node's name does not resolve (test clusters whose node names are not hostnames), the address
srun launched from (SLURM_LAUNCH_NODE_IPADDR, the batch host = first node) is used instead. The port is a function
of the job id, so every rank agrees without talking, a requeued job keeps it, and concurrent jobs differ.
"""
from __future__ import annotations

import os
import random
import socket
from dataclasses import dataclass
from typing import Callable, Mapping

PORT_RANGE = (20000, 60000)


@dataclass(frozen=True)
class Rendezvous:
    master_addr: str
    master_port: int
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int

    def env(self) -> dict[str, str]:
        return {
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
            "RANK": str(self.rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_RANK": str(self.local_rank),
            "LOCAL_WORLD_SIZE": str(self.local_world_size),
        }

    def export(self) -> "Rendezvous":
        os.environ.update(self.env())
        return self


def port_for_job(job_id: str) -> int:
    """A port in PORT_RANGE chosen by the job id (the same on every rank, and across requeues of the job)."""
    return random.Random(str(job_id)).randrange(*PORT_RANGE)


def _resolves(host: str) -> bool:
    try:
        socket.getaddrinfo(host, None)
        return True
    except OSError:
        return False


def from_slurm(environ: Mapping[str, str] | None = None, resolves: Callable[[str], bool] = _resolves) -> Rendezvous:
    """The rendezvous of this SLURM task. An explicit MASTER_ADDR/MASTER_PORT in the environment wins."""
    from submitit.slurm.slurm import _parse_node_list

    env = os.environ if environ is None else environ
    try:
        job_id = env["SLURM_JOB_ID"]
        rank = int(env["SLURM_PROCID"])
        world_size = int(env["SLURM_NTASKS"])
        nodelist = env["SLURM_JOB_NODELIST"]
    except KeyError as missing:
        raise RuntimeError(f"not inside a SLURM task: {missing.args[0]} is not set") from None
    num_nodes = int(env.get("SLURM_JOB_NUM_NODES", env.get("SLURM_NNODES", "1")))
    local_rank = int(env.get("SLURM_LOCALID", "0"))
    nodes = _parse_node_list(nodelist)
    addr = env.get("MASTER_ADDR")
    if not addr:
        addr = nodes[0]
        if not resolves(addr):
            addr = env.get("SLURM_LAUNCH_NODE_IPADDR") or "127.0.0.1"
    port = int(env["MASTER_PORT"]) if env.get("MASTER_PORT") else port_for_job(job_id)
    return Rendezvous(addr, port, rank, world_size, local_rank, max(1, world_size // max(1, num_nodes)))


def free_port() -> int:
    """A free TCP port on loopback (for local runs)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local(rank: int, world_size: int, port: int) -> Rendezvous:
    return Rendezvous("127.0.0.1", port, rank, world_size, rank, world_size)
