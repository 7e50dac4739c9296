"""Test hosts in network namespaces, joined by a bridge, for partition tests.

Each host is a network namespace of its own with one veth into a bridge (in a
namespace of its own too), an address in a /24 that exists only inside these
namespaces, and its own iptables. This process reaches the hosts through one more
veth into the bridge. A partition is a pair of DROP rules in each host's iptables
(this kernel has no netem); :meth:`Hosts.heal` flushes them. Everything is removed
by :meth:`Hosts.close` (deleting a namespace deletes its interfaces).

Needs root, ``ip`` (iproute2) and ``iptables``: ``ops/setup-netns.sh`` installs them.
"""

from __future__ import annotations

import secrets
import subprocess
from dataclasses import dataclass


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=30)


@dataclass
class Host:
    name: str
    netns: str
    address: str

    def command(self, argv: list[str]) -> list[str]:
        """``argv`` run inside this host's namespace (``ip netns exec`` execs it: same pid)."""
        return ["ip", "netns", "exec", self.netns, *argv]


class Hosts:
    """``names`` hosts on one bridge; names and the subnet's third octet are drawn at
    random, so a run never meets what an earlier, killed run left behind."""

    def __init__(self, names: list[str]) -> None:
        tag = secrets.token_hex(2)
        octet = 100 + secrets.randbelow(100)
        self.subnet = f"10.213.{octet}"
        self.tag = tag
        self.switch = f"frsw{tag}"
        self.hosts: dict[str, Host] = {}
        self._namespaces: list[str] = []
        try:
            self._add_namespace(self.switch)
            _run("ip", "netns", "exec", self.switch, "ip", "link", "add", "br0", "type", "bridge")
            _run("ip", "netns", "exec", self.switch, "ip", "link", "set", "br0", "up")
            for i, name in enumerate(names):
                netns = f"fr{tag}h{i}"
                self._add_namespace(netns)
                self.hosts[name] = Host(name, netns, f"{self.subnet}.{i + 1}")
                self._wire(f"fr{tag}v{i}", f"fr{tag}p{i}", netns, self.hosts[name].address)
            # This process's own way in: a veth left in this namespace.
            self.me = f"{self.subnet}.254"
            self._wire(f"fr{tag}vm", f"fr{tag}pm", None, self.me)
        except BaseException:
            self.close()
            raise

    def _add_namespace(self, netns: str) -> None:
        _run("ip", "netns", "add", netns)
        self._namespaces.append(netns)
        _run("ip", "netns", "exec", netns, "ip", "link", "set", "lo", "up")

    def _wire(self, inside: str, port: str, netns: str | None, address: str) -> None:
        _run("ip", "link", "add", inside, "type", "veth", "peer", "name", port)
        _run("ip", "link", "set", port, "netns", self.switch)
        _run("ip", "netns", "exec", self.switch, "ip", "link", "set", port, "master", "br0")
        _run("ip", "netns", "exec", self.switch, "ip", "link", "set", port, "up")
        prefix = [] if netns is None else ["ip", "netns", "exec", netns]
        if netns is not None:
            _run("ip", "link", "set", inside, "netns", netns)
        _run(*prefix, "ip", "addr", "add", f"{address}/24", "dev", inside)
        _run(*prefix, "ip", "link", "set", inside, "up")

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def cut(self, a: str, b: str) -> None:
        """Drop everything between hosts ``a`` and ``b``, both ways (a partition)."""
        for one, other in ((self[a], self[b]), (self[b], self[a])):
            for chain, flag in (("INPUT", "-s"), ("OUTPUT", "-d")):
                _run("ip", "netns", "exec", one.netns, "iptables", "-A", chain, flag, other.address, "-j", "DROP")

    def heal(self) -> None:
        for host in self.hosts.values():
            _run("ip", "netns", "exec", host.netns, "iptables", "-F")

    def close(self) -> None:
        for netns in reversed(self._namespaces):
            subprocess.run(["ip", "netns", "del", netns], capture_output=True, timeout=30)
        self._namespaces = []
