"""bin/worker PORT [--host H] [--threads N] [--data-port P] [--cache-dir D] [--cache-size GB] [--no-cache]"""
import logging
import sys
from pathlib import Path

import click

from client.errors import UserError


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("port", type=click.IntRange(1, 65534))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0 for every interface).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Compute threads (default: all cores).")
@click.option("--data-port", type=click.IntRange(1, 65535), default=None,
              help="TCP port of the step channel (default: PORT + 1).")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where received slices are kept, by content hash, so a client that reconnects "
                   "sends only hashes [default: $TENSORLAN_CACHE/slices or ~/.cache/tensorlan/slices].")
@click.option("--cache-size", type=click.FloatRange(min=0), default=20.0, show_default=True,
              help="Cache size bound in GB; the least recently used slices are evicted first.")
@click.option("--no-cache", is_flag=True, help="Keep received slices in memory only.")
def main(port, host, threads, data_port, cache_dir, cache_size, no_cache):
    """Serve slices of LLaMA models to tensorlan clients until SIGINT or SIGTERM.

    Needs no model files: the client pushes each worker its slices (and, with the cache, only
    once per model and plan)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    from worker.cache import default_cache_dir
    from worker.server import serve
    try:
        serve(port, host, data_port, threads, None if no_cache else (cache_dir or default_cache_dir()),
              int(cache_size * 1e9))
    except UserError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except OSError as e:
        click.echo(f"error: cannot listen on {host}:{data_port or port + 1}: {e.strerror}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
