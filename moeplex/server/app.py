"""The OpenAI-compatible FastAPI app: completions, chat completions, SSE streaming, models, health, metrics."""

from __future__ import annotations

import asyncio
import gc
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import Depends, FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from moeplex.engine import LLM, RequestOutput
from moeplex.engine.sequence import TokenLogprob
from moeplex.model.sampling import SamplingParams
from moeplex.server.errors import APIError, generation_failed, install_error_handlers
from moeplex.server.generation import GenerationJob
from moeplex.server.metrics import ServerMetrics
from moeplex.server.options import MIB
from moeplex.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ExpertBudgetRequest,
    SamplingFields,
)


@dataclass
class ServerSettings:
    api_key: str | None = None
    drain_timeout_seconds: float = 30.0
    retry_after_seconds: int = 1


@dataclass
class ServerState:
    """Shared by the request handlers: draining turns new requests away with 503 while running ones finish."""

    llm: LLM
    settings: ServerSettings
    metrics: ServerMetrics
    created: int = field(default_factory=lambda: int(time.time()))
    draining: bool = False

    def begin_drain(self) -> None:
        self.draining = True


def freeze_loaded_objects() -> None:
    """Take every object alive at start-up out of the garbage collector's walks (as vLLM does once loaded).

    The engine's weights and tables, the tokenizer and the imported modules live as long as the server;
    left in the oldest generation, every full collection walks them all again (about 160 ms for the tiny
    demo family's store on a 2-core VM), pausing engine steps and time to first token under load.
    """
    gc.collect()
    gc.freeze()


