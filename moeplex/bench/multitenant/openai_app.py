"""A minimal OpenAI `/v1/completions` server around a blocking per-request generator, FCFS one request at a time (the baselines)."""

from __future__ import annotations

import argparse
import asyncio
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, StreamingResponse
from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest

from moeplex.dtypes import DTYPE_CHOICES, DTYPE_HELP
from moeplex.server.app import event
from moeplex.server.errors import APIError, install_error_handlers
from moeplex.server.generation import DISCONNECT_POLL_SECONDS
from moeplex.server.metrics import LATENCY_BUCKETS
from moeplex.server.protocol import CompletionRequest

DONE = object()


class Cancelled(Exception):
    """The client went away: stop generating for it."""


class Backend(Protocol):
    """Generates greedily for one request at a time, calling on_token(token_id) as each token is sampled."""

    variants: list[str]
    tokenizer: object

    def generate(self, variant: str, prompt_ids: list[int], max_tokens: int, ignore_eos: bool, on_token: Callable[[int], None]) -> None: ...


class TextDeltas:
    """Turns a growing token list into text pieces that no later token can change (no partial characters)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.token_ids, self.sent = tokenizer, [], 0

    def add(self, token_id: int) -> str:
        self.token_ids.append(token_id)
        return self._delta(self.tokenizer.decode(self.token_ids).rstrip("\ufffd"))

    def flush(self) -> str:
        return self._delta(self.tokenizer.decode(self.token_ids))

    def _delta(self, text: str) -> str:
        delta, self.sent = text[self.sent :], max(self.sent, len(text))
        return delta


class DrainState:
    """Set when shutdown begins (moeplex's DrainingServer calls begin_drain); new requests then get 503."""

    def __init__(self):
        self.draining = False

    def begin_drain(self) -> None:
        self.draining = True


def create_baseline_app(backend: Backend) -> FastAPI:
    """/v1/completions (text or token-id prompt, streaming or not), /v1/models, /health, /metrics (queue time)."""
    app = FastAPI()
    install_error_handlers(app)
    app.state.server = DrainState()
    worker = ThreadPoolExecutor(max_workers=1)  # FCFS: requests run one after another in arrival order
    registry = CollectorRegistry()
    queue_time = Histogram("moeplex_request_queue_time_seconds", "Time from arrival to the start of generation", ["variant"], buckets=LATENCY_BUCKETS, registry=registry)
    running = Gauge("moeplex_num_requests_running", "Requests generating now", registry=registry)
    waiting = Gauge("moeplex_num_requests_waiting", "Requests waiting for their turn", registry=registry)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(generate_latest(registry).decode())

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": v, "object": "model", "created": 0, "owned_by": "moeplex-bench"} for v in backend.variants]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        if app.state.server.draining:
            raise APIError(503, "the server is shutting down")
        if body.model not in backend.variants:
            raise APIError(404, f"The model '{body.model}' does not exist", param="model", code="model_not_found")
        prompt = body.prompt
        if isinstance(prompt, str):
            prompt_ids = backend.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        elif prompt and isinstance(prompt[0], int):
            prompt_ids = list(prompt)
        else:
            raise APIError(400, "this baseline server takes one prompt per request", param="prompt")
        max_tokens = body.max_tokens or 16
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        arrived = time.perf_counter()
        gone = threading.Event()  # set when the client disconnects: a queued request is dropped, a running one stopped

        def on_token(token: int) -> None:
            if gone.is_set():
                raise Cancelled
            loop.call_soon_threadsafe(events.put_nowait, token)

        def run() -> None:
            waiting.dec()
            try:
                if not gone.is_set():
                    queue_time.labels(body.model).observe(time.perf_counter() - arrived)
                    with running.track_inprogress():
                        backend.generate(body.model, prompt_ids, max_tokens, body.ignore_eos, on_token)
            except Cancelled:
                pass
            finally:
                loop.call_soon_threadsafe(events.put_nowait, DONE)

        waiting.inc()
        worker.submit(run)
        reply = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()), "model": body.model}

        def choice(text: str, finish_reason: str | None) -> dict:
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}

        def usage(count: int) -> dict:
            return {"prompt_tokens": len(prompt_ids), "completion_tokens": count, "total_tokens": len(prompt_ids) + count}

        async def tokens():
            deltas = TextDeltas(backend.tokenizer)
            try:
                while True:
                    try:
                        token = await asyncio.wait_for(events.get(), DISCONNECT_POLL_SECONDS)
                    except TimeoutError:
                        if await request.is_disconnected():
                            return
                        continue
                    if token is DONE:
                        break
                    yield deltas.add(token)
            finally:
                gone.set()
            yield deltas.flush()
            finish = "length" if len(deltas.token_ids) >= max_tokens else "stop"
            yield len(deltas.token_ids), finish

        if not body.stream:
            pieces = [item async for item in tokens()]
            count, finish = pieces.pop()
            return reply | {"choices": [choice("".join(pieces), finish)], "usage": usage(count)}

        async def sse():
            async for item in tokens():
                if isinstance(item, tuple):
                    count, finish = item
                    yield event(reply | {"choices": [choice("", finish)]})
                    if body.include_usage_chunk:
                        yield event(reply | {"choices": [], "usage": usage(count)})
                elif item:
                    yield event(reply | {"choices": [choice(item, None)]})
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")

    return app


def baseline_server_main(description: str, make_backend: Callable[[dict[str, Path], Path, str], Backend], argv: list[str] | None = None) -> None:
    """`python -m ... --model NAME=FOLDER ... --tokenizer DIR [--threads T] [--dtype bf16|fp32] --port P`: build the backend and serve it."""
    import torch
    import uvicorn

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", action="append", required=True, help="NAME=CHECKPOINT_FOLDER, once per variant")
    parser.add_argument("--tokenizer", type=Path, required=True, help="tokenizer folder shared by the variants")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="bf16", help=DTYPE_HELP)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    checkpoints = {name: Path(folder) for name, folder in (item.split("=", 1) for item in args.model)}
    uvicorn.run(create_baseline_app(make_backend(checkpoints, args.tokenizer, args.dtype)), host=args.host, port=args.port, log_level="warning")
