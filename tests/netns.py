"""Emulated LAN hosts for tests: network namespaces on a bridge, links capped by HTB.

    with Lan(["client", "w1", "w2"], rate="200mbit") as lan:
        lan.ip("w1") -> "10.77.0.2"; lan.run("w1", [...]) -> Popen inside that host

A namespace "tl-sw-<id>" holds the bridge; each host namespace gets a veth pair (eth0 on the
host, the other end on the bridge) and an HTB qdisc capping its egress. Everything is removed on
exit, even after an error. Needs root, iproute2 (ip, tc)."""
from __future__ import annotations

import os
import subprocess
import uuid


def sh(*args: str) -> None:
    p = subprocess.run(args, capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(f"{' '.join(args)}: {p.stderr.strip()}")


class Lan:
    def __init__(self, hosts: list[str], rate: str = "1gbit", subnet: str = "10.77.0"):
        self.id = uuid.uuid4().hex[:6]
        self.hosts, self.rate, self.subnet = hosts, rate, subnet
        self.sw = f"tl-sw-{self.id}"
        self.ns = {h: f"tl-{h}-{self.id}" for h in hosts}

    def ip(self, host: str) -> str:
        return f"{self.subnet}.{self.hosts.index(host) + 2}"

    def __enter__(self) -> "Lan":
        if os.geteuid() != 0:
            raise RuntimeError("the emulated LAN needs root (ip netns, tc)")
        try:
            sh("ip", "netns", "add", self.sw)
            sh("ip", "-n", self.sw, "link", "add", "br0", "type", "bridge")
            sh("ip", "-n", self.sw, "link", "set", "br0", "up")
            for i, h in enumerate(self.hosts):
                ns = self.ns[h]
                sh("ip", "netns", "add", ns)
                sh("ip", "-n", ns, "link", "set", "lo", "up")
                sh("ip", "link", "add", f"tlv{self.id}{i}", "type", "veth", "peer", "name",
                   f"tlp{self.id}{i}")
                sh("ip", "link", "set", f"tlv{self.id}{i}", "netns", ns, "name", "eth0")
                sh("ip", "link", "set", f"tlp{self.id}{i}", "netns", self.sw)
                sh("ip", "-n", self.sw, "link", "set", f"tlp{self.id}{i}", "master", "br0", "up")
                sh("ip", "-n", ns, "addr", "add", f"{self.ip(h)}/24", "dev", "eth0")
                sh("ip", "-n", ns, "link", "set", "eth0", "up")
                sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "eth0", "root",
                   "handle", "1:", "htb", "default", "10")
                sh("ip", "netns", "exec", ns, "tc", "class", "add", "dev", "eth0", "parent", "1:",
                   "classid", "1:10", "htb", "rate", self.rate, "ceil", self.rate)
        except Exception:
            self.__exit__()
            raise
        return self

    def run(self, host: str, cmd: list[str], **kw) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", self.ns[host], *cmd], **kw)

    def tc_stats(self, host: str) -> str:
        return subprocess.run(["ip", "netns", "exec", self.ns[host], "tc", "-s", "class", "show",
                               "dev", "eth0"], capture_output=True, text=True).stdout

    def __exit__(self, *exc) -> None:
        for ns in list(self.ns.values()) + [self.sw]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
