"""Start real `bin/worker` processes for tests, on free loopback ports (or inside a netns)."""
from __future__ import annotations

import socket
import subprocess
import time

import grpc

from conftest import ROOT
from proto import tensorlan_pb2 as pb
from proto import tensorlan_pb2_grpc as rpc


def free_port() -> int:
    """A port p with p and p + 1 (the step channel) both free."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        if p < 65000:
            try:
                with socket.socket() as s2:
                    s2.bind(("127.0.0.1", p + 1))
                return p
            except OSError:
                continue
    raise RuntimeError("no free port pair")


def wait_ready(addr: str, timeout: float = 60.0) -> None:
    stub = rpc.WorkerStub(grpc.insecure_channel(addr))
    t = time.time()
    while time.time() - t < timeout:
        try:
            stub.Hello(pb.HelloRequest(protocol_version=1), timeout=2)
            return
        except grpc.RpcError:
            time.sleep(0.2)
    raise RuntimeError(f"worker {addr} did not start")


class Workers:
    def __init__(self, n: int, threads: int = 1, prefix: list[str] | None = None, host="127.0.0.1",
                 extra: list[str] = ()):
        self.procs, self.addrs = [], []
        for _ in range(n):
            port = free_port()
            cmd = (prefix or []) + [str(ROOT / "bin" / "worker"), str(port), "--threads",
                                    str(threads), "--host", host, *extra]
            self.procs.append(subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True))
            self.addrs.append(f"{host}:{port}")
        for a in self.addrs:
            wait_ready(a)

    def stop(self) -> list[str]:
        logs = []
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                _, err = p.communicate(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                _, err = p.communicate()
            logs.append(err)
        return logs
