"""Start real `bin/worker` processes for tests, on free loopback ports (or inside a netns), and
make throwaway TLS certificates for them."""
from __future__ import annotations

import socket
import subprocess
import tempfile
import time
from pathlib import Path

import grpc

from proto import tensorlan_pb2 as pb
from proto import tensorlan_pb2_grpc as rpc

ROOT = Path(__file__).resolve().parents[1]  # (not from conftest: bench/serving.py imports this)


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


def wait_ready(addr: str, timeout: float = 240.0, credentials=None, proc=None) -> None:
    """Wait until the worker at `addr` answers a Hello (or refuses it for want of a token: it is
    serving); `credentials` for a TLS worker. Fails at once if `proc` exits. The timeout allows
    for a clean clone: the first worker compiles every kernel and the step loop before it
    serves (~50 s alone, more beside the other tests' processes); later ones load Numba's cache."""
    channel = grpc.secure_channel(addr, credentials) if credentials else grpc.insecure_channel(addr)
    stub = rpc.WorkerStub(channel)
    t = time.time()
    try:
        while time.time() - t < timeout:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"worker {addr} exited with code {proc.returncode}")
            try:
                stub.Hello(pb.HelloRequest(protocol_version=1), timeout=2)
                return
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.UNAUTHENTICATED:
                    return
                time.sleep(0.2)
    finally:
        channel.close()
    raise RuntimeError(f"worker {addr} did not start")


class Workers:
    """n `bin/worker` processes on free ports; their stderr goes to files (a pipe nobody reads
    would block a worker that logs much), read with log(i) or returned by stop()."""

    def __init__(self, n: int, threads: int = 1, prefix: list[str] | None = None, host="127.0.0.1",
                 extra: list[str] = (), credentials=None, env=None):
        self.procs, self.addrs, self.logs = [], [], []
        for _ in range(n):
            port = free_port()
            cmd = (prefix or []) + [str(ROOT / "bin" / "worker"), str(port), "--threads",
                                    str(threads), "--host", host, *extra]
            self.logs.append(tempfile.TemporaryFile("w+"))
            self.procs.append(subprocess.Popen(cmd, stderr=self.logs[-1], text=True, env=env))
            self.addrs.append(f"{'127.0.0.1' if host == '0.0.0.0' else host}:{port}")
        try:
            for a, p in zip(self.addrs, self.procs):
                wait_ready(a, credentials=credentials, proc=p)
        except RuntimeError as e:
            raise RuntimeError(f"{e}: {self.stop()}")

    def log(self, i: int = 0) -> str:
        self.logs[i].seek(0)
        return self.logs[i].read()

    def stop(self) -> list[str]:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        return [self.log(i) for i in range(len(self.procs))]


def make_certs(d: Path) -> dict[str, Path]:
    """A throwaway CA, a worker certificate for 127.0.0.1 / localhost and a client certificate,
    made with the openssl CLI into directory d: {ca, server_cert, server_key, client_cert,
    client_key, other_ca}. other_ca signed nothing here: a client trusting it must refuse."""
    def run(*args):
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    for ca in ("ca", "other_ca"):
        run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout",
            f"{ca}.key", "-out", f"{ca}.pem", "-days", "2", "-subj", f"/CN=tensorlan test {ca}")
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for who, ext in (("server", ["-extfile", "san.ext"]), ("client", [])):
        run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout",
            f"{who}.key", "-out", f"{who}.csr", "-subj", f"/CN={who}")
        run("x509", "-req", "-in", f"{who}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{who}.pem", "-days", "2", *ext)
    return {"ca": d / "ca.pem", "other_ca": d / "other_ca.pem", "server_cert": d / "server.pem",
            "server_key": d / "server.key", "client_cert": d / "client.pem", "client_key": d / "client.key"}
