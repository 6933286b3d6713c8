"""bin/worker PORT [--host H] [--threads N] [--data-port P]"""
import logging
import sys

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
def main(port, host, threads, data_port):
    """Serve slices of LLaMA models to tensorlan clients until SIGINT or SIGTERM.

    Needs no model files: the client pushes each worker its slices."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    from worker.server import serve
    try:
        serve(port, host, data_port, threads)
    except UserError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except OSError as e:
        click.echo(f"error: cannot listen on {host}:{data_port or port + 1}: {e.strerror}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
