"""An emulated LAN cluster on this one machine: hosts with capped links, CPUs and memory (root only).

    from bench.lan import Cluster
    with Cluster(cpus=[0.25] * 4, mem=None, rate="1gbit", delay_ms=0.1) as c:
        r = c.run_client([MODEL, "-i", "Hello", "-n", "32", "--no-local", "--json",
                          "--workers", c.workers_arg()])          # or c.workers_arg([2, 1, 1, 1])
        print(r.returncode, r.stdout, c.peak_memory("w0"), c.relay_overhead_us())

Each host is a network namespace whose eth0 is one end of a veth pair; the other end is a port of
a bridge in a "switch" namespace, and HTB caps both directions of every link at `rate`. Each host
has its own cgroups (v1 cpu, cpuacct and memory, nested under this process's own): cpu.cfs_quota_us
caps it at a number of cores, memory.limit_in_bytes caps its memory, max_usage_in_bytes records its
peak. Worker i runs `bin/worker` on host "w{i}" (gRPC on 7000 + 2i, its step channel on 7001 + 2i).
The client runs on host "client", where bench/relay.c listens on 127.0.0.1 at the same ports and
forwards to the workers, holding each direction back by `delay_ms` (this kernel has no netem).

Everything is named tlan-<pid>-<n>-...: it is removed on exit, even after an error, SIGINT or
SIGTERM, and cleanup_stale() (run on entry too; `python -m bench.lan cleanup`) removes what runs
whose process died (SIGKILL, a crash) left behind. Needs root, iproute2, util-linux's setpriv,
cgroup v1 (cpu, cpuacct, memory) under /sys/fs/cgroup and gcc.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import select
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "tlan-"
CGROUPS = Path("/sys/fs/cgroup")
CONTROLLERS = ("cpu", "cpuacct", "memory")
RELAY_SRC = ROOT / "bench" / "relay.c"
CLIENT, WORKER, PYTHON = ROOT / "bin" / "client", ROOT / "bin" / "worker", ROOT / ".venv" / "bin" / "python"
_runs = itertools.count()


def sh(*args: str) -> str:
    p = subprocess.run(args, capture_output=True, text=True)
    if p.returncode:
        raise RuntimeError(f"{' '.join(args)}: {p.stderr.strip()}")
    return p.stdout


def need_root() -> None:
    if os.geteuid() != 0:
        raise RuntimeError("the emulated LAN needs root (network namespaces, tc, cgroups): run it "
                           "as root, e.g. `sudo .venv/bin/python -m ...`")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _kill_all(pids) -> None:
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def _netns_pids(ns: str) -> list[str]:
    return subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()


def own_cgroup(controller: str) -> Path:
    """This process's cgroup directory for a v1 controller: new groups nest under it, so whatever
    limits this process lives under still hold for the hosts."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, names, path = line.split(":", 2)
        if controller in names.split(","):
            d = CGROUPS / controller / path.lstrip("/")
            if (d / "cgroup.procs").exists():
                return d
    raise RuntimeError(f"the cgroup v1 '{controller}' controller is not mounted at "
                       f"{CGROUPS / controller}: mount it (mount -t cgroup -o {controller} cgroup "
                       f"{CGROUPS / controller}) or run on a host with cgroup v1")


