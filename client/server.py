"""An OpenAI-compatible HTTP API over the batching engine (FastAPI; run by `bin/client serve`).

    GET  /v1/models             the one model served
    POST /v1/completions        prompt -> text (stream: server-sent events)
    POST /v1/chat/completions   messages -> the assistant's reply (the model's chat template)
    GET  /health                status, active and queued requests, slots, workers (no token)

Errors have OpenAI's shape, {"error": {"message", "type", "param", "code"}}: 400 for a bad
request, 401 for a missing or wrong token, 404 for an unknown path, 429 when the queue is full,
500 when the engine failed.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Literal, Union

from fastapi import Depends, FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from proto.security import token_ok
from client.batch import QueueFull, Request
from client.chat import ChatError


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


# ---- request bodies (unknown fields are ignored, as OpenAI's clients send many) ----

class StreamOptions(BaseModel):
    include_usage: bool = False


class Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    stop: Union[str, list[str], None] = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1)
    ignore_eos: bool = False         # not OpenAI's (vLLM's): generate exactly max_tokens


class CompletionBody(Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    logprobs: int | None = None
    echo: bool | None = False


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[dict], None] = None


class ChatBody(Sampling):
    messages: list[Message]
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False


# ---- the app ----

def create_app(model, batcher, name: str, chat, token: str | None = None) -> FastAPI:
    app = FastAPI(title="tensorlan", docs_url=None, redoc_url=None, openapi_url=None)
    tok = model.tokenizer

    async def authorize(request: HTTPRequest) -> None:
        if token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token_ok(token, given.strip()):
            raise APIError(401, "a valid token is needed: send the header Authorization: Bearer "
                           "<token> (the server's --token)", "authentication_error",
                           code="invalid_api_key")

    @app.exception_handler(APIError)
    async def api_error(_, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_, e: RequestValidationError):
        err = e.errors()[0]
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        if err.get("type") == "json_invalid":
            param = None
            msg = f"the body is not valid JSON ({err.get('ctx', {}).get('error', err['msg'])})"
        elif not loc:
            msg = "the body must be a JSON object"
        else:
            msg = f"{param}: {err['msg']}"
        return JSONResponse(APIError(400, msg, param=param).body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(_, e: HTTPException):
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(e.status_code, "invalid_request_error")
        return JSONResponse(APIError(e.status_code, str(e.detail), kind).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def crashed(_, e: Exception):
        return JSONResponse(APIError(500, f"{type(e).__name__}: {e}", "server_error").body(),
                            status_code=500)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name, **batcher.stats(), "ctx": model.ctx,
                "workers": [n.addr for n in model.remote], "lost": list(model.lost)}

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0,
                                            "owned_by": "tensorlan"}]}

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(body: CompletionBody, request: HTTPRequest):
        if body.logprobs is not None:
            raise APIError(400, "logprobs is not supported", param="logprobs")
        if body.echo:
            raise APIError(400, "echo is not supported", param="echo")
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise APIError(400, f"prompt: a list of {len(prompt)} prompts; this server takes one "
                               "prompt per request (send them as concurrent requests: they are "
                               "batched together)", param="prompt")
            prompt = prompt[0]
        ids = tok.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if any(not 0 <= i < model.cfg.vocab_size for i in ids):
            raise APIError(400, f"prompt: token ids must be in 0..{model.cfg.vocab_size - 1}",
                           param="prompt")
        return await serve(body, ids, request, chat=False)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(body: ChatBody, request: HTTPRequest):
        if body.logprobs:
            raise APIError(400, "logprobs is not supported", param="logprobs")
        messages = [{"role": "system" if m.role == "developer" else m.role,
                     "content": _text(m.content, i)} for i, m in enumerate(body.messages)]
        try:
            ids = chat.encode(messages)
        except ChatError as e:
            raise APIError(400, str(e), param="messages")
        body.max_tokens = body.max_completion_tokens or body.max_tokens
        return await serve(body, ids, request, chat=True)

    async def serve(body: Sampling, ids: list[int], request: HTTPRequest, chat: bool):
        req, events = submit(body, ids)
        kind = "chat.completion" if chat else "text_completion"
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
                "created": int(time.time()), "model": name}
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(stream(req, events, head, kind, usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        text = []
        watcher = asyncio.create_task(cancel_on_disconnect(request, req))
        try:
            while True:
                what, value = await events.get()
                if what == "text":
                    text.append(value)
                elif what == "error":
                    raise APIError(500, f"generation failed: {value}", "server_error")
                else:
                    break
        finally:
            watcher.cancel()
            req.cancel()  # (a no-op once finished)
        out = "".join(text)
        choice = ({"message": {"role": "assistant", "content": out}} if chat else {"text": out})
        return {**head, "object": kind, "choices": [
            {"index": 0, **choice, "logprobs": None, "finish_reason": req.finish_reason}],
            "usage": usage_of(req)}

    def submit(body: Sampling, ids: list[int]) -> tuple[Request, asyncio.Queue]:
        """Check the request against the context and queue it; its events arrive on the queue."""
        if body.n not in (None, 1):
            raise APIError(400, "n: only n = 1 is supported (send concurrent requests instead)",
                           param="n")
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        room = model.ctx - len(ids)
        if room < 1:
            raise APIError(400, f"the prompt is {len(ids)} tokens; the context is {model.ctx}: "
                           "shorten it", param="prompt", code="context_length_exceeded")
        max_tokens = body.max_tokens or room
        if max_tokens > room:
            raise APIError(400, f"the prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) "
                           f"exceed the context of {model.ctx} tokens: ask for at most {room}",
                           param="max_tokens", code="context_length_exceeded")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if any(not s for s in stop):
            raise APIError(400, "stop: the strings must not be empty", param="stop")
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        req = Request(ids, max_tokens, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev),
                      temperature=1.0 if body.temperature is None else body.temperature,
                      top_p=1.0 if body.top_p is None else body.top_p, seed=body.seed,
                      stop=stop, ignore_eos=body.ignore_eos)
        try:
            batcher.submit(req)
        except QueueFull as e:
            raise APIError(429, f"the server is busy: {e}; retry later", "rate_limit_error",
                           code="queue_full")
        except RuntimeError as e:
            raise APIError(503, str(e), "server_error")
        return req, events

    async def stream(req: Request, events: asyncio.Queue, head: dict, kind: str, usage: bool):
        chat = kind == "chat.completion"
        kind += ".chunk" if chat else ""

        def chunk(text: str | None, finish: str | None = None, role: bool = False) -> str:
            if chat:
                delta = ({"role": "assistant", "content": ""} if role else
                         {} if text is None else {"content": text})
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            return sse({**head, "object": kind, "choices": [choice]})

        try:
            if chat:
                yield chunk(None, role=True)
            while True:
                what, value = await events.get()
                if what == "text":
                    yield chunk(value)
                elif what == "done":
                    yield chunk(None, finish=value)
                    if usage:
                        yield sse({**head, "object": kind, "choices": [], "usage": usage_of(req)})
                    break
                else:
                    yield sse(APIError(500, f"generation failed: {value}", "server_error").body())
                    break
            yield "data: [DONE]\n\n"
        finally:
            req.cancel()  # the client went away: the engine frees its slot (a no-op once done)

    return app


async def cancel_on_disconnect(request: HTTPRequest, req: Request) -> None:
    """A client that goes away before its (non-streamed) answer: the engine drops its request.
    The body has been read, so the next ASGI message is the disconnection."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    req.cancel()


def _text(content, i: int) -> str:
    """A message's content: a string, or OpenAI's list of parts of which only text is taken."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for p in content:
        if p.get("type") != "text" or not isinstance(p.get("text"), str):
            raise APIError(400, f"messages.{i}.content: only text parts are supported",
                           param=f"messages.{i}.content")
        parts.append(p["text"])
    return "".join(parts)


def usage_of(req: Request) -> dict:
    p, c = len(req.prompt_ids), req.completion_tokens
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"
