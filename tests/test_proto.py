"""The committed gRPC stubs are what proto/tensorlan.proto generates today."""
import shutil
import subprocess
import sys

from conftest import ROOT


def test_stubs_are_current(tmp_path):
    (tmp_path / "proto").mkdir()
    shutil.copy(ROOT / "proto" / "tensorlan.proto", tmp_path / "proto")
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I.", "--python_out=.",
                    "--grpc_python_out=.", "proto/tensorlan.proto"], cwd=tmp_path, check=True)
    for f in ("tensorlan_pb2.py", "tensorlan_pb2_grpc.py"):
        assert (tmp_path / "proto" / f).read_text() == (ROOT / "proto" / f).read_text(), (
            f"proto/{f} is stale: regenerate with `.venv/bin/python -m grpc_tools.protoc -I. "
            "--python_out=. --grpc_python_out=. proto/tensorlan.proto`")
