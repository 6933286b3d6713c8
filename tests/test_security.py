"""Who may use a worker, over what, and how much: the token (gRPC and the step channel), TLS and
mutual TLS, the refusal to listen unprotected on a LAN address, the limits (upload size,
sessions, context, frames) and session expiry, and one clear line from the client for each."""
import json
import os
import socket
import subprocess
import threading
import time
from concurrent import futures

import grpc
import pytest

from cluster_util import Workers, free_port, make_certs
from conftest import ROOT, STORIES
from client.cluster import RemoteNode
from client.errors import UserError
from client.generate import generate
from client.model import Model
from client.checkpoint import Checkpoint
from client.slices import Shard, shard_nbytes, shard_tensors
from proto import tensorlan_pb2 as pb
from proto import tensorlan_pb2_grpc as rpc
from proto.security import ClientTLS, check_bind, resolve_token
from proto.wire import PROTOCOL_VERSION, FrameReader, pack_tensor, send_frame

CLIENT = str(ROOT / "bin" / "client")
TOKEN = "0123456789abcdef-test-token"
WRONG = (("authorization", "Bearer not-the-token"),)
RIGHT = (("authorization", f"Bearer {TOKEN}"),)


def _greedy(model, n=12):
    return generate(model, model.tokenizer.encode("Once upon a time"), n).new_ids


@pytest.fixture(scope="module")
def want():
    return _greedy(Model.load(STORIES))


def _client(*args, env=None):
    """bin/client generating 12 tokens with these extra arguments: (exit code, stdout, stderr)."""
    p = subprocess.run([CLIENT, str(STORIES), "-i", "Once upon a time", "-n", "12", "--json", *args],
                       capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})
    return p.returncode, p.stdout, p.stderr


def _one_error_line(code, err) -> str:
    lines = [l for l in err.splitlines() if l.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), err
    return lines[0]


def _step_channel(addr: str, stub) -> tuple[socket.socket, FrameReader]:
    info = stub.Hello(pb.HelloRequest(), timeout=10, metadata=RIGHT)
    s = socket.create_connection(("127.0.0.1", info.data_port), timeout=10)
    return s, FrameReader(s, spin=0)


def _ask(s, frames, req):
    send_frame(s, req)
    return frames.read(pb.StepReply)[0]


@pytest.mark.slow
def test_wrong_or_missing_token_is_refused_logged_once_and_the_right_one_works(tmp_path, want):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    w = Workers(1, extra=["--token-file", str(token_file)])
    try:
        stub = rpc.WorkerStub(grpc.insecure_channel(w.addrs[0]))
        header = pb.UploadChunk(header=pb.UploadHeader(config_json=(STORIES / "config.json").read_text(),
                                                       head_end=8, unit_end=172, row_end=512, total_bytes=10))
        calls = [lambda md: stub.Hello(pb.HelloRequest(), timeout=10, metadata=md),
                 lambda md: stub.Have(pb.HaveRequest(sha256=[bytes(32)]), timeout=10, metadata=md),
                 lambda md: stub.Ping(pb.PingRequest(payload=b"x"), timeout=10, metadata=md),
                 lambda md: stub.Upload(iter([header]), timeout=10, metadata=md),
                 lambda md: list(stub.Session(iter([pb.StepRequest(op=pb.PING)]), timeout=10, metadata=md))]
        for call in calls:
            for md in (None, WRONG, (("authorization", TOKEN),)):  # missing, wrong, not a Bearer
                with pytest.raises(grpc.RpcError) as e:
                    call(md)
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, e.value.details()
                assert "token" in e.value.details()
        # the step channel: the first frame must carry it; the refusal closes the connection
        for token in ("", "not-the-token"):
            s, frames = _step_channel(w.addrs[0], stub)
            rep = _ask(s, frames, pb.StepRequest(seq=7, op=pb.PING, x=b"abc", token=token))
            assert rep.seq == 7 and rep.error_code == grpc.StatusCode.UNAUTHENTICATED.value[0] and not rep.y
            assert frames.read(pb.StepReply) == (None, 0)
            s.close()
        s, frames = _step_channel(w.addrs[0], stub)   # right token: served, and later frames need none
        assert _ask(s, frames, pb.StepRequest(seq=1, op=pb.PING, x=b"abc", token=TOKEN)).y == b"abc"
        assert _ask(s, frames, pb.StepRequest(seq=2, op=pb.PING, x=b"def")).y == b"def"
        s.close()
        info = stub.Hello(pb.HelloRequest(), timeout=10, metadata=RIGHT)
        assert info.protocol_version == PROTOCOL_VERSION
        # refused calls did no work: no upload, no session
        log = w.log()
        assert "upload " not in log and log.count("started") == 1, log   # the right one only
        assert log.count("refused 127.0.0.1: wrong or missing token") == 1, log
        m = Model.load(STORIES, workers=[(w.addrs[0], 1.0)], local=False, token=TOKEN)
        assert _greedy(m) == want
        m.remote[0].close()
        with pytest.raises(UserError, match="refused this client: wrong or missing token"):
            Model.load(STORIES, workers=[(w.addrs[0], 1.0)], token="not-the-token")
        code, out, err = _client("--workers", f"{w.addrs[0]}*1", env={"TENSORLAN_TOKEN": TOKEN})
        assert code == 0, err
        assert json.loads(out)["new_ids"] == want
        line = _one_error_line(*_client("--workers", f"{w.addrs[0]}*1", "--token", "nope")[::2])
        assert "wrong or missing token" in line and "--token" in line
    finally:
        logs = w.stop()
    assert "Traceback" not in logs[0]


