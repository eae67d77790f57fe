"""One API request's sequences (n choices of one or more prompts) submitted to the engine and followed to the end."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

from moeplex.engine import LLM, EngineStoppedError, QueueFullError, RequestOutput
from moeplex.model.sampling import SamplingParams
from moeplex.server.errors import APIError
from moeplex.server.metrics import ServerMetrics

DISCONNECT_POLL_SECONDS = 0.5


class GenerationJob:
    """Choices of one request; `outputs()` yields (choice index, output) and cancels what is left when it stops early."""

    def __init__(self, llm: LLM, metrics: ServerMetrics, variant: str, prompts: list[list[int]], params: list[SamplingParams], logprobs: int | None):
        self.llm, self.metrics, self.variant = llm, metrics, variant
        self.prompts, self.params, self.logprobs = prompts, params, logprobs
        self._queue: asyncio.Queue[tuple[int, RequestOutput]] = asyncio.Queue()
        self._index_of: dict[int, int] = {}
        self._unfinished: set[int] = set()

    async def start(self, retry_after_seconds: int) -> None:
        """Submit every choice; on refusal cancel those already submitted and raise the matching APIError."""
        event_loop = asyncio.get_running_loop()

        def on_output(output: RequestOutput) -> None:
            if not event_loop.is_closed():
                event_loop.call_soon_threadsafe(self._queue.put_nowait, (output.seq_id, output))

        try:
            for prompt, params in zip(self.prompts, self.params):
                seq_id = await asyncio.to_thread(self.llm.loop.submit, self.variant, prompt, params, on_output, self.logprobs)
                self._index_of[seq_id] = len(self._index_of)
                self._unfinished.add(seq_id)
        except QueueFullError as exc:
            self.cancel()
            self.metrics.rejections.labels("429").inc()
            raise APIError(429, str(exc), code="queue_full", headers={"Retry-After": str(retry_after_seconds)}) from exc
        except EngineStoppedError as exc:
            self.cancel()
            raise APIError(503, str(exc), code="shutting_down") from exc
        except ValueError as exc:
            self.cancel()
            raise APIError(400, str(exc), param="prompt", code="invalid_prompt") from exc

    async def outputs(self, disconnected: Callable[[], Awaitable[bool]] | None = None) -> AsyncIterator[tuple[int, RequestOutput]]:
        try:
            while self._unfinished:
                try:
                    seq_id, output = await asyncio.wait_for(self._queue.get(), DISCONNECT_POLL_SECONDS)
                except TimeoutError:
                    if disconnected is not None and await disconnected():
                        return
                    continue
                if output.finished:
                    self._unfinished.discard(seq_id)
                    self.metrics.observe_finished(output)
                yield self._index_of[seq_id], output
        finally:
            self.cancel()

    def cancel(self) -> None:
        for seq_id in self._unfinished:
            self.llm.loop.abort(seq_id)
        self._unfinished.clear()
