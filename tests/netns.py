"""Network namespaces as test "hosts": a private link between nodes on one machine.

`NodeNetwork(num_nodes=2)` creates one network namespace per node, joined by a veth pair
of its own, each end with its own address in a private subnet that exists only inside
these namespaces; the root namespace and its interfaces are never touched (the pair is
created there and moved out at once). A process started on a node (`exec_prefix`) enters
its network namespace and gets a mount and a UTS namespace of its own, with the node's
hosts file bind-mounted over /etc/hosts (node names resolve to their link addresses) and
the node's name as hostname, so `hostname`, `hostname --ip-address` and whatever resolves
the hostname (gloo, Ray) see that node. The rest of the filesystem (/sys included: not
`ip netns exec`, whose fresh /sys has no cgroup mounts for slurmd) is the machine's.

`remove()` kills every process still inside these namespaces (all of them were started
through this object's prefixes), then deletes the namespaces (which deletes the veth
pair) and the hosts files' directory. Idempotent; needs root.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

SUBNET = "10.250.0"  # /24, private to the namespaces: node i is SUBNET.(i+1)
_SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])  # `ip` lives in /usr/sbin


def _ip_binary() -> str:
    return shutil.which("ip", path=_SEARCH_PATH) or "ip"


def _ip(*args: str) -> None:
    result = subprocess.run([_ip_binary(), *args], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` exited {result.returncode}: {result.stderr.strip()}")


class NodeNetwork:
    """`num_nodes` namespaces (2 at most: one veth pair) named `<prefix>-<token>-n<i>`."""

    def __init__(self, num_nodes: int = 2, *, prefix: str = "sdpg"):
        if num_nodes != 2:
            raise ValueError(f"NodeNetwork supports exactly 2 nodes (one veth pair), got {num_nodes}")
        token = secrets.token_hex(3)
        self.node_names = [f"node{i}" for i in range(num_nodes)]
        self.namespaces = [f"{prefix}-{token}-n{i}" for i in range(num_nodes)]
        self.addresses = [f"{SUBNET}.{i + 1}" for i in range(num_nodes)]
        self.interfaces = [f"sdv{token}{'ab'[i]}" for i in range(num_nodes)]  # ≤ 15 chars
        self._created: list[str] = []
        self.hosts_dir: Path | None = None

    def create(self) -> NodeNetwork:
        missing = [tool for tool in ("ip", "nsenter", "unshare") if shutil.which(tool, path=_SEARCH_PATH) is None]
        if missing:
            raise FileNotFoundError(f"{', '.join(missing)} not found: install iproute2 (ip) and util-linux")
        try:
            self.hosts_dir = Path(tempfile.mkdtemp(prefix="sdpg-hosts-", dir="/tmp"))
            (self.hosts_dir / "hosts").write_text(self.hosts_file())
            for namespace in self.namespaces:
                _ip("netns", "add", namespace)
                self._created.append(namespace)
            _ip("link", "add", self.interfaces[0], "type", "veth", "peer", "name", self.interfaces[1])
            for namespace, interface, address in zip(self.namespaces, self.interfaces, self.addresses):
                _ip("link", "set", interface, "netns", namespace)
                _ip("-n", namespace, "addr", "add", f"{address}/24", "dev", interface)
                _ip("-n", namespace, "link", "set", interface, "up")
                _ip("-n", namespace, "link", "set", "lo", "up")
        except BaseException:
            self.remove()
            raise
        return self

    def hosts_file(self) -> str:
        lines = ["127.0.0.1 localhost"] + [f"{a} {n}" for a, n in zip(self.addresses, self.node_names)]
        return "\n".join(lines) + "\n"

    def exec_prefix(self, node: int) -> list[str]:
        """The command prefix that runs a program on node `node` (see the module docstring). It
        execs all the way down, so the started process's pid is the program's."""
        setup = 'mount --bind "$1" /etc/hosts && hostname "$0" && shift && exec "$@"'
        return ["nsenter", f"--net=/run/netns/{self.namespaces[node]}", "unshare", "--mount", "--uts",
                "sh", "-c", setup, self.node_names[node], str(self.hosts_dir / "hosts")]

    def pids(self, node: int | None = None) -> set[int]:
        """Processes inside node `node`'s namespace, or any of these namespaces."""
        inodes = set()
        for namespace in self._created if node is None else [self.namespaces[node]]:
            with contextlib.suppress(OSError):
                inodes.add(os.stat(f"/run/netns/{namespace}").st_ino)
        found = set()
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit():
                with contextlib.suppress(OSError):
                    if os.stat(proc / "ns" / "net").st_ino in inodes:
                        found.add(int(proc.name))
        return found

    def remove(self, timeout_s: float = 10.0) -> None:
        """Kills what still runs inside, deletes the namespaces (and so the veth pair) and hosts files."""
        deadline = time.monotonic() + timeout_s
        while (pids := self.pids() - {os.getpid()}) and time.monotonic() < deadline:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
        # A pair never moved out of the root namespace (create() failed half-way) has our random name.
        subprocess.run([_ip_binary(), "link", "del", self.interfaces[0]], capture_output=True, timeout=30)
        for namespace in self._created:
            subprocess.run([_ip_binary(), "netns", "del", namespace], capture_output=True, timeout=30)
        self._created.clear()
        if self.hosts_dir is not None:
            shutil.rmtree(self.hosts_dir, ignore_errors=True)
            self.hosts_dir = None