@pytest.mark.slow
def test_tls_round_trip_and_one_line_for_a_mismatch(tmp_path, want):
    c = make_certs(tmp_path)
    creds = grpc.ssl_channel_credentials(c["ca"].read_bytes())
    w = Workers(1, extra=["--tls-cert", str(c["server_cert"]), "--tls-key", str(c["server_key"])],
                credentials=creds)
    plain = Workers(1)
    try:
        m = Model.load(STORIES, workers=[(w.addrs[0], 1.0)], tls=ClientTLS(c["ca"]))
        assert _greedy(m) == want
        assert m.remote[0].sock.version().startswith("TLS")     # the step channel is TLS too
        m.remote[0].close()
        line = _one_error_line(*_client("--workers", f"{w.addrs[0]}*1")[::2])
        assert w.addrs[0] in line and "TLS" in line and "--tls-ca" in line
        line = _one_error_line(*_client("--workers", f"{plain.addrs[0]}*1", "--tls-ca", c["ca"])[::2])
        assert "TLS handshake failed" in line and "both sides need TLS, or neither" in line
        line = _one_error_line(*_client("--workers", f"{w.addrs[0]}*1", "--tls-ca", c["other_ca"])[::2])
        assert "TLS handshake failed" in line
        line = _one_error_line(*_client("--workers", f"{w.addrs[0]}*1", "--tls-ca", tmp_path / "nope.pem")[::2])
        assert "--tls-ca" in line and "nope.pem" in line
        # a plaintext step-channel client gets no session: the handshake fails, the worker goes on
        info = rpc.WorkerStub(grpc.secure_channel(w.addrs[0], creds)).Hello(pb.HelloRequest(), timeout=10)
        s = socket.create_connection(("127.0.0.1", info.data_port), timeout=10)
        send_frame(s, pb.StepRequest(op=pb.PING, x=b"abc"))
        assert _closed(s)
        assert _greedy(Model.load(STORIES, workers=[(w.addrs[0], 1.0)], tls=ClientTLS(c["ca"]))) == want
    finally:
        logs = w.stop() + plain.stop()
    assert not any("Traceback" in log for log in logs)


@pytest.mark.slow
def test_mutual_tls(tmp_path, want):
    c = make_certs(tmp_path)
    creds = grpc.ssl_channel_credentials(c["ca"].read_bytes(), c["client_key"].read_bytes(),
                                         c["client_cert"].read_bytes())
    w = Workers(1, host="0.0.0.0", credentials=creds,    # client certificates protect a LAN address
                extra=["--tls-cert", str(c["server_cert"]), "--tls-key", str(c["server_key"]),
                       "--tls-client-ca", str(c["ca"])])
    addr = w.addrs[0]
    try:
        tls = ClientTLS(c["ca"], c["client_cert"], c["client_key"])
        assert _greedy(Model.load(STORIES, workers=[(addr, 1.0)], tls=tls)) == want
        line = _one_error_line(*_client("--workers", f"{addr}*1", "--tls-ca", c["ca"])[::2])
        assert "TLS handshake failed" in line
        line = _one_error_line(*_client("--workers", f"{addr}*1", "--tls-ca", c["ca"], "--tls-cert",
                                        c["client_cert"])[::2])
        assert "--tls-key" in line
    finally:
        w.stop()


