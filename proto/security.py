"""Who may use a worker, and how both channels are protected: the shared token, TLS files, and
the refusal to serve an open network unprotected.

    token = resolve_token(token, token_file)        --token / --token-file / $TENSORLAN_TOKEN
    token_ok(token, presented)                      constant-time comparison
    ClientTLS(ca, cert, key).grpc_credentials()     the client's side of both channels
    ServerTLS(cert, key, client_ca).ssl_context()   the worker's
    check_bind(host, token, client_ca, insecure)    no unprotected worker on a LAN address

gRPC calls carry the token as `authorization: Bearer TOKEN` metadata; the step channel carries
it in the first StepRequest of each connection. Without TLS it travels in clear.
"""
from __future__ import annotations

import hmac
import ipaddress
import os
import ssl
from pathlib import Path

from client.errors import UserError

TOKEN_ENV = "TENSORLAN_TOKEN"


def resolve_token(token: str | None, token_file: Path | None) -> str | None:
    """The token from --token, else --token-file, else $TENSORLAN_TOKEN; None if none is set."""
    if token and token_file:
        raise UserError("give --token or --token-file, not both")
    source = "--token"
    if token_file:
        try:
            token = Path(token_file).read_text().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"--token-file {token_file}: cannot read it ({getattr(e, 'strerror', None) or e}); "
                            "give a readable file holding the token")
        source = f"--token-file {token_file}"
        if not token:
            raise UserError(f"{source}: the file is empty; write the token into it")
    elif not token:
        token, source = os.environ.get(TOKEN_ENV) or None, f"${TOKEN_ENV}"
    if token is not None and not (token.isascii() and token.isprintable() and " " not in token):
        raise UserError(f"{source}: the token must be printable ASCII without spaces "
                        "(e.g. `openssl rand -hex 32`)")
    return token


def bearer(token: str | None) -> tuple | None:
    """gRPC call metadata carrying the token, or None."""
    return (("authorization", f"Bearer {token}"),) if token else None


def token_ok(token: str | None, presented: str) -> bool:
    """Does `presented` (a StepRequest.token, or an authorization header's value after
    "Bearer ") match? Always, when the worker has no token. Constant time in the contents."""
    if token is None:
        return True
    return hmac.compare_digest(token.encode(), presented.encode("utf-8", "replace"))


def _read(flag: str, path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot read it ({e.strerror or e}); give the PEM file's path")


class ClientTLS:
    """The client's TLS files: the CA that signed the workers' certificates and, for workers
    that require client certificates (mutual TLS), this client's certificate and key."""

    def __init__(self, ca: Path, cert: Path | None = None, key: Path | None = None):
        if bool(cert) != bool(key):
            raise UserError("--tls-cert and --tls-key go together (a client certificate and its key)")
        self.ca = _read("--tls-ca", ca)
        self.cert = _read("--tls-cert", cert) if cert else None
        self.key = _read("--tls-key", key) if key else None
        try:  # this CA only, not the system's
            self.context = ssl.create_default_context(cafile=str(ca))
        except ssl.SSLError as e:
            raise UserError(f"--tls-ca {ca}: not a PEM certificate ({e.reason or e})")
        if cert:
            _load_chain(self.context, cert, key)

    def grpc_credentials(self):
        import grpc
        return grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.key,
                                            certificate_chain=self.cert)

    def wrap(self, sock, host: str):
        """The step channel's socket, after the TLS handshake (which checks the worker's
        certificate against `host`)."""
        return self.context.wrap_socket(sock, server_hostname=host)


class ServerTLS:
    """The worker's certificate and key and, if given, the CA whose client certificates it
    requires (mutual TLS: a client without one is refused in the handshake)."""

    def __init__(self, cert: Path, key: Path, client_ca: Path | None = None):
        self.cert, self.key = _read("--tls-cert", cert), _read("--tls-key", key)
        self.client_ca = _read("--tls-client-ca", client_ca) if client_ca else None
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        _load_chain(self.context, cert, key)
        if client_ca:
            try:
                self.context.load_verify_locations(cafile=str(client_ca))
            except ssl.SSLError as e:
                raise UserError(f"--tls-client-ca {client_ca}: not a PEM certificate ({e.reason or e})")
            self.context.verify_mode = ssl.CERT_REQUIRED

    def grpc_credentials(self):
        import grpc
        return grpc.ssl_server_credentials([(self.key, self.cert)], root_certificates=self.client_ca,
                                           require_client_auth=self.client_ca is not None)


def _load_chain(context: ssl.SSLContext, cert: Path, key: Path) -> None:
    try:
        context.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as e:
        raise UserError(f"--tls-cert {cert} / --tls-key {key}: not a PEM certificate and its private "
                        f"key ({getattr(e, 'reason', None) or e})")


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost: reachable from this machine only."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None, client_ca, insecure: bool) -> None:
    """A worker on an address other machines can reach needs a token or client certificates,
    unless --insecure says that anyone who reaches it may use it."""
    if is_loopback(host) or token or client_ca or insecure:
        return
    raise UserError(f"--host {host}: other machines can reach this address and this worker has no "
                    f"token: give one (--token-file FILE, --token T or ${TOKEN_ENV}; the clients "
                    "need the same), require client certificates (--tls-client-ca), or pass "
                    "--insecure to let anyone who reaches the port use it")
