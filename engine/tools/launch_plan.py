"""What a launch will be, checked before any process starts: the hostfile, the world size, the
master address. ``launchers/pretrain.sh`` runs it and passes the world size on to the run's own
check (``--check --world-size N``), so a world size the recipe cannot use is refused once, before
launch, instead of by every rank after it.

    python -m engine.tools.launch_plan [--hostfile FILE] [--gpus N] [--master-addr HOST] [--node-rank K]

Prints the world size; a mistake is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import re
import socket
import sys
from pathlib import Path

from engine.errors import ConfigError

_LINE = re.compile(r"^(\S+)\s+slots=(\d+)\s*$")


def read_hostfile(path: str | Path) -> list[tuple[str, int]]:
    """(host, slots) per line, as DeepSpeed reads it; names must be unique and slots positive."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--hostfile {path}: no such file")
    hosts: list[tuple[str, int]] = []
    for n, raw in enumerate(p.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = _LINE.match(line)
        if not m:
            raise ConfigError(f"--hostfile {path}, line {n}: {raw.strip()!r} is not '<host> slots=<processes>'")
        host, slots = m.group(1), int(m.group(2))
        if slots < 1:
            raise ConfigError(f"--hostfile {path}, line {n}: slots={slots}; every host needs at least one slot")
        if any(h == host for h, _ in hosts):
            raise ConfigError(
                f"--hostfile {path}: host {host!r} is listed twice; DeepSpeed needs one line per node with a distinct "
                "name (two 'nodes' on one machine: name them node0 and node1, see docs/launching.md)"
            )
        hosts.append((host, slots))
    if not hosts:
        raise ConfigError(f"--hostfile {path}: no hosts")
    return hosts


def world_size(hostfile: str | None, gpus: int | None) -> int:
    if hostfile:
        return sum(slots for _, slots in read_hostfile(hostfile))
    if gpus:
        return gpus
    import torch

    return max(torch.cuda.device_count(), 1)


def check_master(addr: str, hostfile: str | None, no_ssh: bool) -> None:
    """The master address must resolve (a typo otherwise hangs every node until a timeout)."""
    if not addr:
        return
    try:
        socket.getaddrinfo(addr, None)
    except OSError:
        if hostfile and no_ssh and addr in {h for h, _ in read_hostfile(hostfile)}:
            return  # the hostfile's names need not resolve without ssh; the master address is used as given
        raise ConfigError(
            f"--master-addr {addr}: the name does not resolve from this machine; use an address every node can reach"
        ) from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m engine.tools.launch_plan",
        description="Check a launch before it starts (hostfile, processes, master address) and print its world size.",
    )
    ap.add_argument("--hostfile", help="DeepSpeed hostfile: '<host> slots=<processes>' per node")
    ap.add_argument("--gpus", type=int, default=0, help="processes on this machine (without a hostfile)")
    ap.add_argument("--master-addr", default="", help="address of the node that runs rank 0")
    ap.add_argument("--no-ssh", action="store_true", help="nodes are started one by one, without ssh")
    args = ap.parse_args(argv)
    try:
        if args.hostfile and args.gpus:
            wrong = [(h, s) for h, s in read_hostfile(args.hostfile) if s != args.gpus]
            if wrong:
                raise ConfigError(
                    f"--gpus {args.gpus}, but the hostfile gives {wrong[0][0]} slots={wrong[0][1]}; the hostfile's "
                    "slots decide the processes per node: make them agree or leave out --gpus"
                )
        if args.gpus < 0:
            raise ConfigError(f"--gpus {args.gpus}: must be at least 1")
        n = world_size(args.hostfile, args.gpus or None)
        check_master(args.master_addr, args.hostfile, args.no_ssh)
    except ConfigError as err:
        print(f"launchers/pretrain.sh: {err}", file=sys.stderr)
        return err.exit_code
    print(n)
    return 0


if __name__ == "__main__":
    sys.exit(main())