def test_non_loopback_bind_needs_a_token_client_certificates_or_insecure():
    port = free_port()
    p = subprocess.run([str(ROOT / "bin" / "worker"), str(port), "--host", "0.0.0.0"],
                       capture_output=True, text=True, timeout=60)
    line = _one_error_line(p.returncode, p.stderr)
    assert "--host 0.0.0.0" in line and "--token-file" in line and "--insecure" in line
    for host in ("127.0.0.1", "127.3.2.1", "::1", "[::1]", "localhost"):
        check_bind(host, None, None, False)
    for args in (("10.0.0.2", "t", None, False), ("0.0.0.0", None, b"CA", False), ("::", None, None, True)):
        check_bind(*args)
    with pytest.raises(UserError, match="--insecure"):
        check_bind("192.168.1.5", None, None, False)


@pytest.mark.slow
def test_insecure_flag_allows_a_non_loopback_bind():
    w = Workers(1, host="0.0.0.0", extra=["--insecure"])
    logs = w.stop()
    assert "serving on 0.0.0.0" in logs[0] and "token none" in logs[0]


def test_token_sources(tmp_path, monkeypatch):
    monkeypatch.delenv("TENSORLAN_TOKEN", raising=False)
    assert resolve_token(None, None) is None
    monkeypatch.setenv("TENSORLAN_TOKEN", "from-env")
    assert resolve_token(None, None) == "from-env"
    assert resolve_token("given", None) == "given"
    f = tmp_path / "t"
    f.write_text("  from-file\n")
    assert resolve_token(None, f) == "from-file"
    for token, path, why in [("a", f, "not both"), (None, tmp_path / "none", "cannot read"),
                             ("has space", None, "printable ASCII")]:
        with pytest.raises(UserError, match=why):
            resolve_token(token, path)
    f.write_text("\n")
    with pytest.raises(UserError, match="empty"):
        resolve_token(None, f)


@pytest.fixture(scope="module")
def limited():
    """A worker with a token and small limits: 2 sessions idle at most 3 s, ctx 256, messages
    of 2 MB, 100 MB for shards and KV caches (stories260K takes 0.3 MB; the client keeps 64 MB
    of a node's memory for its runtime)."""
    w = Workers(1, extra=["--token", TOKEN, "--max-sessions", "2", "--session-timeout", "3",
                          "--max-ctx", "256", "--max-message-mb", "2", "--max-memory", "0.1",
                          "--no-cache"])
    w.stub = rpc.WorkerStub(grpc.insecure_channel(w.addrs[0]))
    yield w
    logs = w.stop()
    assert "Traceback" not in logs[0]


def _hello(w, want_sessions=None, wait=10.0):
    """The worker's Hello, once its open sessions number `want_sessions` (if given)."""
    t = time.monotonic()
    while True:
        h = w.stub.Hello(pb.HelloRequest(), timeout=10, metadata=RIGHT)
        if want_sessions is None or h.sessions == want_sessions or time.monotonic() - t > wait:
            return h
        time.sleep(0.1)


def _closed(s: socket.socket) -> bool:
    """Does the peer close `s` within 10 s (whatever it sends first, e.g. a TLS alert)?"""
    s.settimeout(10)
    try:
        while s.recv(4096):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    finally:
        s.close()


