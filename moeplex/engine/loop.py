"""EngineLoop: one thread that owns the engine, takes requests and cancellations from any thread, delivers outputs."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from moeplex.engine.engine import Engine, EngineStats
from moeplex.engine.outputs import RequestOutput
from moeplex.model.sampling import SamplingParams

logger = logging.getLogger(__name__)

OutputCallback = Callable[[RequestOutput], None]


class QueueFullError(RuntimeError):
    """The engine already holds max_pending_requests unfinished sequences."""


class EngineStoppedError(RuntimeError):
    """The loop is stopping or stopped and takes no new requests."""


@dataclass(frozen=True)
class _Submit:
    variant: str
    prompt_ids: list[int]
    params: SamplingParams
    logprobs: int | None
    on_output: OutputCallback
    accepted: "queue.Queue[int | Exception]"


@dataclass(frozen=True)
class _Abort:
    seq_id: int


@dataclass(frozen=True)
class _Call:
    fn: Callable[[Engine], object]
    done: "queue.Queue[tuple[bool, object]]"


@dataclass(frozen=True)
class _Stop:
    deadline: float | None  # time.monotonic() after which unfinished sequences are aborted


class EngineLoop:
    """Steps the engine whenever it has work; other threads talk to it through a command queue.

    Callbacks run on the loop thread and must be quick (hand the output to another thread or loop).
    """

    def __init__(self, engine: Engine):
        self.engine = engine
        self._commands: queue.Queue = queue.Queue()
        self._callbacks: dict[int, OutputCallback] = {}
        self._accepting = True
        self._stats = engine.stats()
        self._thread = threading.Thread(target=self._run, name="moeplex-engine", daemon=True)
        self._thread.start()

    def submit(self, variant: str, prompt_ids: list[int], params: SamplingParams, on_output: OutputCallback, logprobs: int | None = None) -> int:
        """Queue a sequence and return its id; ValueError for a bad request, QueueFullError when full."""
        if not self._accepting:
            raise EngineStoppedError("the engine is shutting down")
        accepted: queue.Queue = queue.Queue(maxsize=1)
        self._commands.put(_Submit(variant, list(prompt_ids), params, logprobs, on_output, accepted))
        result = self._wait_for(accepted)
        if isinstance(result, Exception):
            raise result
        return result

    def _wait_for(self, accepted: queue.Queue):
        while True:
            try:
                return accepted.get(timeout=0.5)
            except queue.Empty:
                if not self._thread.is_alive():
                    raise EngineStoppedError("the engine has stopped") from None

    def abort(self, seq_id: int) -> None:
        self._commands.put(_Abort(seq_id))

    def call(self, fn: Callable[[Engine], object]):
        """Run fn(engine) on the loop thread between two steps and return its result (or raise its exception)."""
        done: queue.Queue = queue.Queue(maxsize=1)
        self._commands.put(_Call(fn, done))
        succeeded, value = self._wait_for(done)
        if not succeeded:
            raise value
        return value

    @property
    def stopped(self) -> bool:
        return not self._thread.is_alive()

    def stats(self) -> EngineStats:
        """Counters as of the last step (read without stopping the loop)."""
        return self._stats

    def stop(self, drain_timeout: float | None = None) -> None:
        """Refuse new requests, let unfinished ones complete (up to drain_timeout seconds), then stop the thread."""
        self._accepting = False
        self._commands.put(_Stop(None if drain_timeout is None else time.monotonic() + drain_timeout))
        self._thread.join()
        self.engine.close()

    def _run(self) -> None:
        stopping, deadline = False, None
        while True:
            block = not self.engine.has_work and not stopping
            try:
                command = self._commands.get(block=block)
            except queue.Empty:
                command = None
            if isinstance(command, _Stop):
                stopping, deadline = True, command.deadline
            elif command is not None:
                self._handle(command)
                continue
            if stopping and (not self.engine.has_work or (deadline is not None and time.monotonic() >= deadline)):
                self._abort_all()
                return
            self._step()

    def _handle(self, command) -> None:
        if isinstance(command, _Call):
            try:
                command.done.put((True, command.fn(self.engine)))
            except Exception as exc:  # handed to the caller's thread
                command.done.put((False, exc))
            self._stats = self.engine.stats()
            return
        if isinstance(command, _Abort):
            self._deliver(self.engine.abort(command.seq_id))
            self._stats = self.engine.stats()
            return
        pending = self.engine.num_unfinished
        if pending >= self.engine.config.max_pending_requests:
            command.accepted.put(QueueFullError(f"{pending} requests are pending; try again later"))
            return
        try:
            seq_id = self.engine.add_request(command.variant, command.prompt_ids, command.params, command.logprobs)
        except ValueError as exc:
            command.accepted.put(exc)
            return
        self._callbacks[seq_id] = command.on_output
        self._stats = self.engine.stats()
        command.accepted.put(seq_id)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception:  # a failed step must not leave clients waiting forever
            logger.exception("engine step failed; aborting every unfinished sequence")
            self._abort_all()
            return
        self._stats = self.engine.stats()
        for output in outputs:
            self._deliver(output)

    def _deliver(self, output: RequestOutput | None) -> None:
        if output is None:
            return
        callback = self._callbacks.pop(output.seq_id, None) if output.finished else self._callbacks.get(output.seq_id)
        if callback is None:
            return
        try:
            callback(output)
        except Exception:  # a broken listener loses its sequence, never the engine thread
            logger.exception("output callback of sequence %d failed; cancelling it", output.seq_id)
            if not output.finished:
                self._callbacks.pop(output.seq_id, None)
                self.engine.abort(output.seq_id)

    def _abort_all(self) -> None:
        for seq_id in list(self._callbacks):
            self._deliver(self.engine.abort(seq_id))
        self._stats = self.engine.stats()

