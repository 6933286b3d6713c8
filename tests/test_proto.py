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


def test_wire_formats_round_trip_as_the_reference_rounds():
    """Activations and partial sums on the wire: f64 and f32 exact casts, bf16 round to nearest
    even, q8_0 llama.cpp's blocks (checked against the independent references)."""
    import numpy as np
    import pytest
    from reference import bf16_round_ref, q8_0_roundtrip_ref
    from proto.wire import WireError, decode, encode

    rng = np.random.default_rng(3)
    a = (rng.standard_normal((3, 96)) * np.array([1e-3, 1.0, 40.0])[:, None]).astype(np.float64)
    for wire, want, size in [("f64", a, 3 * 96 * 8),
                             ("f32", a.astype(np.float32), 3 * 96 * 4),
                             ("bf16", bf16_round_ref(a.astype(np.float32)), 3 * 96 * 2),
                             ("q8_0", q8_0_roundtrip_ref(a), 3 * 3 * 34)]:
        b = encode(a, wire)
        assert len(b) == size, wire
        got = decode(b, 3, 96, wire)
        assert got.shape == (3, 96)
        assert np.array_equal(got.astype(np.float64), np.asarray(want, np.float64)), wire
        with pytest.raises(WireError):
            decode(b[:-1], 3, 96, wire)
    with pytest.raises(WireError):
        decode(b"", 0, 96, "f32")


def test_frame_reader_grows_its_buffer_as_bytes_arrive():
    """A header announcing 60 MB and then a few bytes costs a few MB, not 60 (however many
    connections send one); small and large frames still read whole; over the limit: refused
    from the header alone."""
    import socket
    import threading
    import tracemalloc

    import pytest
    from proto import tensorlan_pb2 as pb
    from proto.wire import FrameReader, FrameTooLarge, WireError, send_frame

    a, b = socket.socketpair()
    try:
        tracemalloc.start()
        b.sendall((60 << 20).to_bytes(4, "little") + b"x" * 1000)
        b.shutdown(socket.SHUT_WR)
        with pytest.raises(WireError, match="closed mid-frame"):
            FrameReader(a, spin=0, max_frame=64 << 20).read_raw()
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 4 << 20, peak
    finally:
        a.close(), b.close()
    a, b = socket.socketpair()
    try:
        big = pb.StepRequest(seq=5, x=bytes(range(256)) * (12 << 10))   # 3 MB: grown in steps
        sender = threading.Thread(target=lambda: [send_frame(b, m) for m in (pb.StepRequest(seq=1), big)])
        sender.start()
        frames = FrameReader(a, spin=0.001, max_frame=4 << 20)
        assert frames.read(pb.StepRequest)[0].seq == 1
        got = frames.read(pb.StepRequest)[0]
        assert got.seq == 5 and got.x == big.x
        sender.join()
        b.sendall((5 << 20).to_bytes(4, "little"))
        with pytest.raises(FrameTooLarge):
            frames.read(pb.StepRequest)
    finally:
        a.close(), b.close()
