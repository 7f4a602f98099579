"""OpenAI-compatible HTTP API (FastAPI) in front of the engine."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from mixjax.serve.engine import Engine, EngineStopped, QueueFull, Request, SamplingParams, TOP_LOGPROBS


class APIError(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.type, self.code = message, param, status, type, code


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse({"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}},
                        status_code=e.status)


# --- validation ------------------------------------------------------------------------------------------------
def _num(body, name, default, lo=None, hi=None, integer=False):
    v = body.get(name)
    if v is None:
        return default
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok:
        raise APIError(f"'{name}' must be {'an integer' if integer else 'a number'}, got {v!r}", name)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        bound = (f"in [{lo}, {hi}]" if lo is not None and hi is not None
                 else f"at least {lo}" if lo is not None else f"at most {hi}")
        raise APIError(f"'{name}' must be {bound}, got {v}", name)
    return v


def _bool(body, name, default=False):
    v = body.get(name, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise APIError(f"'{name}' must be a boolean, got {v!r}", name)
    return v


class Server:
    def __init__(self, engine: Engine, model_name: str, plan: dict | None = None):
        self.engine = engine
        self.tok = engine.tok
        self.model_name = model_name
        self.plan = plan or {}
        self.created = int(time.time())

    # sampling parameters shared by both endpoints
    def params(self, body: dict, prompt_len: int, default_max: int | None, chat: bool) -> SamplingParams:
        if not isinstance(body, dict):
            raise APIError("the request body must be a JSON object")
        if "model" in body and body["model"] is not None and body["model"] != self.model_name:
            raise APIError(f"the model '{body['model']}' does not exist (this server serves '{self.model_name}')",
                           "model", 404, "invalid_request_error", "model_not_found")
        n = _num(body, "n", 1, 1, 1, integer=True)
        del n
        if _num(body, "best_of", 1, 1, 1, integer=True) != 1:
            raise APIError("'best_of' must be 1", "best_of")
        if _bool(body, "echo"):
            raise APIError("'echo' is not supported", "echo")
        limit = self.engine.max_seq_len
        if prompt_len >= limit:
            raise APIError(f"This model's maximum context length is {limit} tokens. However, your prompt has "
                           f"{prompt_len} tokens.", "messages" if chat else "prompt", code="context_length_exceeded")
        key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = _num(body, key, default_max, 1, None, integer=True)
        if max_tokens is None:
            max_tokens = limit - prompt_len
        if prompt_len + max_tokens > limit:
            raise APIError(f"This model's maximum context length is {limit} tokens. However, you requested "
                           f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} for the "
                           f"completion). Please reduce the prompt or max_tokens.", key,
                           code="context_length_exceeded")
        stop = body.get("stop")
        if stop is None:
            stop = []
        elif isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 16:
            raise APIError("'stop' must be a non-empty string or a list of at most 16 non-empty strings", "stop")
        stop_ids = body.get("stop_token_ids") or []
        if not isinstance(stop_ids, list) or not all(isinstance(t, int) and not isinstance(t, bool)
                                                      for t in stop_ids):
            raise APIError("'stop_token_ids' must be a list of integers", "stop_token_ids")
        if chat:
            lp = _bool(body, "logprobs")
            top = _num(body, "top_logprobs", 0, 0, TOP_LOGPROBS, integer=True)
            if top and not lp:
                raise APIError("'top_logprobs' needs 'logprobs': true", "top_logprobs")
            logprobs = top if lp else None
        else:
            logprobs = _num(body, "logprobs", None, 0, TOP_LOGPROBS, integer=True)
        top_k = _num(body, "top_k", 0, -1, None, integer=True)
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=float(_num(body, "temperature", 1.0, 0.0, 2.0)),
            top_k=max(top_k, 0),
            top_p=float(_num(body, "top_p", 1.0, 0.0, 1.0)) or 1e-9,
            seed=_num(body, "seed", None, integer=True),
            stop=stop, stop_token_ids=stop_ids, ignore_eos=_bool(body, "ignore_eos"), logprobs=logprobs)

    def encode_prompt(self, prompt) -> list[int]:
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            if self.tok is None:
                raise APIError("this checkpoint has no tokenizer: send 'prompt' as a list of token ids", "prompt")
            ids = self.tok.encode(prompt)
        elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = list(prompt)
            bad = [t for t in ids if not 0 <= t < self.engine.vocab]
            if bad:
                raise APIError(f"token ids {bad[:5]} are outside the vocabulary [0, {self.engine.vocab})", "prompt")
        else:
            raise APIError("'prompt' must be a string or a list of token ids (one prompt per request)", "prompt")
        if not ids:
            raise APIError("'prompt' is empty", "prompt")
        return ids

    def encode_chat(self, body) -> list[int]:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise APIError("'messages' must be a non-empty list", "messages")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "tool", "developer"):
                raise APIError(f"messages[{i}] must be an object with a valid 'role'", f"messages[{i}].role")
            c = m.get("content")
            if isinstance(c, list):  # [{"type": "text", "text": ...}]
                try:
                    m["content"] = "".join(p["text"] for p in c if p.get("type") == "text")
                except Exception:
                    raise APIError(f"messages[{i}].content parts must be text", f"messages[{i}].content") from None
            elif c is not None and not isinstance(c, str):
                raise APIError(f"messages[{i}].content must be a string", f"messages[{i}].content")
        if self.tok is None or not self.tok.chat_template:
            raise APIError("this checkpoint has no chat template: use /v1/completions", "messages")
        try:
            text = self.tok.apply_chat_template(msgs, add_generation_prompt=True)
        except Exception as e:
            raise APIError(f"the chat template failed on these messages: {e}", "messages") from None
        ids = self.tok.encode(text)
        if not ids:
            raise APIError("the rendered chat prompt is empty", "messages")
        return ids

    # --- logprobs in the two OpenAI formats ----------------------------------------------------------------------
    def _tok_str(self, t: int) -> str:
        if self.tok is None:
            return str(t)
        return self.tok.decode([t], skip_special_tokens=False)

    def completion_logprobs(self, ev, n, offset):
        toks = [self._tok_str(t) for t in ev["ids"]]
        offs = []
        for s in toks:
            offs.append(offset)
            offset += len(s)
        return {"tokens": toks, "token_logprobs": ev["logprobs"], "text_offset": offs,
                "top_logprobs": [{self._tok_str(i): lp for i, lp in top[:n]} for top in ev["top"]] if n else None}

    def chat_logprobs(self, ev, n):
        out = []
        for t, lp, top in zip(ev["ids"], ev["logprobs"], ev["top"]):
            s = self._tok_str(t)
            out.append({"token": s, "logprob": lp, "bytes": list(s.encode()),
                        "top_logprobs": [{"token": self._tok_str(i), "logprob": l,
                                          "bytes": list(self._tok_str(i).encode())} for i, l in top[:n]]})
        return out


def build_app(server: Server, engine: Engine) -> FastAPI:
    app = FastAPI(title="mixjax")

    @app.exception_handler(APIError)
    async def _api_error(_req, e: APIError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _validation(_req, e):
        return error_response(APIError(str(e)))

    @app.get("/health")
    async def health():
        if engine.failed is not None:
            return JSONResponse({"status": "unhealthy", "error": f"engine unhealthy: {engine.failed}"},
                                status_code=503)
        return {"status": "ok", "running": engine.running, "queued": engine.queue_length}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(engine.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": server.created,
                                            "owned_by": "mixjax", "max_model_len": engine.max_seq_len}]}

    async def read_body(req: HTTPRequest) -> dict:
        try:
            body = json.loads(await req.body())
        except Exception:
            raise APIError("the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise APIError("the request body must be a JSON object")
        return body

    def submit(ids, params):
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()

        def sink(ev):
            loop.call_soon_threadsafe(q.put_nowait, ev)

        try:
            r = engine.submit(Request(ids, params, sink))
        except QueueFull as e:
            raise APIError(str(e), None, 429, "rate_limit_exceeded", "queue_full") from None
        except EngineStopped as e:
            code = "engine_unhealthy" if engine.failed is not None else "shutting_down"
            raise APIError(str(e), None, 503, "server_error", code) from None
        return r, q

    async def events(http: HTTPRequest, r: Request, q: asyncio.Queue, poll: bool):
        """Engine events for one request; cancels it when the client goes away."""
        try:
            while True:
                if poll:
                    try:
                        ev = await asyncio.wait_for(q.get(), 0.25)
                    except asyncio.TimeoutError:
                        if await http.is_disconnected():
                            engine.cancel(r)
                            return
                        continue
                else:
                    ev = await q.get()
                yield ev
                if ev["type"] != "token":
                    return
        finally:
            engine.cancel(r)  # no-op when finished

    def usage(ev):
        return {"prompt_tokens": ev["prompt_tokens"], "completion_tokens": ev["completion_tokens"],
                "total_tokens": ev["prompt_tokens"] + ev["completion_tokens"]}

    def sse(obj) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    @app.post("/v1/completions")
    async def completions(http: HTTPRequest):
        body = await read_body(http)
        if "prompt" not in body:
            raise APIError("'prompt' is required", "prompt")
        ids = server.encode_prompt(body["prompt"])
        params = server.params(body, len(ids), 16, chat=False)
        stream = _bool(body, "stream")
        include_usage = stream and bool((body.get("stream_options") or {}).get("include_usage"))
        r, q = submit(ids, params)
        rid, created, n_lp = f"cmpl-{uuid.uuid4().hex}", int(time.time()), params.logprobs

        def chunk(text, finish, lp=None, extra=None):
            c = {"index": 0, "text": text, "logprobs": lp, "finish_reason": finish}
            c.update(extra or {})
            return {"id": rid, "object": "text_completion", "created": created, "model": server.model_name,
                    "choices": [c]}

        if stream:
            async def gen():
                offset = 0
                async for ev in events(http, r, q, poll=False):
                    if ev["type"] == "token":
                        lp = server.completion_logprobs(ev, n_lp, offset) if n_lp is not None else None
                        offset += len(ev["text"])
                        yield sse(chunk(ev["text"], None, lp, {"token_ids": ev["ids"]}))
                    elif ev["type"] == "error":
                        yield sse({"error": {"message": ev["message"], "type": "server_error", "param": None,
                                             "code": None}})
                    else:
                        yield sse(chunk("", ev["finish_reason"]))
                        if include_usage:
                            yield sse({"id": rid, "object": "text_completion", "created": created,
                                       "model": server.model_name, "choices": [], "usage": usage(ev)})
                yield "data: [DONE]\n\n"

            return StreamingResponse(gen(), media_type="text/event-stream")

        text, toks, lps = "", [], None
        async for ev in events(http, r, q, poll=True):
            if ev["type"] == "token":
                if n_lp is not None:
                    part = server.completion_logprobs(ev, n_lp, len(text))
                    lps = part if lps is None else {k: (lps[k] + part[k]) if lps[k] is not None else None
                                                    for k in lps}
                text += ev["text"]
                toks += ev["ids"]
            elif ev["type"] == "error":
                raise APIError(ev["message"], None, 500, "server_error")
            else:
                out = chunk(text, ev["finish_reason"], lps, {"token_ids": toks})
                out["usage"] = usage(ev)
                return out
        return JSONResponse({"error": {"message": "cancelled", "type": "server_error", "param": None,
                                       "code": None}}, status_code=499)

    @app.post("/v1/chat/completions")
    async def chat(http: HTTPRequest):
        body = await read_body(http)
        ids = server.encode_chat(body)
        params = server.params(body, len(ids), None, chat=True)
        stream = _bool(body, "stream")
        include_usage = stream and bool((body.get("stream_options") or {}).get("include_usage"))
        r, q = submit(ids, params)
        rid, created, n_lp = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), params.logprobs

        def chunk(delta, finish, lp=None):
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": server.model_name,
                    "choices": [{"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish}]}

        if stream:
            async def gen():
                yield sse(chunk({"role": "assistant", "content": ""}, None))
                async for ev in events(http, r, q, poll=False):
                    if ev["type"] == "token":
                        lp = {"content": server.chat_logprobs(ev, n_lp)} if n_lp is not None else None
                        if ev["text"] or lp:
                            yield sse(chunk({"content": ev["text"]}, None, lp))
                    elif ev["type"] == "error":
                        yield sse({"error": {"message": ev["message"], "type": "server_error", "param": None,
                                             "code": None}})
                    else:
                        yield sse(chunk({}, ev["finish_reason"]))
                        if include_usage:
                            yield sse({"id": rid, "object": "chat.completion.chunk", "created": created,
                                       "model": server.model_name, "choices": [], "usage": usage(ev)})
                yield "data: [DONE]\n\n"

            return StreamingResponse(gen(), media_type="text/event-stream")

        text, toks, lps = "", [], []
        async for ev in events(http, r, q, poll=True):
            if ev["type"] == "token":
                if n_lp is not None:
                    lps += server.chat_logprobs(ev, n_lp)
                text += ev["text"]
                toks += ev["ids"]
            elif ev["type"] == "error":
                raise APIError(ev["message"], None, 500, "server_error")
            else:
                return {"id": rid, "object": "chat.completion", "created": created, "model": server.model_name,
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                     "logprobs": {"content": lps} if n_lp is not None else None,
                                     "finish_reason": ev["finish_reason"], "token_ids": toks}],
                        "usage": usage(ev)}
        return JSONResponse({"error": {"message": "cancelled", "type": "server_error", "param": None,
                                       "code": None}}, status_code=499)

    return app