class Cgroup:
    """One host's cgroups: cpu (capped at `cores` with a CFS quota), cpuacct (CPU time used) and
    memory (capped at `mem` bytes; peak recorded). None leaves a resource uncapped."""

    def __init__(self, name: str, cores: float | None = None, mem: int | None = None,
                 period_us: int | None = None):
        # by default the shortest period of at least 4 ms whose quota is the kernel's minimum
        # 1000 us or more: a capped host stalls for (1 - cores) x period whenever it has used its
        # quota, and a real slow CPU does not stall at all, so shorter is more honest
        if period_us is None and cores:
            period_us = max(4000, -(-1000 * 1000 // int(cores * 1000)))
        period_us = period_us or 8000
        self.name, self.cores, self.mem, self.period_us = name, cores, mem, period_us
        if cores is not None and cores * period_us < 1000:
            raise ValueError(f"{cores} cores over a {period_us} us period is a quota of "
                             f"{cores * period_us:.0f} us, below the kernel's 1000 us minimum: "
                             f"use a period of at least {int(1000 / cores) + 1} us")
        self.dirs: dict[str, Path] = {}

    def create(self) -> None:
        for c in CONTROLLERS:
            self.dirs[c] = own_cgroup(c) / self.name
            self.dirs[c].mkdir(exist_ok=True)     # exist_ok: cpu and cpuacct may share a mount
        if self.cores is not None:
            (self.dirs["cpu"] / "cpu.cfs_period_us").write_text(str(self.period_us))
            (self.dirs["cpu"] / "cpu.cfs_quota_us").write_text(str(round(self.cores * self.period_us)))
        if self.mem is not None:
            (self.dirs["memory"] / "memory.limit_in_bytes").write_text(str(int(self.mem)))

    def wrap(self, cmd: list[str]) -> list[str]:
        """cmd run by a shell that first moves itself into these groups (before it enters the
        host's network namespace)."""
        procs = dict.fromkeys(str((d / "cgroup.procs").resolve()) for d in self.dirs.values())
        join = " && ".join(f"echo $$ > {shlex.quote(p)}" for p in procs)
        return ["sh", "-c", f'{join} && exec "$@"', "sh", *cmd]

    def read(self, controller: str, file: str) -> str:
        return (self.dirs[controller] / file).read_text().strip()

    def peak_memory(self) -> int:
        """Peak bytes charged to the group (anonymous memory plus page cache it first touched)."""
        return int(self.read("memory", "memory.max_usage_in_bytes"))

    def cpu_seconds(self) -> float:
        return int(self.read("cpuacct", "cpuacct.usage")) / 1e9

    def throttled(self) -> tuple[int, float]:
        """(periods in which the quota ran out, seconds spent throttled) from cpu.stat."""
        st = dict(line.split() for line in self.read("cpu", "cpu.stat").splitlines())
        return int(st["nr_throttled"]), int(st["throttled_time"]) / 1e9

    def remove(self) -> None:
        remove_cgroup_dirs(self.dirs.values())


def remove_cgroup_dirs(dirs) -> None:
    """Kill what still runs in these groups, then remove them."""
    for d in dict.fromkeys(Path(d).resolve() for d in dirs):
        if not d.exists():
            continue
        for _ in range(100):
            try:
                pids = (d / "cgroup.procs").read_text().split()
            except FileNotFoundError:
                break
            _kill_all(pids)
            try:
                d.rmdir()
                break
            except OSError:
                time.sleep(0.05)
        else:
            raise RuntimeError(f"cannot remove cgroup {d}: processes {pids} stay in it")


def cleanup_stale() -> list[str]:
    """Remove what earlier runs whose process has died left behind: network namespaces (with the
    processes in them) and cgroups named tlan-<pid>-... Returns what it removed."""
    removed = []

    def stale(name: str) -> bool:
        m = re.match(rf"{PREFIX}(\d+)-", name)
        return bool(m) and not _alive(int(m[1]))

    for line in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.splitlines():
        ns = line.split()[0] if line.split() else ""
        if stale(ns):
            _kill_all(_netns_pids(ns))
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            removed.append(f"netns {ns}")
    for c in CONTROLLERS:
        for parent, subdirs, _ in os.walk(CGROUPS / c):
            for d in [d for d in subdirs if stale(d)]:
                remove_cgroup_dirs([Path(parent) / d])
                removed.append(f"cgroup {c}/{Path(parent, d).relative_to(CGROUPS / c)}")
                subdirs.remove(d)
    return removed


def relay_binary() -> Path:
    """bench/out/relay-<hash of relay.c>, compiled on first use (and again when relay.c changes)."""
    src = RELAY_SRC.read_bytes()
    out = ROOT / "bench" / "out" / f"relay-{hashlib.sha256(src).hexdigest()[:12]}"
    if not out.exists():
        if not shutil.which("gcc"):
            raise RuntimeError("gcc is needed to build bench/relay.c: apt-get install gcc")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
        sh("gcc", "-O2", "-pthread", "-Wall", "-o", str(tmp), str(RELAY_SRC))
        os.replace(tmp, out)
    return out


class Relay:
    """bench/relay.c forwarding each LISTEN "addr:port" to its TARGET, `delay_ms` late each way.
    `start(run)` starts it through `run(cmd, **popen_kw)` (default: here, in this namespace)."""

    def __init__(self, delay_ms: float, mappings: list[tuple[str, str]]):
        self.delay_ms, self.mappings, self.proc = delay_ms, mappings, None

    def start(self, run=None, timeout: float = 10.0) -> "Relay":
        cmd = [str(relay_binary()), f"{self.delay_ms * 1000:g}", *(f"{a}={b}" for a, b in self.mappings)]
        self.proc = (run or subprocess.Popen)(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                              stdin=subprocess.DEVNULL)
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready or self.proc.stdout.readline() != b"ready\n":
            self.stop()
            raise RuntimeError(f"the relay did not start: {self.proc.stderr.read().decode().strip()}")
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)

    def __enter__(self) -> "Relay":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


def _raise_exit(signum, frame):
    raise SystemExit(128 + signum)


class Lan:
    """Emulated hosts: a network namespace and cgroups each, on one bridge, links capped by HTB.

        with Lan(["client", "w1", "w2"], rate="200mbit", cpus={"w1": 0.25}) as lan:
            lan.ip("w1") -> "10.77.0.3"; lan.run("w1", [...]) -> Popen inside that host

    `cpus` (cores) and `mem` (bytes) map host names to caps; hosts not named are uncapped. run()
    puts the process in the host's cgroups and network namespace; every process started through
    it is stopped on exit."""

    def __init__(self, hosts: list[str], rate: str = "1gbit", subnet: str = "10.77.0",
                 cpus: dict | None = None, mem: dict | None = None, period_us: int | None = None):
        if len(hosts) > 250:
            raise ValueError(f"{len(hosts)} hosts: at most 250 fit the /24 subnet")
        self.id = f"{PREFIX}{os.getpid()}-{next(_runs)}"
        self.hosts, self.rate, self.subnet = hosts, rate, subnet
        self.sw = f"{self.id}-sw"
        self.ns = {h: f"{self.id}-{h}" for h in hosts}
        self.cg = {h: Cgroup(self.ns[h], (cpus or {}).get(h), (mem or {}).get(h), period_us)
                   for h in hosts}
        self.procs: list[subprocess.Popen] = []
        self._signals = {}

    def ip(self, host: str) -> str:
        return f"{self.subnet}.{self.hosts.index(host) + 2}"

    def _cap(self, ns: str, dev: str) -> None:
        sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "handle", "1:",
           "htb", "default", "10")
        sh("ip", "netns", "exec", ns, "tc", "class", "add", "dev", dev, "parent", "1:", "classid",
           "1:10", "htb", "rate", self.rate, "ceil", self.rate)

    def __enter__(self) -> "Lan":
        need_root()
        if not shutil.which("setpriv"):
            raise RuntimeError("setpriv (util-linux) is needed: apt-get install util-linux")
        if threading.current_thread() is threading.main_thread():
            self._signals = {signal.SIGTERM: signal.signal(signal.SIGTERM, _raise_exit)}
        try:
            cleanup_stale()
            sh("ip", "netns", "add", self.sw)
            sh("ip", "-n", self.sw, "link", "add", "br0", "type", "bridge")
            sh("ip", "-n", self.sw, "link", "set", "br0", "up")
            for i, h in enumerate(self.hosts):
                ns, port = self.ns[h], f"p{i}"
                sh("ip", "netns", "add", ns)
                sh("ip", "-n", ns, "link", "set", "lo", "up")
                # made inside the namespaces: no half-built veth is ever left in this one
                sh("ip", "-n", self.sw, "link", "add", port, "type", "veth", "peer", "name", "eth0",
                   "netns", ns)
                sh("ip", "-n", self.sw, "link", "set", port, "master", "br0", "up")
                sh("ip", "-n", ns, "addr", "add", f"{self.ip(h)}/24", "dev", "eth0")
                sh("ip", "-n", ns, "link", "set", "eth0", "up")
                self._cap(ns, "eth0")           # what the host sends
                self._cap(self.sw, port)        # what it receives
                self.cg[h].create()
        except BaseException:
            self.__exit__()
            raise
        return self

    def run(self, host: str, cmd: list[str], cgroup: bool = True, **kw) -> subprocess.Popen:
        """Start cmd on host (in its cgroups unless cgroup=False). It runs in its own session, so
        a Ctrl-C reaches only this process, which then stops everything in order; setpriv makes
        it get SIGTERM if this process dies without cleaning up."""
        # nsenter --net, not `ip netns exec`: that also mounts a fresh /sys, which hides
        # /sys/fs/cgroup, and the client and workers read their memory cgroup's limit there
        cmd = ["setpriv", "--pdeathsig", "TERM", "nsenter", f"--net=/var/run/netns/{self.ns[host]}",
               *map(str, cmd)]
        kw.setdefault("stdin", subprocess.DEVNULL)
        p = subprocess.Popen(self.cg[host].wrap(cmd) if cgroup else cmd, start_new_session=True, **kw)
        self.procs.append(p)
        return p

    def tc_stats(self, host: str) -> str:
        return subprocess.run(["ip", "netns", "exec", self.ns[host], "tc", "-s", "class", "show",
                               "dev", "eth0"], capture_output=True, text=True).stdout

    def peak_memory(self, host: str) -> int:
        return self.cg[host].peak_memory()

    def cpu_seconds(self, host: str) -> float:
        return self.cg[host].cpu_seconds()

    def __exit__(self, *exc) -> None:
        main = threading.current_thread() is threading.main_thread()
        held = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
        try:
            for p in self.procs:
                if p.poll() is None:
                    p.terminate()
            deadline = time.time() + 10
            for p in self.procs:
                try:
                    p.wait(timeout=max(0.1, deadline - time.time()))
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            for ns in list(self.ns.values()) + [self.sw]:
                _kill_all(_netns_pids(ns))
                subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            for cg in self.cg.values():
                cg.remove()
        finally:
            for s, h in {**held, **self._signals}.items():
                signal.signal(s, h)
            self._signals = {}


