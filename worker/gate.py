"""Every gRPC call to a worker passes one gate before the servicer sees it: the token, then the
message parse, then a last guard against worker bugs.

    server.add_generic_rpc_handlers((Gate(token).handler(worker),))

gRPC's generated registration parses requests itself and answers bytes that do not parse with
INTERNAL; here the handlers take the raw bytes, so that a call without the right token is
refused before anything of it is parsed (UNAUTHENTICATED, logged once per client address), a
malformed message gets INVALID_ARGUMENT (stream messages as they are read), and an exception
the servicer did not turn into a status gets INTERNAL with its traceback in the log, instead of
gRPC's UNKNOWN. The step channel checks its connections' first frame with the same Gate.
"""
from __future__ import annotations

import logging
import threading

import grpc

from proto import tensorlan_pb2 as pb
from proto.security import token_ok
from proto.wire import WireError, parse

log = logging.getLogger("tensorlan.worker")
SERVICE = "tensorlan.Worker"
MAX_LOGGED = 4096   # refused addresses remembered for log-once


def _serialize(msg) -> bytes:
    return msg.SerializeToString()


class Gate:
    def __init__(self, token: str | None):
        self.token = token
        self.refused: set[str] = set()
        self.lock = threading.Lock()

    def allows(self, presented: str, peer: str) -> bool:
        """Is `presented` the token? If not, log the refusal (once per address)."""
        if token_ok(self.token, presented):
            return True
        with self.lock:
            first = peer not in self.refused and len(self.refused) < MAX_LOGGED
            if first:
                self.refused.add(peer)
        if first:
            log.warning("refused %s: wrong or missing token (UNAUTHENTICATED; logged once per address)", peer)
        return False

    def check(self, context) -> None:
        """Abort the call with UNAUTHENTICATED unless its metadata carries the token."""
        if self.token is None:
            return
        auth = dict(context.invocation_metadata()).get("authorization", "")
        presented = auth[7:] if auth.startswith("Bearer ") else ""
        if not self.allows(presented, peer_host(context.peer())):
            context.abort(grpc.StatusCode.UNAUTHENTICATED,
                          "wrong or missing token: give the worker's token (--token, --token-file "
                          "or $TENSORLAN_TOKEN)")

    def handler(self, worker) -> grpc.GenericRpcHandler:
        """The service's handlers: each checks the token, parses, then calls `worker`."""
        unary = {"Hello": pb.HelloRequest, "Have": pb.HaveRequest, "Ping": pb.PingRequest}
        methods = {name: grpc.unary_unary_rpc_method_handler(
            self._unary(getattr(worker, name), cls), response_serializer=_serialize)
            for name, cls in unary.items()}
        methods["Upload"] = grpc.stream_unary_rpc_method_handler(
            self._stream_in(worker.Upload, pb.UploadChunk), response_serializer=_serialize)
        methods["Session"] = grpc.stream_stream_rpc_method_handler(
            self._stream_out(worker.Session, pb.StepRequest), response_serializer=_serialize)
        return grpc.method_handlers_generic_handler(SERVICE, methods)

    def _unary(self, method, cls):
        def call(raw: bytes, context):
            self.check(context)
            with guard(context):
                return method(parse_or_abort(cls, raw, context), context)
        return call

    def _stream_in(self, method, cls):
        def call(raw_iterator, context):
            self.check(context)
            with guard(context):
                return method((parse_or_abort(cls, raw, context) for raw in raw_iterator), context)
        return call

    def _stream_out(self, method, cls):
        def call(raw_iterator, context):
            self.check(context)
            with guard(context):
                yield from method((parse_or_abort(cls, raw, context) for raw in raw_iterator), context)
        return call


def parse_or_abort(cls, raw: bytes, context):
    try:
        return parse(cls, raw)
    except WireError as e:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))


class guard:
    """Turns an exception that is not already a status (context.abort, a cancelled call) into
    INTERNAL, with the traceback logged: the worker goes on serving either way."""

    def __init__(self, context):
        self.context = context

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        already_a_status = (self.context.code() is not None or isinstance(exc, grpc.RpcError)
                            or not self.context.is_active())
        if not isinstance(exc, Exception) or already_a_status:
            return False
        log.error("worker error (answered INTERNAL)", exc_info=(kind, exc, tb))
        self.context.abort(grpc.StatusCode.INTERNAL, f"worker error: {kind.__name__}: {exc}")


def peer_host(peer: str) -> str:
    """'ipv4:10.0.0.2:5000' / 'ipv6:[::1]:5000' -> '10.0.0.2' / '::1'."""
    addr = peer.partition(":")[2] or peer
    return addr.rpartition(":")[0].strip("[]") or addr
