"""The HTTP API over live streams (FastAPI): streams, OpenAI-style chat completions, events, a page.

Routes (JSON unless noted):

- ``POST /v1/streams`` ``{"source": "synthetic" | "file" | "folder" | "device" | "url",
  "location": ..., "fps": ..., "chunk_frames": ..., "policy": ..., "budget": ...,
  "standing_questions": [...], "realtime": true}`` -> ``{"id": ...}``; 503 with the reason
  when the server is full (stream count, KV budget, or the device's free memory:
  :mod:`hermes_policy.serving.admission`).
- ``GET /v1/streams``, ``GET /v1/streams/{id}`` (frames seen, ingested, dropped, lag,
  tokens kept per layer, KV and peak memory), ``DELETE /v1/streams/{id}``.
- ``GET /v1/streams/{id}/events``: server-sent events, one per standing question turning yes.
- ``GET /v1/streams/{id}/frame.jpg``: the newest frame (video sources).
- ``GET /v1/streams/{id}/memory``: which frames each layer still keeps.
- ``POST /v1/chat/completions``: the OpenAI chat format with an extra ``stream_id``; the
  last user message is the question; ``"stream": true`` answers as server-sent
  ``chat.completion.chunk`` events token by token; ``usage`` carries ``ttft_ms`` and
  ``tpot_ms``.
- ``GET /v1/models``; ``GET /`` the page (HTML).

Every route checks ``Authorization: Bearer <key>`` when the server has an API key.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field

from hermes_policy.errors import HermesError
from hermes_policy.serving.admission import StreamRegistry, device_free_bytes, kv_bound_bytes
from hermes_policy.serving.live_stream import LiveStream, ServedAnswer, StreamEvent
from hermes_policy.serving.model_lock import INGEST, QUESTION, ModelLock
from hermes_policy.serving.sources import SourceSpec, open_source
from hermes_policy.session import StreamingSession

PAGE = Path(__file__).with_name("page.html")


class StreamRequest(BaseModel):
    source: str = "synthetic"
    location: str | None = None
    fps: float = Field(1.0, gt=0, le=60)
    chunk_frames: int = Field(8, ge=1, le=64)
    policy: str | None = None  # default: the server's
    budget: int | None = Field(None, ge=1)
    standing_questions: list[str] = Field(default_factory=list, max_length=8)
    realtime: bool = True
    frames: int = Field(1_000_000, ge=1)  # synthetic stream length
    seed: int = 0


class ChatMessage(BaseModel):
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(BaseModel):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    max_tokens: int | None = Field(None, ge=1, le=4096)
    max_completion_tokens: int | None = Field(None, ge=1, le=4096)
    stream_id: str | None = None


@dataclass
class ServerConfig:
    """What the server was started with."""

    policy: str = "paper-default"
    budget: int = 4000
    max_streams: int = 4
    kv_budget_bytes: int = 8 << 30
    api_key: str | None = None
    max_new_tokens: int = 64


def question_of(messages: list[ChatMessage]) -> str:
    """The text of the last user message (text parts joined)."""
    for message in reversed(messages):
        if message.role == "user":
            content = message.content
            if isinstance(content, list):
                content = " ".join(part.get("text", "") for part in content if part.get("type") == "text")
            if content and content.strip():
                return content
    raise HTTPException(400, "the messages hold no user text to answer")


def create_app(adapter: Any, config: ServerConfig) -> FastAPI:
    """The API over ``adapter`` (a loaded model, shared by every stream)."""
    from hermes_policy.retention.specs import rule_from_spec

    registry = StreamRegistry(config.max_streams, config.kv_budget_bytes)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        for stream in list(registry.streams.values()):  # stop every stream's threads on shutdown
            stream.stop(timeout=1.0)

    app = FastAPI(title="hermes-probe live streams", version="1", lifespan=lifespan)
    model_lock = ModelLock()
    app.state.registry = registry

    def authorized(request: Request) -> None:
        if config.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {config.api_key}".encode()):
            raise HTTPException(401, "missing or wrong API key (Authorization: Bearer <key>)")

    def stream_of(stream_id: str | None) -> LiveStream:
        if not stream_id:
            raise HTTPException(400, "name the stream: an extra body field stream_id")
        stream = registry.streams.get(stream_id)
        if stream is None:
            raise HTTPException(404, f"no stream {stream_id!r}")
        return stream

    @app.exception_handler(HermesError)
    async def hermes_error(request: Request, exc: HermesError) -> JSONResponse:
        return JSONResponse({"error": {"message": str(exc), "type": "invalid_request_error"}}, status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"error": {"message": exc.detail, "code": exc.status_code}}, status_code=exc.status_code)

    guard = [Depends(authorized)]

    @app.post("/v1/streams", dependencies=guard)
    def create_stream(body: StreamRequest) -> dict[str, str]:
        spec = SourceSpec(body.source, body.location, body.frames, body.seed, body.realtime)
        policy = body.policy or config.policy
        rule = rule_from_spec(policy, adapter, body.budget or config.budget)
        with model_lock.hold(INGEST):  # no other stream's forward or graph capture meanwhile
            session = StreamingSession(adapter, rule, chunk_frames=body.chunk_frames, fps=body.fps,
                                       max_new_tokens=config.max_new_tokens)
            free = device_free_bytes(adapter.device)
        bound = kv_bound_bytes(session, config.max_new_tokens)
        if bound is None:
            raise HTTPException(400, f"the {rule.name} rule keeps every frame: a live stream needs a bounded rule")
        description = {"source": body.source, "location": body.location, "fps": body.fps,
                       "chunk_frames": body.chunk_frames, "policy": policy, "budget": body.budget or config.budget,
                       "rule": rule.name}
        with registry.lock:
            description["kv_bound_bytes"] = bound = registry.bound_for(bound, description)
            reason = registry.admit(bound, free)
            if reason is not None:
                raise HTTPException(503, reason)
            frames = open_source(adapter, spec, body.fps)
            stream = LiveStream(session, frames, model_lock, standing=body.standing_questions,
                                realtime=body.realtime, description=description)
            registry.streams[stream.id] = stream
        stream.start()
        return {"id": stream.id}

    @app.get("/v1/streams", dependencies=guard)
    def list_streams() -> dict[str, Any]:
        return {"streams": [s.status() for s in list(registry.streams.values())]}

    @app.get("/v1/streams/{stream_id}", dependencies=guard)
    def get_stream(stream_id: str) -> dict[str, Any]:
        return stream_of(stream_id).status()

    @app.delete("/v1/streams/{stream_id}", dependencies=guard)
    def delete_stream(stream_id: str) -> dict[str, Any]:
        stream = stream_of(stream_id)
        with registry.lock:
            registry.streams.pop(stream_id, None)
        stream.stop()
        return {"id": stream_id, "deleted": True}

    @app.get("/v1/streams/{stream_id}/frame.jpg", dependencies=guard)
    def latest_frame(stream_id: str) -> Response:
        jpeg = stream_of(stream_id).latest_jpeg()
        if jpeg is None:
            raise HTTPException(404, "no video frame yet (or a text stream)")
        return Response(jpeg, media_type="image/jpeg")

    @app.get("/v1/streams/{stream_id}/memory", dependencies=guard)
    def memory(stream_id: str) -> dict[str, Any]:
        stream = stream_of(stream_id)
        with model_lock.hold(QUESTION):
            frames = [sorted({int(f) for f in layer.tolist() if f >= 0}) for layer in stream.session.store.frame_index]
        return {"frames_seen": stream.session.frames_seen, "kept_frames_per_layer": frames}

    @app.get("/v1/streams/{stream_id}/events", dependencies=guard)
    async def events(stream_id: str, request: Request) -> StreamingResponse:
        stream = stream_of(stream_id)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[StreamEvent] = asyncio.Queue()
        for past in list(stream.events):
            queue.put_nowait(past)
        remove = stream.add_listener(lambda event: loop.call_soon_threadsafe(queue.put_nowait, event))

        async def feed() -> AsyncIterator[str]:
            try:
                yield ": connected\n\n"
                while not await request.is_disconnected():
                    try:
                        event = await asyncio.wait_for(queue.get(), timeout=1.0)
                    except TimeoutError:
                        yield ": keep-alive\n\n"
                        continue
                    yield f"event: standing_question\ndata: {json.dumps(event.__dict__)}\n\n"
            finally:
                remove()

        return StreamingResponse(feed(), media_type="text/event-stream")

    @app.get("/v1/models", dependencies=guard)
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": adapter.name_or_path or "embedded", "object": "model",
                                             "owned_by": "hermes-probe"}]}

    @app.post("/v1/chat/completions", dependencies=guard)
    async def chat(body: ChatRequest) -> Any:
        arrival = time.monotonic()
        stream = stream_of(body.stream_id)
        question = question_of(body.messages)
        limit = body.max_completion_tokens or body.max_tokens or config.max_new_tokens
        completion_id = f"chatcmpl-{secrets.token_hex(8)}"
        created = int(time.time())
        model_name = body.model or adapter.name_or_path or "embedded"
        stops = adapter.stop_token_ids

        def usage(served: ServedAnswer) -> dict[str, Any]:
            answer = served.answer
            prompt_tokens = len(adapter.question_piece(question))
            return {"prompt_tokens": prompt_tokens, "completion_tokens": len(answer.token_ids),
                    "total_tokens": prompt_tokens + len(answer.token_ids), "ttft_ms": served.ttft_ms,
                    "wait_ms": served.wait_s * 1e3, "catch_up_ms": served.catch_up_s * 1e3,
                    "catch_up_frames": served.catch_up_frames, "answer_ttft_ms": answer.ttft_ms,
                    "tpot_ms": answer.tpot_ms, "frames_seen": answer.frames_seen,
                    "tokens_kept_per_layer": answer.tokens_kept}

        if not body.stream:
            served = await asyncio.to_thread(stream.ask, question, limit, None, arrival)
            answer = served.answer
            return {"id": completion_id, "object": "chat.completion", "created": created, "model": model_name,
                    "stream_id": stream.id,
                    "choices": [{"index": 0, "finish_reason": "stop" if len(answer.token_ids) < limit else "length",
                                 "message": {"role": "assistant", "content": answer.text}}],
                    "usage": usage(served)}

        loop = asyncio.get_running_loop()
        tokens: asyncio.Queue[int | None] = asyncio.Queue()

        def on_token(token: int) -> None:
            loop.call_soon_threadsafe(tokens.put_nowait, token)

        def chunk(delta: dict[str, Any], finish: str | None = None, extra: dict[str, Any] | None = None) -> str:
            data = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                    "model": model_name, "stream_id": stream.id,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **(extra or {})}
            return f"data: {json.dumps(data)}\n\n"

        async def run() -> Any:
            try:
                return await asyncio.to_thread(stream.ask, question, limit, on_token, arrival)
            finally:
                tokens.put_nowait(None)

        async def feed() -> AsyncIterator[str]:
            task = asyncio.create_task(run())
            yield chunk({"role": "assistant", "content": ""})
            ids: list[int] = []
            sent = ""
            while (token := await tokens.get()) is not None:
                if token in stops:
                    continue
                ids.append(token)
                text = adapter.decode(ids)
                if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
                    continue
                if text[len(sent):]:
                    yield chunk({"content": text[len(sent):]})
                    sent = text
            try:
                served = await task
            except HermesError as exc:
                yield f"data: {json.dumps({'error': {'message': str(exc)}})}\n\n"
                return
            answer = served.answer
            if answer.text[len(sent):]:
                yield chunk({"content": answer.text[len(sent):]})
            finish = "stop" if len(answer.token_ids) < limit else "length"
            yield chunk({}, finish, {"usage": usage(served)})
            yield "data: [DONE]\n\n"

        return StreamingResponse(feed(), media_type="text/event-stream")

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE.read_text()

    return app


@contextmanager
def serve_in_background(app: FastAPI, host: str = "127.0.0.1", start_timeout: float = 30.0) -> Iterator[str]:
    """Run ``app`` under uvicorn on a free port of ``host`` in a thread; yields its base URL.

    For tests and benchmarks that drive a real server from the same process; the server
    stops (and the streams' threads with it) when the block ends.
    """
    import socket

    import uvicorn

    with socket.socket() as probe:
        probe.bind((host, 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