@pytest.mark.slow
def test_session_expiry_frees_the_kv_caches(limited, want):
    m = Model.load(STORIES, workers=[(limited.addrs[0], 1.0)], local=False, token=TOKEN, ctx=256)
    kv = (shard_nbytes(m.cfg, m.remote[0].shard, "f32", 256, "bf16")
          - shard_nbytes(m.cfg, m.remote[0].shard, "f32"))
    h = _hello(limited, 1)
    assert (h.sessions, h.session_bytes) == (1, kv) and kv > 0
    # a gRPC Session stream counts, and expires, too
    done = threading.Event()

    def requests():
        yield pb.StepRequest(seq=1, op=pb.OPEN, slice_set_id=m.remote[0].slice_set_id, ctx=128,
                             kv_dtype="bf16")
        done.wait(30)   # then idle

    stream = limited.stub.Session(requests(), timeout=30, metadata=RIGHT)
    try:
        assert next(stream).error_code == 0
        h = _hello(limited)
        assert (h.sessions, h.session_bytes) == (2, kv + kv // 2)
        t = time.monotonic()
        h = _hello(limited, 0)
        assert (h.sessions, h.session_bytes) == (0, 0) and 2.5 < time.monotonic() - t < 8
        with pytest.raises(grpc.RpcError) as e:
            next(stream)
        assert e.value.code() == grpc.StatusCode.CANCELLED
    finally:
        done.set()
    # the client whose session expired opens a new one (the worker still holds its shard) and
    # replays its tokens: the generation goes on, the same
    assert _greedy(m) == want
    assert limited.log().count("session from 127.0.0.1 expired after 3 s idle: KV caches freed") == 2
    m2 = Model.load(STORIES, workers=[(limited.addrs[0], 1.0)], local=False, token=TOKEN, ctx=256)
    assert _greedy(m2) == want       # a new session is served
    m2.remote[0].close()
    assert _hello(limited, 0).sessions == 0


@pytest.mark.slow
def test_a_stalled_upload_expires_and_gives_back_its_memory(limited):
    room = _hello(limited).memory_bytes
    cfg = Model.load(STORIES).cfg
    whole = Shard.whole(cfg)
    total = shard_nbytes(cfg, whole)
    info, parts = pack_tensor("layers.0.wqkv", shard_tensors(Checkpoint(STORIES), cfg, whole)[0][1]())
    stalled = threading.Event()

    def chunks():
        yield pb.UploadChunk(header=pb.UploadHeader(config_json=(STORIES / "config.json").read_text(),
                                                    head_end=cfg.n_heads, unit_end=cfg.ffn_dim,
                                                    row_end=cfg.vocab_size, total_bytes=total))
        yield pb.UploadChunk(tensor=info)
        yield pb.UploadChunk(data=bytes(parts[0][:100]))
        stalled.wait(30)   # and nothing more

    call = limited.stub.Upload.future(chunks(), timeout=30, metadata=RIGHT)
    try:
        time.sleep(1)
        assert _hello(limited).memory_bytes == room - total      # reserved for it
        t = time.monotonic()
        with pytest.raises(grpc.RpcError) as e:
            call.result(timeout=10)
        assert e.value.code() == grpc.StatusCode.CANCELLED and 1.5 < time.monotonic() - t < 5
    finally:
        stalled.set()
    assert _hello(limited).memory_bytes == room
    assert "upload session from 127.0.0.1 expired after 3 s idle" in limited.log()


@pytest.mark.slow
def test_max_sessions_and_message_size(limited):
    assert _hello(limited, 0).sessions == 0
    open_ = [_step_channel(limited.addrs[0], limited.stub) for _ in range(2)]
    for s, frames in open_:
        assert _ask(s, frames, pb.StepRequest(op=pb.PING, x=b"a", token=TOKEN)).y == b"a"
    s, frames = _step_channel(limited.addrs[0], limited.stub)    # a third: refused, closed
    rep = frames.read(pb.StepReply)[0]
    assert rep.error_code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0] and "--max-sessions" in rep.error
    assert frames.read(pb.StepReply) == (None, 0)
    with pytest.raises(grpc.RpcError) as e:
        list(limited.stub.Session(iter([pb.StepRequest(op=pb.PING)]), timeout=10, metadata=RIGHT))
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-sessions" in e.value.details()
    s0, f0 = open_[0]
    s0.sendall((3 << 20).to_bytes(4, "little") + b"\0" * 100)      # a 3 MB frame > 2 MB
    rep = f0.read(pb.StepReply)[0]
    assert rep.error_code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0] and "exceeds" in rep.error
    assert _closed(s0)
    with pytest.raises(grpc.RpcError) as e:                          # gRPC: the same 2 MB
        limited.stub.Ping(pb.PingRequest(payload=bytes(3 << 20)), timeout=10, metadata=RIGHT)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert _hello(limited, 1).sessions == 1
    s, frames = _step_channel(limited.addrs[0], limited.stub)     # a slot is free again
    assert _ask(s, frames, pb.StepRequest(op=pb.PING, x=b"b", token=TOKEN)).y == b"b"
    for sock in (s, open_[1][0]):
        sock.close()


