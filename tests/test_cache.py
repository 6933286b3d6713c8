"""Weights cached on workers: a reconnecting client sends hashes, not tensors; the cache is
bounded (least recently used first), survives a worker restart, and a damaged file is caught."""
import hashlib
import os
import time

import grpc
import numpy as np
import pytest

from cluster_util import Workers
from conftest import STORIES
from client.generate import generate
from client.model import Model
from proto import tensorlan_pb2 as pb
from proto import tensorlan_pb2_grpc as rpc
from worker.cache import TensorCache

pytestmark = pytest.mark.slow


def _greedy(model, n=20):
    return generate(model, model.tokenizer.encode("Once upon a time"), n).new_ids


def test_reconnect_sends_hashes_only_and_survives_a_restart(tmp_path):
    want = _greedy(Model.load(STORIES))
    cache = tmp_path / "slices"
    w = Workers(1, extra=["--cache-dir", str(cache)])
    try:
        first = Model.load(STORIES, workers=[(w.addrs[0], None)], local=False)
        assert first.remote[0].uploaded_bytes > 0 and _greedy(first) == want
        again = Model.load(STORIES, workers=[(w.addrs[0], None)], local=False)
        assert again.remote[0].uploaded_bytes == 0 and _greedy(again) == want
        forced = Model.load(STORIES, workers=[(w.addrs[0], None)], local=False, cache=False)
        assert forced.remote[0].uploaded_bytes == first.remote[0].uploaded_bytes
    finally:
        w.stop()
    w = Workers(1, extra=["--cache-dir", str(cache)])   # a new process: from disk
    try:
        m = Model.load(STORIES, workers=[(w.addrs[0], None)], local=False)
        assert m.remote[0].uploaded_bytes == 0 and _greedy(m) == want
        # a damaged file is noticed, dropped and sent again
        for p in cache.iterdir():
            data = bytearray(p.read_bytes())
            data[0] ^= 1
            p.write_bytes(bytes(data))
    finally:
        w.stop()
    w = Workers(1, extra=["--cache-dir", str(cache)])
    try:
        m = Model.load(STORIES, workers=[(w.addrs[0], None)], local=False)
        assert m.remote[0].uploaded_bytes == first.remote[0].uploaded_bytes and _greedy(m) == want
    finally:
        logs = w.stop()
    assert "damaged" in logs[0]


def test_no_cache_worker_keeps_nothing_on_disk(tmp_path):
    w = Workers(1, extra=["--cache-dir", str(tmp_path / "c"), "--no-cache"])
    try:
        Model.load(STORIES, workers=[(w.addrs[0], None)], local=False)
        m = Model.load(STORIES, workers=[(w.addrs[0], None)], local=False)
        assert m.remote[0].uploaded_bytes == 0  # the same process still holds them in memory
    finally:
        w.stop()
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())


def test_cache_is_bounded_least_recently_used_first(tmp_path):
    c = TensorCache(tmp_path, limit_bytes=2500)
    bufs = [np.full(1000, i, np.uint8) for i in range(4)]
    keys = [hashlib.sha256(b).digest() for b in bufs]
    for k, b in zip(keys[:2], bufs[:2]):
        c.put(k, b)
        time.sleep(0.01)
    os.utime(tmp_path / keys[0].hex())          # key 0 used again: key 1 is now the oldest
    c.put(keys[2], bufs[2])
    names = {p.name for p in tmp_path.iterdir()}
    assert names == {keys[0].hex(), keys[2].hex()} and c.disk_bytes() <= 2500
    c.resident.clear()
    assert np.array_equal(c.get(keys[0], 1000), bufs[0])
    assert c.get(keys[1], 1000) is None and not c.has(keys[1])
    big = np.zeros(3000, np.uint8)               # larger than the whole cache: kept in memory only
    c.put(hashlib.sha256(big).digest(), big)
    assert c.disk_bytes() <= 2500


def test_bad_uploads_get_a_status_and_the_worker_goes_on(tmp_path):
    w = Workers(1, extra=["--cache-dir", str(tmp_path)])
    try:
        stub = rpc.WorkerStub(grpc.insecure_channel(w.addrs[0]))
        header = pb.UploadHeader(config_json=(STORIES / "config.json").read_text(), head_end=8,
                                 unit_end=172, row_end=512, total_bytes=40000)
        cases = [
            ([pb.UploadChunk(header=header),   # a tensor not held, announced as cached
              pb.UploadChunk(tensor=pb.TensorInfo(name="classifier", dtype="q8_0", shape=[512, 64],
                                                  nbytes=512 * 68, sha256=bytes(32), cached=True))],
             grpc.StatusCode.FAILED_PRECONDITION, "not cached"),
            ([pb.UploadChunk(header=header),   # more than the header announced
              pb.UploadChunk(tensor=pb.TensorInfo(name="classifier", dtype="f32", shape=[512, 64],
                                                  nbytes=512 * 64 * 4, sha256=bytes(32)))],
             grpc.StatusCode.INVALID_ARGUMENT, "beyond"),
            ([pb.UploadChunk(header=header),   # bytes that do not match their checksum
              pb.UploadChunk(tensor=pb.TensorInfo(name="layers.0.wdown", dtype="q8_0", shape=[64, 172],
                                                  nbytes=64 * 204, sha256=bytes(32))),
              pb.UploadChunk(data=bytes(64 * 204))], grpc.StatusCode.INVALID_ARGUMENT, "checksum"),
            ([pb.UploadChunk(header=header),   # a tensor the shard does not have
              pb.UploadChunk(tensor=pb.TensorInfo(name="x", dtype="f32", shape=[2, 4], nbytes=32,
                                                  sha256=bytes(32)))], grpc.StatusCode.INVALID_ARGUMENT,
             "not one of the shard's"),
            ([pb.UploadChunk(header=pb.UploadHeader(config_json="{}", total_bytes=1 << 62))],
             grpc.StatusCode.RESOURCE_EXHAUSTED, "the shard needs"),
        ]
        for chunks, code, why in cases:
            with pytest.raises(grpc.RpcError) as e:
                stub.Upload(iter(chunks), timeout=30)
            assert e.value.code() == code and why in e.value.details(), e.value.details()
        assert list(stub.Have(pb.HaveRequest(sha256=[bytes(32)]), timeout=10).have) == [False]
        m = Model.load(STORIES, workers=[(w.addrs[0], None)], local=False)   # still serving
        assert _greedy(m, 5) == _greedy(Model.load(STORIES), 5)
    finally:
        w.stop()


