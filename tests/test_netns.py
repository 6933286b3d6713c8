"""The client and two workers on separate emulated hosts (network namespaces joined by veth on a
bridge, each link capped by HTB): the output equals the in-process output."""
import json
import subprocess

import pytest

from conftest import ROOT, STORIES
from bench.lan import Lan

pytestmark = pytest.mark.slow


def test_client_and_two_workers_on_separate_hosts():
    want = subprocess.run([str(ROOT / "bin/client"), str(STORIES), "-i", "Once upon a time", "-n",
                           "40", "--json"], capture_output=True, text=True, timeout=300)
    assert want.returncode == 0, want.stderr
    with Lan(["client", "w1", "w2"], rate="100mbit") as lan:
        procs = [lan.run(h, [str(ROOT / "bin/worker"), "7000", "--host", lan.ip(h), "--threads", "1",
                             "--insecure"],  # the emulated LAN is this test's own
                         stderr=subprocess.PIPE, text=True) for h in ("w1", "w2")]
        try:
            # the workers are reachable from the client's host only through the bridge
            for h in ("w1", "w2"):
                probe = lan.run("client", [str(ROOT / ".venv/bin/python"), "-c",
                                           f"import sys; sys.path.insert(0, {str(ROOT / 'tests')!r}); "
                                           f"sys.path.insert(0, {str(ROOT)!r}); from cluster_util "
                                           f"import wait_ready; wait_ready('{lan.ip(h)}:7000')"])
                assert probe.wait(timeout=90) == 0
            workers = f"{lan.ip('w1')}:7000*1,{lan.ip('w2')}:7000*2"
            got = lan.run("client", [str(ROOT / "bin/client"), str(STORIES), "-i", "Once upon a time",
                                     "-n", "40", "--json", "--workers", workers],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            out, err = got.communicate(timeout=300)
            assert got.returncode == 0, err
            assert json.loads(out)["new_ids"] == json.loads(want.stdout)["new_ids"]
            assert "10.77.0.3:7000" in err and "avg round trip" in err
            # the traffic went through the capped links
            assert "rate 100Mbit" in lan.tc_stats("w1") and "Sent 0 bytes" not in lan.tc_stats("w1")
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.communicate(timeout=30)
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert lan.id not in left  # nothing left behind
