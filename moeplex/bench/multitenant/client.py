"""Replays a trace against a system over the OpenAI API with streaming requests, and records what a user sees."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from moeplex.bench.multitenant.workload import Trace, TraceRequest

Route = Callable[[str], tuple[str, str]]  # variant -> (base URL, model name to request)


@dataclass
class Sample:
    """One request's timeline in seconds after the trace started; first_token and done are None if it failed."""

    variant: str
    arrival: float
    sent: float
    first_token: float | None = None
    done: float | None = None
    output_tokens: int = 0
    error: str | None = None


def completion_body(request: TraceRequest, model: str) -> dict:
    return {
        "model": model, "prompt": request.prompt, "max_tokens": request.max_tokens, "temperature": 0,
        "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
    }


async def send(http: httpx.AsyncClient, route: Route, request: TraceRequest, arrival: float, started: float, timeout: float) -> Sample:
    """One streaming completion; the first token is the first chunk that carries a choice."""
    url, model = route(request.variant)
    sample = Sample(request.variant, arrival, time.perf_counter() - started)
    chunks = 0
    try:
        async with http.stream("POST", f"{url}/v1/completions", json=completion_body(request, model), timeout=timeout) as response:
            if response.status_code != 200:
                sample.error = f"HTTP {response.status_code}"
                return sample
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                payload = json.loads(line[6:])
                if payload.get("choices"):
                    chunks += 1
                    if sample.first_token is None:
                        sample.first_token = time.perf_counter() - started
                if payload.get("usage"):
                    sample.output_tokens = payload["usage"]["completion_tokens"]
        sample.done = time.perf_counter() - started
        sample.output_tokens = sample.output_tokens or chunks
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as exc:
        sample.error = f"{type(exc).__name__}: {exc}"
    return sample


async def replay(trace: Trace, route: Route, timeout: float = 600.0, drain: float | None = None) -> list[Sample]:
    """Open loop: each request sent at its arrival time; requests unfinished `drain` seconds after the last arrival are errors.
    Closed loop: `concurrency` clients, each sends its next request when the last returns, until the trace's duration (if any) is over."""
    limits = httpx.Limits(max_connections=max(trace.concurrency, len(trace.requests), 1))
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as http:
        started = time.perf_counter()
        if trace.concurrency:
            pending = list(reversed(trace.requests))
            samples: list[Sample] = []

            async def client() -> None:
                while pending and (not trace.duration or time.perf_counter() - started < trace.duration):
                    request = pending.pop()
                    samples.append(await send(http, route, request, time.perf_counter() - started, started, timeout))

            await asyncio.gather(*(client() for _ in range(trace.concurrency)))
            return samples

        deadline = trace.duration + (timeout if drain is None else drain)

        async def arrive(request: TraceRequest) -> Sample:
            await asyncio.sleep(max(0.0, request.arrival - (time.perf_counter() - started)))
            try:
                return await asyncio.wait_for(send(http, route, request, request.arrival, started, timeout), deadline - request.arrival)
            except TimeoutError:
                return Sample(request.variant, request.arrival, request.arrival, error=f"unfinished {deadline:.0f} s after the trace started")

        return list(await asyncio.gather(*(arrive(r) for r in trace.requests)))


def run_trace(trace: Trace, route: Route, timeout: float = 600.0, drain: float | None = None) -> list[Sample]:
    return asyncio.run(replay(trace, route, timeout, drain))