class Cluster:
    """Workers on capped emulated hosts, the client on one more, a delay relay between them.

    cpus: cores per worker host (None = uncapped); mem: bytes per worker host (one value for all,
    or a list); client_cpu / client_mem cap the client's host. The relay runs outside every cap."""

    def __init__(self, cpus: list[float | None], mem=None, rate: str = "1gbit", delay_ms: float = 0.1,
                 client_cpu: float | None = None, client_mem: int | None = None, threads: int = 1,
                 period_us: int | None = None, base_port: int = 7000, ready_timeout: float = 900,
                 worker_args: list[str] = ()):
        n = len(cpus)
        mems = list(mem) if isinstance(mem, (list, tuple)) else [mem] * n
        self.workers = [f"w{i}" for i in range(n)]
        self.ports = [base_port + 2 * i for i in range(n)]
        self.delay_ms, self.threads, self.ready_timeout = delay_ms, threads, ready_timeout
        self.worker_args = list(worker_args)
        self.lan = Lan(self.workers + ["client"], rate, cpus={**dict(zip(self.workers, cpus)),
                       "client": client_cpu}, mem={**dict(zip(self.workers, mems)),
                       "client": client_mem}, period_us=period_us)
        self.procs: list[subprocess.Popen] = []
        self.logs = None

    def __enter__(self) -> "Cluster":
        self.lan.__enter__()
        try:
            self.logs = Path(tempfile.mkdtemp(prefix=f"{self.lan.id}-logs-"))
            # the workers' slice caches and the client's upload manifests live (and die) with
            # this cluster: every run starts cold, and nothing piles up in ~/.cache
            self.env = {**os.environ, "TENSORLAN_CACHE": str(self.logs / "cache")}
            for h, p in zip(self.workers, self.ports):
                with open(self.logs / f"{h}.log", "w") as log:
                    # --insecure: the emulated LAN is private to this run
                    self.procs.append(self.lan.run(h, [WORKER, p, "--host", self.lan.ip(h), "--data-port",
                                                       p + 1, "--threads", self.threads, "--insecure",
                                                       *self.worker_args],
                                                   stdout=log, stderr=subprocess.STDOUT, env=self.env))
                self._wait_started(h, self.procs[-1])
            self.relay = Relay(self.delay_ms, [(f"127.0.0.1:{p + k}", f"{self.lan.ip(h)}:{p + k}")
                                               for h, p in zip(self.workers, self.ports) for k in (0, 1)])
            self.relay.start(lambda cmd, **kw: self.lan.run("client", cmd, cgroup=False, **kw))
            self._wait_ready()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _wait_started(self, host: str, proc: subprocess.Popen) -> None:
        """Until the worker has measured its speed and says it serves: workers start one after
        another, because two speed probes at once would share this machine's memory bus, which
        hosts of a real LAN do not. (A 0.5-core host that measured a quarter of its neighbour's
        speed in CI did so with sequential starts too: a busy neighbour outside the test, which
        the probe, timing each 2 MB matrix at its best of 9, now rides out; see
        quant.q8_0.measure_speed.)"""
        t = time.time()
        while "serving on" not in self.log(host):
            if proc.poll() is not None:
                raise RuntimeError(f"worker {host} exited ({proc.returncode}) while starting:\n"
                                   f"{self.log(host)[-2000:]}")
            if time.time() - t > self.ready_timeout:
                raise RuntimeError(f"worker {host} did not start in {self.ready_timeout} s:\n"
                                   f"{self.log(host)[-2000:]}")
            time.sleep(0.1)

    def _wait_ready(self) -> None:
        """Hello through the relay from the client's host (tests/cluster_util.wait_ready), while
        watching that no worker died."""
        addrs = [f"127.0.0.1:{p}" for p in self.ports]
        probe = self.lan.run("client", [PYTHON, "-m", "bench.lan", "wait", "--timeout",
                                        self.ready_timeout, *addrs], cgroup=False, cwd=ROOT,
                             stderr=subprocess.PIPE, text=True)
        while probe.poll() is None:
            for h, w in zip(self.workers, self.procs):
                if w.poll() is not None:
                    raise RuntimeError(f"worker {h} exited ({w.returncode}) while starting:\n"
                                       f"{self.log(h)[-2000:]}")
            time.sleep(0.2)
        if probe.returncode:
            raise RuntimeError(f"the workers did not answer: {probe.stderr.read().strip()}\n"
                               + "\n".join(f"{h}: {self.log(h)[-500:]}" for h in self.workers))

    def log(self, host: str) -> str:
        """What worker `host` printed so far."""
        return (self.logs / f"{host}.log").read_text()

    def workers_arg(self, weights: list[float] | None = None) -> str:
        """The client's --workers value: every worker through the relay, optionally `*weight`."""
        return ",".join(f"127.0.0.1:{p}" + (f"*{w:g}" if weights else "")
                        for p, w in zip(self.ports, weights or [None] * len(self.ports)))

    def run_client(self, args: list[str], timeout: float = 900) -> subprocess.CompletedProcess:
        """bin/client ARGS on the client's host (its cgroups), through the relay."""
        p = self.lan.run("client", [CLIENT, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=self.env)
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
        return subprocess.CompletedProcess(p.args, p.returncode, out, err)

    def peak_memory(self, host: str) -> int:
        return self.lan.peak_memory(host)

    def cpu_seconds(self, host: str) -> float:
        return self.lan.cpu_seconds(host)

    def ping_us(self, delay_ms: float, n: int = 200, size: int = 64) -> tuple[list[float], list[float]]:
        """TCP ping-pong round trips (us) from the client's host to an echo server on w0, outside
        the CPU caps: directly, and through a relay that adds delay_ms each way."""
        ip, port = self.lan.ip("w0"), self.ports[-1] + 100
        echo = self.lan.run("w0", [PYTHON, "-m", "bench.lan", "echo", ip, port], cgroup=False,
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)
        relay = None
        try:
            if echo.stdout.readline() != "ready\n":
                raise RuntimeError("the echo server did not start")
            relay = Relay(delay_ms, [(f"127.0.0.1:{port + 1}", f"{ip}:{port}")])
            relay.start(lambda cmd, **kw: self.lan.run("client", cmd, cgroup=False, **kw))

            def ping(addr):
                out = self.lan.run("client", [PYTHON, "-m", "bench.lan", "ping", addr, n, size],
                                   cgroup=False, cwd=ROOT, stdout=subprocess.PIPE, text=True)
                return json.loads(out.communicate(timeout=60 + n * delay_ms / 100)[0])

            return ping(f"{ip}:{port}"), ping(f"127.0.0.1:{port + 1}")
        finally:
            if relay:
                relay.stop()
            echo.terminate()
            echo.wait()

    def relay_overhead_us(self, n: int = 500) -> float:
        """What the relay itself adds to a round trip at zero delay: median through it minus
        median direct, in us."""
        direct, relayed = self.ping_us(0.0, n)
        return statistics.median(relayed) - statistics.median(direct)

    def round_trip_us(self, delay_ms: float | None = None, n: int = 50) -> list[float]:
        """Round trips (us) through a relay at delay_ms (default: this cluster's delay)."""
        return self.ping_us(self.delay_ms if delay_ms is None else delay_ms, n)[1]

    def __exit__(self, *exc) -> None:
        try:
            self.lan.__exit__(*exc)
        finally:
            if self.logs:
                shutil.rmtree(self.logs, ignore_errors=True)


def echo_server(host: str, port: int) -> None:
    """Echo every byte back, one connection at a time, until killed."""
    with socket.create_server((host, port)) as srv:
        print("ready", flush=True)
        while True:
            conn, _ = srv.accept()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with conn:
                while data := conn.recv(65536):
                    conn.sendall(data)


def ping(addr: str, n: int, size: int) -> list[float]:
    """n round trips of `size` bytes to an echo server, in us (after 10 unrecorded ones)."""
    host, port = addr.rsplit(":", 1)
    msg, out = os.urandom(size), []
    with socket.create_connection((host, int(port))) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(n + 10):
            t = time.perf_counter()
            s.sendall(msg)
            got = 0
            while got < size:
                got += len(s.recv(size - got))
            if i >= 10:
                out.append((time.perf_counter() - t) * 1e6)
    return out


@click.group()
def main():
    """Helpers of the emulated LAN (bench/lan.py)."""


@main.command()
def cleanup():
    """Remove namespaces, cgroups and their processes left by runs that died (needs root)."""
    need_root()
    for r in cleanup_stale():
        print(f"removed {r}")


@main.command("wait")
@click.argument("addrs", nargs=-1)
@click.option("--timeout", default=600.0)
def wait_cmd(addrs, timeout):
    """Wait until each worker at ADDRS answers Hello."""
    sys.path.insert(0, str(ROOT / "tests"))
    from cluster_util import wait_ready
    t = time.time()
    for a in addrs:
        wait_ready(a, timeout=max(1.0, timeout - (time.time() - t)))


@main.command("echo")
@click.argument("host")
@click.argument("port", type=int)
def echo_cmd(host, port):
    """Serve TCP echo on HOST:PORT."""
    echo_server(host, port)


@main.command("ping")
@click.argument("addr")
@click.argument("n", type=int)
@click.argument("size", type=int)
def ping_cmd(addr, n, size):
    """Print N round-trip times (us) of SIZE bytes to the echo server at ADDR as JSON."""
    print(json.dumps(ping(addr, n, size)))


if __name__ == "__main__":
    main()
