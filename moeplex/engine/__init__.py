"""The serving engine: sequences, scheduling policies, KV budget, backbone residency, the step loop, the LLM API."""

from moeplex.engine.config import EngineConfig
from moeplex.engine.engine import Engine
from moeplex.engine.llm import LLM
from moeplex.engine.loop import EngineLoop, EngineStoppedError, QueueFullError
from moeplex.engine.outputs import RequestOutput

__all__ = ["LLM", "Engine", "EngineConfig", "EngineLoop", "EngineStoppedError", "QueueFullError", "RequestOutput"]