def create_app(llm: LLM, settings: ServerSettings | None = None, close_llm_on_shutdown: bool = True) -> FastAPI:
    if llm.tokenizer is None:
        raise ValueError("serving needs the store's tokenizer, and this store has none")
    settings = settings or ServerSettings()
    state = ServerState(llm, settings, ServerMetrics(llm.loop.stats))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        freeze_loaded_objects()
        yield
        state.begin_drain()
        if close_llm_on_shutdown:
            llm.close(settings.drain_timeout_seconds)

    app = FastAPI(title="moeplex", lifespan=lifespan)
    app.state.server = state
    install_error_handlers(app)

    async def authorized(request: Request) -> None:
        if settings.api_key is None:
            return
        header = request.headers.get("authorization", "")
        token = header[len("Bearer ") :] if header.startswith("Bearer ") else ""
        if not hmac.compare_digest(token.encode(), settings.api_key.encode()):
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')", code="invalid_api_key")

    async def accepting() -> None:
        if state.draining:
            raise APIError(503, "the server is shutting down", code="shutting_down")

    guarded = [Depends(authorized), Depends(accepting)]

    @app.get("/health", dependencies=[Depends(accepting)])
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.exposition(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models():
        data = [
            {"id": v, "object": "model", "created": state.created, "owned_by": "moeplex", "root": v, "parent": llm.parent_of(v)}
            for v in llm.variants
        ]
        return {"object": "list", "data": data}

    @app.post("/v1/completions", dependencies=guarded)
    async def completions(body: CompletionRequest, request: Request):
        variant = known_variant(llm, body.model)
        prompts = completion_prompts(llm, body.prompt)
        max_tokens = body.max_tokens if body.max_tokens is not None else 16
        for prompt in prompts:
            check_context(llm, len(prompt), max_tokens, "prompt")
        job = await start_job(state, body, variant, prompts, max_tokens, body.logprobs)
        response = CompletionFormat(llm, body, variant, [len(p) for p in prompts])
        return await respond(job, response, body, request)

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        variant = known_variant(llm, body.model)
        prompt = chat_prompt(llm, body)
        requested = body.max_completion_tokens or body.max_tokens
        max_tokens = requested if requested is not None else max(1, llm.engine.max_model_len - len(prompt))
        check_context(llm, len(prompt), max_tokens, "messages")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        job = await start_job(state, body, variant, [prompt], max_tokens, logprobs)
        response = ChatFormat(llm, body, variant, [len(prompt)])
        return await respond(job, response, body, request)

    @app.get("/admin/expert-budget", dependencies=[Depends(authorized)])
    async def expert_budget():
        return expert_budget_reply(llm)

    @app.put("/admin/expert-budget", dependencies=guarded)
    async def set_expert_budget(body: ExpertBudgetRequest):
        if llm.engine.offloaded is None:
            raise APIError(409, "every expert is resident: serve with --expert-budget-mib to change the budget live", code="offloading_off")
        try:
            await asyncio.to_thread(llm.set_expert_budget, int(body.mib * MIB))  # applied between two engine steps
        except ValueError as exc:
            raise APIError(400, str(exc), param="mib", code="invalid_parameter") from exc
        return expert_budget_reply(llm)

    return app


def expert_budget_reply(llm: LLM) -> dict:
    """The device budget for experts and the bytes resident now, in MiB (budget None: every expert resident)."""
    stats = llm.loop.stats()
    budget = stats.expert_budget_bytes
    return {"expert_budget_mib": None if budget is None else budget / MIB, "resident_mib": stats.expert_bytes["device"] / MIB}


def known_variant(llm: LLM, model: str) -> str:
    if model not in llm.variants:
        raise APIError(404, f"The model '{model}' does not exist (served: {', '.join(llm.variants)})", param="model", code="model_not_found")
    return model


def completion_prompts(llm: LLM, prompt) -> list[list[int]]:
    if isinstance(prompt, str):
        prompts = [llm.encode(prompt)]
    elif prompt and isinstance(prompt[0], str):
        prompts = [llm.encode(p) for p in prompt]
    elif prompt and isinstance(prompt[0], int):
        prompts = [list(prompt)]
    else:
        prompts = [list(p) for p in prompt]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise APIError(400, "prompt must not be empty", param="prompt", code="invalid_prompt")
    return prompts


def chat_prompt(llm: LLM, body: ChatCompletionRequest) -> list[int]:
    if llm.tokenizer.chat_template is None:
        raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions", param="messages")
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    text = llm.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return llm.encode(text)


def check_context(llm: LLM, prompt_tokens: int, max_tokens: int, param: str) -> None:
    limit = llm.engine.max_model_len
    if prompt_tokens + max_tokens > limit:
        raise APIError(
            400,
            f"This model's maximum context length is {limit} tokens. However, you requested {prompt_tokens + max_tokens} "
            f"tokens ({prompt_tokens} in the {param}, {max_tokens} for the completion).",
            param=param,
            code="context_length_exceeded",
        )


async def start_job(state: ServerState, body: SamplingFields, variant: str, prompts: list[list[int]], max_tokens: int, logprobs: int | None) -> GenerationJob:
    choice_prompts, choice_params = [], []
    for prompt in prompts:
        for choice in range(body.n):
            seed = None if body.seed is None else body.seed + choice
            params = SamplingParams(
                max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, seed=seed, stop=body.stop_strings(), ignore_eos=body.ignore_eos
            )
            choice_prompts.append(prompt)
            choice_params.append(params)
    job = GenerationJob(state.llm, state.metrics, variant, choice_prompts, choice_params, logprobs)
    await job.start(state.settings.retry_after_seconds)
    return job


async def respond(job: GenerationJob, response: "ResponseFormat", body: SamplingFields, request: Request):
    if body.stream:
        return StreamingResponse(sse_events(job, response, body), media_type="text/event-stream")
    final: dict[int, RequestOutput] = {}
    async for index, output in job.outputs(disconnected=request.is_disconnected):
        if output.finish_reason == "error":
            job.cancel()  # the other choices are of no use now
            return generation_failed(output.error).response()
        if output.finished:
            final[index] = output
    if len(final) < len(job.prompts):
        return APIError(499, "the client closed the request", code="client_closed_request").response()
    return response.full(final)


async def sse_events(job: GenerationJob, response: "ResponseFormat", body: SamplingFields) -> AsyncIterator[str]:
    final: dict[int, RequestOutput] = {}
    async for index, output in job.outputs():
        if output.finish_reason == "error":  # the status line is sent already: an error event ends the stream
            job.cancel()
            yield event(generation_failed(output.error).body())
            yield "data: [DONE]\n\n"
            return
        if index not in response.started:
            response.started.add(index)
            opening = response.opening_chunk(index)
            if opening is not None:
                yield event(opening)
        chunk = response.delta_chunk(index, output, body.stop_strings())
        if chunk is not None:
            yield event(chunk)
        if output.finished:
            final[index] = output
    if body.include_usage_chunk:
        yield event(response.chunk([], usage=response.usage(final)))
    yield "data: [DONE]\n\n"


def event(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def settled_text(text: str, finished: bool, stops: tuple[str, ...]) -> str:
    """The part of a running choice's text that can no longer change: not a possible stop-string prefix, no partial character."""
    if finished:
        return text
    keep = len(text) - max((len(s) - 1 for s in stops), default=0)
    return text[: max(0, keep)].rstrip("\ufffd")


class ResponseFormat:
    """Shapes engine outputs into one endpoint's response objects and stream chunks."""

    object_name = ""
    chunk_object_name = ""
    id_prefix = ""

    def __init__(self, llm: LLM, body: SamplingFields, variant: str, prompt_lengths: list[int]):
        self.llm, self.body, self.variant, self.prompt_lengths = llm, body, variant, prompt_lengths
        self.id = f"{self.id_prefix}{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.started: set[int] = set()
        self.sent_text: dict[int, int] = {}
        self.sent_logprobs: dict[int, int] = {}

    def token_text(self, token_id: int) -> str:
        return self.llm.tokenizer.decode([token_id])

    def usage(self, final: dict[int, RequestOutput]) -> dict:
        prompt_tokens = sum(self.prompt_lengths)
        completion_tokens = sum(len(o.token_ids) for o in final.values())
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}

    def chunk(self, choices: list[dict], usage: dict | None = None) -> dict:
        payload = {"id": self.id, "object": self.chunk_object_name, "created": self.created, "model": self.variant, "choices": choices}
        if usage is not None:
            payload["usage"] = usage
        return payload

    def full(self, final: dict[int, RequestOutput]) -> dict:
        choices = [self.full_choice(index, final[index]) for index in sorted(final)]
        return {"id": self.id, "object": self.object_name, "created": self.created, "model": self.variant, "choices": choices, "usage": self.usage(final)}

    def delta_chunk(self, index: int, output: RequestOutput, stops: tuple[str, ...]) -> dict | None:
        text = settled_text(output.text, output.finished, stops)
        start = self.sent_text.get(index, 0)
        delta, self.sent_text[index] = text[start:], max(start, len(text))
        first_logprob = self.sent_logprobs.get(index, 0)
        self.sent_logprobs[index] = len(output.logprobs)
        new_logprobs = list(output.logprobs[first_logprob:])
        if not delta and not output.finished and not new_logprobs:
            return None
        finish_reason = public_finish_reason(output)
        return self.chunk([self.delta_choice(index, delta, new_logprobs, finish_reason, start)])

    def opening_chunk(self, index: int) -> dict | None:
        return None

    def full_choice(self, index: int, output: RequestOutput) -> dict:
        raise NotImplementedError

    def delta_choice(self, index: int, delta: str, logprobs: list[TokenLogprob], finish_reason: str | None, text_offset: int) -> dict:
        raise NotImplementedError


def public_finish_reason(output: RequestOutput) -> str | None:
    return None if output.finish_reason is None else ("length" if output.finish_reason == "length" else "stop")


class CompletionFormat(ResponseFormat):
    object_name = chunk_object_name = "text_completion"
    id_prefix = "cmpl-"

    def logprobs(self, entries: list[TokenLogprob], text_offset: int) -> dict | None:
        if self.body.logprobs is None:
            return None
        tokens, offsets = [], []
        for entry in entries:
            offsets.append(text_offset)
            tokens.append(self.token_text(entry.token_id))
            text_offset += len(tokens[-1])
        return {
            "tokens": tokens,
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{self.token_text(t): lp for t, lp in e.top.items()} for e in entries],
            "text_offset": offsets,
        }

    def full_choice(self, index, output):
        return {"index": index, "text": output.text, "logprobs": self.logprobs(list(output.logprobs), 0), "finish_reason": public_finish_reason(output)}

    def delta_choice(self, index, delta, logprobs, finish_reason, text_offset):
        return {"index": index, "text": delta, "logprobs": self.logprobs(logprobs, text_offset), "finish_reason": finish_reason}


class ChatFormat(ResponseFormat):
    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"
    id_prefix = "chatcmpl-"

    def logprobs(self, entries: list[TokenLogprob]) -> dict | None:
        if not self.body.logprobs:
            return None

        def item(token_id: int, logprob: float) -> dict:
            text = self.token_text(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        return {"content": [item(e.token_id, e.logprob) | {"top_logprobs": [item(t, lp) for t, lp in e.top.items()]} for e in entries]}

    def opening_chunk(self, index):
        return self.chunk([{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}])

    def full_choice(self, index, output):
        message = {"role": "assistant", "content": output.text}
        return {"index": index, "message": message, "logprobs": self.logprobs(list(output.logprobs)), "finish_reason": public_finish_reason(output)}

    def delta_choice(self, index, delta, logprobs, finish_reason, text_offset):
        content = {"content": delta} if delta else {}
        return {"index": index, "delta": content, "logprobs": self.logprobs(logprobs), "finish_reason": finish_reason}