def test_idle_shards_leave_memory_but_not_the_disk_cache(tmp_path):
    """A worker serving plan after plan keeps only the two newest idle shards in memory; an
    older plan comes back from its disk cache, still without an upload."""
    want = _greedy(Model.load(STORIES), 8)
    w = Workers(1, extra=["--cache-dir", str(tmp_path)])
    try:
        for weights in ([1.0, 1.0], [1.0, 2.0], [1.0, 3.0], [1.0, 1.0]):
            m = Model.load(STORIES, workers=[(w.addrs[0], None)], weights=weights)
            assert _greedy(m, 8) == want
            m.remote[0].close()
        assert m.remote[0].uploaded_bytes == 0   # the first plan again: from the disk cache
    finally:
        logs = w.stop()
    assert logs[0].count("dropped from memory (idle)") >= 1


def test_the_manifest_is_per_slice_merged_and_bounded(tmp_path, monkeypatch):
    """What the client remembers having sent is keyed by slice (tensor and range), whatever the
    plan: uploads add to it, the newest last, the oldest dropped past MANIFEST_ENTRIES."""
    from client import cluster
    from client.slices import Shard, slice_key
    monkeypatch.setattr(cluster, "MANIFEST_ENTRIES", 3)
    info = lambda i: pb.TensorInfo(name=f"t{i}", dtype="q8_0", shape=[1, 32], nbytes=34,  # noqa: E731
                                   sha256=bytes([i]) * 32)
    path = tmp_path / "manifest.json"
    cluster.add_to_manifest(path, {"a": info(1), "b": info(2)})
    cluster.add_to_manifest(path, {"c": info(3), "a": info(4)})   # a sent again: now the newest
    cluster.add_to_manifest(path, {"d": info(5)})                 # b, the oldest, goes
    m = cluster.read_manifest(path)
    assert list(m) == ["c", "a", "d"] and m["a"].sha256 == bytes([4]) * 32 and m["d"].name == "t5"
    path.write_text("[1, 2]")
    assert cluster.read_manifest(path) == {}
    sh = Shard((0, 4), (64, 128), (10, 20))
    assert [slice_key(n, sh) for n in ("layers.3.wqkv", "layers.3.wo", "layers.0.wgu", "layers.0.wdown",
                                       "classifier")] == [
        "layers.3.wqkv[0:4]", "layers.3.wo[0:4]", "layers.0.wgu[64:128]", "layers.0.wdown[64:128]",
        "classifier[10:20]"]


def test_an_upload_retried_after_an_eviction_counts_its_bytes_once_on_a_shared_bar():
    """A worker that evicted a slice between Have and Upload answers FAILED_PRECONDITION, and the
    client sends everything again: on the bar several uploads share, that retry's bytes replace
    the failed attempt's instead of adding to them."""
    from client.cluster import RemoteNode
    from client.progress import Progress
    from client.slices import Shard

    class Evicted(grpc.RpcError):
        def code(self):
            return grpc.StatusCode.FAILED_PRECONDITION

        def details(self):
            return "not cached"

    class Stub:  # Have: "held"; the second Upload (hashes) finds it evicted after every chunk
        uploads = 0

        def Have(self, req, timeout, metadata):
            return pb.HaveReply(have=[True] * len(req.sha256))

        def Upload(self, chunks, timeout, metadata):
            Stub.uploads += 1
            list(chunks)
            if Stub.uploads == 2:
                raise Evicted()
            return pb.UploadReply(slice_set_id="s", bytes_received=1)

    loaders = [(f"t{i}", lambda i=i: np.full((4, 32), i + 1, np.float32)) for i in range(3)]
    node = RemoteNode("127.0.0.1:1")
    node.stub = Stub()
    first = node.upload(Shard((0, 1), (0, 64), (0, 4)), loaders, "{}", 1, None)
    total = sum(t.nbytes for t in first)
    bar = Progress(total, "test")
    infos = node.upload(Shard((0, 1), (0, 64), (0, 4)), loaders, "{}", total, first, bar)
    assert Stub.uploads == 3 and [t.sha256 for t in infos] == [t.sha256 for t in first]
    assert bar.done == total