@pytest.mark.slow
def test_ctx_and_memory_limits(limited):
    with pytest.raises(UserError, match="exceeds this worker's --max-ctx 256"):
        Model.load(STORIES, workers=[(limited.addrs[0], 1.0)], local=False, token=TOKEN, ctx=512)
    # an upload announcing more than the worker may hold is refused before any tensor arrives,
    # with the sizes and the fix
    cfg = Model.load(STORIES).cfg
    whole = Shard.whole(cfg)
    node = RemoteNode(limited.addrs[0], token=TOKEN)
    node.hello()
    assert node.info.memory_bytes <= 100_000_000       # what it offers the client's plan
    with pytest.raises(UserError) as e:
        node.upload(whole, shard_tensors(Checkpoint(STORIES), cfg, whole), (STORIES / "config.json").read_text(),
                    200_000_000)
    msg = str(e.value)
    assert ("refused the upload: the shard needs 190.73 MiB, this worker has" in msg
            and "--max-memory 95.37 MiB" in msg), msg
    node.close()


def test_version_mismatch_is_one_line_naming_both_versions():
    class Old(rpc.WorkerServicer):
        def Hello(self, request, context):
            return pb.HelloReply(protocol_version=PROTOCOL_VERSION - 1, worker_id="old")

    server = grpc.server(futures.ThreadPoolExecutor(2))
    rpc.add_WorkerServicer_to_server(Old(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        line = _one_error_line(*_client("--workers", f"127.0.0.1:{port}")[::2])
    finally:
        server.stop(0)
    assert f"speaks protocol {PROTOCOL_VERSION - 1}, this client {PROTOCOL_VERSION}" in line
    assert "run the same tensorlan version on both" in line


def test_unreachable_worker_is_one_line():
    line = _one_error_line(*_client("--workers", f"127.0.0.1:{free_port()}")[::2])
    assert "unreachable" in line and "bin/worker PORT" in line


def test_gate_checks_the_token_parses_and_turns_a_bug_into_internal():
    """worker/gate.py in front of a servicer: no token, no call; bytes that are not the message:
    INVALID_ARGUMENT before the servicer sees them; an exception it did not turn into a status:
    INTERNAL (logged), and the server goes on."""
    from worker.gate import Gate

    class Servicer:
        calls = []

        def Hello(self, request, context):
            self.calls.append(request.client)
            if request.client == "boom":
                raise RuntimeError("a bug")
            return pb.HelloReply(worker_id=request.client)

        def Session(self, requests, context):
            for r in requests:
                yield pb.StepReply(seq=r.seq)

        Have = Ping = Upload = None

    server = grpc.server(futures.ThreadPoolExecutor(2))
    server.add_generic_rpc_handlers((Gate(TOKEN).handler(Servicer()),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        hello = grpc.insecure_channel(f"127.0.0.1:{port}").unary_unary("/tensorlan.Worker/Hello")
        assert pb.HelloReply.FromString(hello(pb.HelloRequest(client="a").SerializeToString(),
                                              metadata=RIGHT, timeout=10)).worker_id == "a"
        for raw, md, code in [(pb.HelloRequest(client="b").SerializeToString(), WRONG, "UNAUTHENTICATED"),
                              (b"\xff\xff\xff", RIGHT, "INVALID_ARGUMENT"),
                              (pb.HelloRequest(client="boom").SerializeToString(), RIGHT, "INTERNAL")]:
            with pytest.raises(grpc.RpcError) as e:
                hello(raw, metadata=md, timeout=10)
            assert e.value.code().name == code, e.value.details()
        assert "RuntimeError: a bug" in e.value.details()
        assert Servicer.calls == ["a", "boom"]
        session = grpc.insecure_channel(f"127.0.0.1:{port}").stream_stream("/tensorlan.Worker/Session")
        replies = session(iter([pb.StepRequest(seq=1).SerializeToString(), b"\x08"]), metadata=RIGHT, timeout=10)
        assert pb.StepReply.FromString(next(replies)).seq == 1
        with pytest.raises(grpc.RpcError) as e:       # the second message is cut short
            next(replies)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        server.stop(0)
