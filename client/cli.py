"""bin/client: generate text or score perplexity with a LLaMA model.

    bin/client generate MODEL_DIR -i PROMPT -n N      (or the shorthand: bin/client MODEL_DIR ...)
    bin/client perplexity MODEL_DIR TEXT_FILE
    bin/client serve MODEL_DIR [--host H --port P]   (an OpenAI-compatible HTTP API)
"""
from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path

import click

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # before grpc loads: errors are our one line
from client.errors import UserError  # noqa: E402


def _fail(msg: str) -> None:
    click.echo(f"error: {msg}", err=True)
    sys.exit(2)


class _DefaultGenerate(click.Group):
    """`bin/client MODEL_DIR ...` means `bin/client generate MODEL_DIR ...`."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["generate"] + list(args)
        return super().parse_args(ctx, args)


@click.group(cls=_DefaultGenerate, context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """tensorlan: LLaMA-family inference on the CPU, cut into tensor-parallel slices.

    MODEL_DIR is a Hugging Face model folder: config.json, model.safetensors (or sharded with
    model.safetensors.index.json; f32, f16 or bf16) and tokenizer.model. `bin/client MODEL_DIR
    -i PROMPT` is short for `bin/client generate MODEL_DIR -i PROMPT`."""


def _model_options(f):
    f = click.option("--weights", type=click.Choice(["q8_0", "f32"]), default="q8_0",
                     show_default=True, help="q8_0: llama.cpp's 8-bit blocks; f32: the "
                     "checkpoint's values in float32 (the accuracy baseline, 4x the memory).")(f)
    f = click.option("--kv-dtype", type=click.Choice(["bf16", "f32"]), default="bf16",
                     show_default=True, help="Storage type of the key/value cache.")(f)
    f = click.option("--threads", type=click.IntRange(min=1), default=None,
                     help="Compute threads (default: all cores, or no more than a CPU quota allows, rounded up).")(f)
    f = click.option("--ctx", type=click.IntRange(min=2), default=None,
                     help="Context length to allocate the KV cache for (default: the model's).")(f)
    f = click.option("--workers", default="", metavar="HOST:PORT[*W],...",
                     help="Workers (`bin/worker PORT` on each machine) to spread the model over; "
                     "*W weighs a node's share (default: each node's measured speed).")(f)
    f = click.option("--cluster", "cluster_file", type=click.Path(path_type=Path), default=None,
                     help="A TOML file of [[worker]] tables (address = \"host:port\", weight = W).")(f)
    f = click.option("--no-local", is_flag=True,
                     help="Compute nothing in this process: the workers hold every slice.")(f)
    f = click.option("--wire", type=click.Choice(["f64", "f32", "bf16", "q8_0"]), default="f32",
                     show_default=True, help="How activations and partial sums travel to and from "
                     "workers: f64 partials give the in-process output bit for bit; q8_0 (llama.cpp's "
                     "8-bit blocks) is 3.8x smaller than f32, for slow links.")(f)
    f = click.option("--no-cache", is_flag=True,
                     help="Send workers every slice again, even those they still hold from an "
                     "earlier run with the same model and plan (by default only hashes go).")(f)
    f = click.option("--on-worker-loss", type=click.Choice(["replan", "fail"]), default="replan",
                     show_default=True,
                     help="A worker that dies or stops answering (each step has a deadline): replan "
                     "= warn once, split the model over the nodes left, rebuild the lost KV caches "
                     "by replaying the tokens so far, and go on (same output); fail = stop with "
                     "an error.")(f)
    f = click.option("--token", default=None, help="The cluster's shared secret, sent to the "
                     "workers (and, for `serve`, required from HTTP clients as `Authorization: "
                     "Bearer TOKEN`); default: $TENSORLAN_TOKEN. It shows in `ps`: prefer "
                     "--token-file or the variable.")(f)
    f = click.option("--token-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
                     help="A file holding the token.")(f)
    f = click.option("--tls-ca", type=click.Path(dir_okay=False, path_type=Path), default=None,
                     help="Talk TLS to the workers, trusting the certificates this CA (PEM) signed.")(f)
    f = click.option("--tls-cert", type=click.Path(dir_okay=False, path_type=Path), default=None,
                     help="This client's certificate (PEM), for workers that require one (--tls-client-ca).")(f)
    f = click.option("--tls-key", type=click.Path(dir_okay=False, path_type=Path), default=None,
                     help="The client certificate's private key (PEM).")(f)
    f = click.option("--perf-csv", type=click.Path(path_type=Path), default=None,
                     help="Write one row per call to a worker (token, layer, block, worker, rows, "
                     "bytes, compute and round-trip us) to this CSV file.")(f)
    return f


def _workers(workers: str, cluster_file) -> list:
    from client.cluster import load_cluster_file, parse_workers
    out = parse_workers(workers) if workers else []
    if cluster_file:
        out += load_cluster_file(cluster_file)
    return out


def _load(model_dir, weights, kv_dtype, threads, ctx, workers, cluster_file, no_local, no_cache, wire,
          on_worker_loss, token=None, token_file=None, tls_ca=None, tls_cert=None, tls_key=None,
          quiet=False, slots=1, **_):
    from client.host import default_threads
    from client.model import Model
    from client.progress import Progress
    from proto.security import ClientTLS, resolve_token
    from quant.q8_0 import max_threads, set_threads

    if threads and threads > max_threads():
        raise UserError(f"--threads {threads}: at most {max_threads()} here; set "
                        f"NUMBA_NUM_THREADS={threads} in the environment to allow more")
    set_threads(threads or default_threads())
    if (tls_cert or tls_key) and not tls_ca:
        raise UserError("--tls-cert and --tls-key need --tls-ca (the CA of the workers' certificates)")
    token = resolve_token(token, token_file)
    tls = ClientTLS(tls_ca, tls_cert, tls_key) if tls_ca else None
    bar = None

    def progress(done, total):
        nonlocal bar
        bar = bar or Progress(total, "quantizing", " tensors")
        bar.update(done)

    model = Model.load(model_dir, fmt=weights, kv_dtype=kv_dtype, ctx=ctx,
                       progress=None if quiet else progress, workers=_workers(workers, cluster_file),
                       local=not no_local, cache=not no_cache, wire=wire, on_loss=on_worker_loss,
                       slots=slots, token=token, tls=tls)
    if bar:
        bar.close()
    return model


def _check_prompt(model_dir: Path, prompt: str, ctx: int | None) -> None:
    from client.config import LlamaConfig
    from client.tokenizer import Tokenizer

    limit = min(ctx or 1 << 62, LlamaConfig.load(model_dir).max_seq_len)
    n = len(Tokenizer(model_dir).encode(prompt))
    if n >= limit:
        raise UserError(f"the prompt is {n} tokens; the context is {limit}: shorten the prompt"
                        + (" (or raise --ctx up to the model's maximum)" if ctx else ""))


def _print_memory(model) -> None:
    from client.host import human_bytes as _human
    rows = model.memory_table()
    out = [f"{'layer type':<22} {'quant':<6} {'memory':>11} {'params':>14} {'bytes/param':>11}"]
    for kind, q, b, p in rows:
        bpp = f"{b / p:.3f}" if p else "-"
        out.append(f"{kind:<22} {q:<6} {_human(b):>11} {p:>14,} {bpp:>11}")
    tb, tp = sum(r[2] for r in rows), sum(r[3] for r in rows)
    out.append(f"{'total':<22} {'':<6} {_human(tb):>11} {tp:>14,}")
    click.echo("\n".join(out), err=True)


@main.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("-i", "--prompt", default="", help="The prompt (BOS is added as Hugging Face does).")
@click.option("-n", "n_tokens", type=int, default=64, show_default=True,
              help="Number of tokens to generate (stops early at EOS or the context end).")
@click.option("--temperature", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="0 = greedy (argmax); higher = more random.")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0,
              show_default=True, help="Nucleus sampling: keep the most likely tokens up to this mass.")
@click.option("--seed", type=int, default=None, help="Random seed for sampling.")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object (ids, text, speeds) on stdout instead of streaming.")
@_model_options
def generate(model_dir, prompt, n_tokens, temperature, top_p, seed, as_json, **opts):
    """Generate text after PROMPT, streaming it (prompt included) to stdout.

    Speed and memory go to stderr: load time, a memory-by-layer-type table, prompt tok/s,
    generation tok/s and ms/token."""
    try:
        from client.generate import generate as run
        from client.tokenizer import StreamDecoder

        if n_tokens < 1:
            raise UserError(f"-n {n_tokens}: the number of tokens to generate must be at least 1")
        _check_prompt(model_dir, prompt, opts["ctx"])  # before the (long) load
        model = _load(model_dir, **opts)
        click.echo(f"loaded {model_dir} in {model.load_seconds:.2f} s", err=True)
        _print_memory(model)
        from client.profile import print_nodes, print_pings, write_perf_csv
        print_nodes(model)
        print_pings(model)
        ids = model.tokenizer.encode(prompt)
        stream = None if as_json else StreamDecoder(model.tokenizer, ids)
        if stream:
            sys.stdout.write(model.tokenizer.decode(ids))
            sys.stdout.flush()

        def on_token(tok):
            if stream:
                sys.stdout.write(stream.push([tok]))
                sys.stdout.flush()

        res = run(model, ids, n_tokens, temperature, top_p, seed, on_token)
        if stream:
            sys.stdout.write(stream.flush() + "\n")
        ms = 1000 / res.gen_tok_s if res.gen_tok_s else 0.0
        from client.profile import print_calls, rpc_line
        print_calls(model)
        click.echo(f"prompt: {len(ids)} tokens, {res.prompt_tok_s:.2f} tok/s | generation: "
                   f"{len(res.new_ids)} tokens, {res.gen_tok_s:.2f} tok/s, {ms:.2f} ms/token"
                   + rpc_line(model), err=True)
        if opts["perf_csv"]:
            write_perf_csv(model, opts["perf_csv"])
        if as_json:
            click.echo(json.dumps({
                "prompt_ids": ids, "new_ids": res.new_ids,
                "text": model.tokenizer.decode(ids + res.new_ids),
                "prompt_tok_s": res.prompt_tok_s, "gen_tok_s": res.gen_tok_s,
                "ms_per_token": ms, "load_seconds": model.load_seconds,
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
    except UserError as e:
        _fail(str(e))


@main.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.argument("text_file", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print {perplexity, n_tokens} as JSON.")
@_model_options
def perplexity(model_dir, text_file, as_json, **opts):
    """Perplexity of BOS + TEXT_FILE's tokens (every token after BOS, one pass up to the
    context length)."""
    try:
        from client.generate import perplexity as ppl

        try:
            text = text_file.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{text_file}: cannot read it as UTF-8 text ({e})")
        model = _load(model_dir, quiet=as_json, **opts)
        ids = model.tokenizer.encode(text, bos=True)
        value, n = ppl(model, ids)
        if opts["perf_csv"]:
            from client.profile import write_perf_csv
            write_perf_csv(model, opts["perf_csv"])
        if as_json:
            click.echo(json.dumps({"perplexity": value, "n_tokens": n}))
        else:
            click.echo(f"perplexity {value:.4f} over {n} tokens ({opts['weights']} weights)")
    except UserError as e:
        _fail(str(e))


@main.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0: every interface; needs a token or --insecure).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--slots", type=click.IntRange(1, 31), default=8, show_default=True,
              help="Requests decoding together (each has its own KV cache of --ctx positions). "
              "At most 31: a request's output is then the same alone or batched.")
@click.option("--max-queue", type=click.IntRange(min=0), default=64, show_default=True,
              help="Requests that may wait for a free slot; beyond them the server answers 429.")
@click.option("--insecure", is_flag=True,
              help="Allow listening on a non-loopback address without a token.")
@_model_options
def serve(model_dir, host, port, slots, max_queue, insecure, **opts):
    """Serve MODEL_DIR over an OpenAI-compatible HTTP API at http://HOST:PORT/v1.

    GET /v1/models, POST /v1/completions, POST /v1/chat/completions (streaming with
    server-sent events; max_tokens, temperature, top_p, seed, stop, and vLLM's ignore_eos),
    GET /health. Concurrent requests decode together, one batched forward pass per token for
    all of them (continuous batching); --max-queue more wait for a slot, and beyond that
    requests get 429. Any model name is accepted. Stop with Ctrl-C or SIGTERM."""
    try:
        from proto.security import is_loopback, resolve_token

        # one token for the whole cluster: HTTP clients send it, and it reaches the workers
        token = resolve_token(opts["token"], opts["token_file"])
        if not token and not insecure and not is_loopback(host):
            raise UserError(f"--host {host} is reachable from other machines and no token is set: "
                            "give --token, --token-file or $TENSORLAN_TOKEN (or --insecure)")
        sock = _listen(host, port)
        model = _load(model_dir, slots=slots, **opts)
        click.echo(f"loaded {model_dir} in {model.load_seconds:.2f} s", err=True)
        _print_memory(model)
        from client.profile import print_nodes
        print_nodes(model)
        _serve(model, model_dir, sock, max_queue, token)
    except UserError as e:
        _fail(str(e))


def _listen(host: str, port: int):
    """Bind the port before the (long) load, so that a port in use fails at once."""
    import socket
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(info[0], socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(info[4])
        sock.listen(256)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror or e})")
    return sock


def _serve(model, model_dir: Path, sock, max_queue: int, token) -> None:
    import signal
    import threading

    import uvicorn

    from client.batch import Batcher
    from client.chat import ChatFormat
    from client.server import create_app

    chat = ChatFormat(model_dir, model.tokenizer)
    batcher = Batcher(model, max_queue, start=False)  # the engine runs below, in this thread
    name = Path(model_dir).resolve().name
    app = create_app(model, batcher, name, chat, token)
    host, port = sock.getsockname()[:2]
    url_host = f"[{host}]" if ":" in host else host
    workers = len(model.remote)
    click.echo(f"serving {name} on http://{url_host}:{port}/v1 ({model.slots} slots, queue "
               f"{max_queue}, ctx {model.ctx}, {workers} worker{'s' * (workers != 1)}, chat: "
               f"{chat.name}, {'token required' if token else 'no token'})", err=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=3,
                                           access_log=False))

    def http():
        try:
            server.run(sockets=[sock])
        finally:  # however uvicorn ends, the engine ends with it
            batcher.stop()

    web = threading.Thread(target=http, name="http", daemon=True)

    def stop(*_):  # SIGINT / SIGTERM: stop taking requests, end the engine (it fails what runs)
        server.should_exit = True
        batcher.stop()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    web.start()
    # the engine in the main thread, where the model was loaded: kernels called from a second
    # thread measured 20% slower (a second OpenMP thread team; see client/batch.py)
    batcher.run()
    server.should_exit = True
    web.join(timeout=10)
    click.echo("stopped", err=True)


if __name__ == "__main__":
    main()
