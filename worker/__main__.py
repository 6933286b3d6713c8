"""bin/worker PORT [--host H] [--threads N] [--data-port P] [--cache-dir D] [--cache-size GB] [--no-cache]
    [--token T | --token-file F] [--tls-cert F --tls-key F [--tls-client-ca F]] [--insecure]
    [--max-message-mb N] [--max-sessions N] [--max-ctx N] [--max-memory GB] [--session-timeout S]"""
import logging
import os
import sys
from pathlib import Path

import click

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # before grpc loads: not a line per failed TLS handshake
from client.errors import UserError  # noqa: E402


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("port", type=click.IntRange(1, 65534))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0 for every interface: needs a token, client "
                   "certificates or --insecure).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Compute threads (default: all cores, or no more than a CPU quota allows, rounded up).")
@click.option("--data-port", type=click.IntRange(1, 65535), default=None,
              help="TCP port of the step channel (default: PORT + 1).")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where received slices are kept, by content hash, so a client that reconnects "
                   "sends only hashes [default: $TENSORLAN_CACHE/slices or ~/.cache/tensorlan/slices].")
@click.option("--cache-size", type=click.FloatRange(min=0), default=20.0, show_default=True,
              help="Cache size bound in GB; the least recently used slices are evicted first.")
@click.option("--no-cache", is_flag=True, help="Keep received slices in memory only.")
@click.option("--token", default=None, help="Shared secret every client call must carry (default: "
              "$TENSORLAN_TOKEN). It shows in `ps`: prefer --token-file or the variable.")
@click.option("--token-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="A file holding the token.")
@click.option("--tls-cert", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="This worker's certificate (PEM): TLS on both channels. Needs --tls-key.")
@click.option("--tls-key", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The certificate's private key (PEM).")
@click.option("--tls-client-ca", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Require client certificates signed by this CA (mutual TLS).")
@click.option("--insecure", is_flag=True,
              help="Listen on a non-loopback --host with neither a token nor client certificates: "
                   "anyone who reaches the port can use this worker.")
@click.option("--max-message-mb", type=click.IntRange(2, 2047), default=64, show_default=True,
              help="Largest gRPC message or step-channel frame accepted or sent, in MB (at least 2: "
                   "clients upload in 1 MB chunks).")
@click.option("--max-sessions", type=click.IntRange(min=1), default=16, show_default=True,
              help="Sessions (clients' step channels and Session streams) served at once.")
@click.option("--max-ctx", type=click.IntRange(min=1), default=32768, show_default=True,
              help="Longest KV cache a session may open, in positions.")
@click.option("--max-memory", type=click.FloatRange(min=0, min_open=True), default=None,
              help="GB that shards and KV caches may take [default: the memory available].")
@click.option("--session-timeout", type=click.FloatRange(min=0, min_open=True), default=600.0,
              show_default=True, help="Seconds after which an idle session expires: its KV caches "
                                      "are freed, its connection closed.")
def main(port, host, threads, data_port, cache_dir, cache_size, no_cache, token, token_file, tls_cert,
         tls_key, tls_client_ca, insecure, max_message_mb, max_sessions, max_ctx, max_memory,
         session_timeout):
    """Serve slices of LLaMA models to tensorlan clients until SIGINT or SIGTERM.

    Needs no model files: the client pushes each worker its slices (and, with the cache, only
    once per model and plan)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    from proto.security import ServerTLS, resolve_token
    from worker.cache import default_cache_dir
    from worker.server import Limits, serve
    try:
        if bool(tls_cert) != bool(tls_key) or (tls_client_ca and not tls_cert):
            raise UserError("TLS needs --tls-cert and --tls-key together (and --tls-client-ca only with them)")
        limits = Limits(max_message_mb << 20, max_sessions, max_ctx,
                        None if max_memory is None else int(max_memory * 1e9), session_timeout)
        serve(port, host, data_port, threads, None if no_cache else (cache_dir or default_cache_dir()),
              int(cache_size * 1e9), limits, resolve_token(token, token_file),
              ServerTLS(tls_cert, tls_key, tls_client_ca) if tls_cert else None, insecure)
    except UserError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except OSError as e:
        click.echo(f"error: cannot listen on {host}:{data_port or port + 1}: {e.strerror}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
