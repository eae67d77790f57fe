"""moeplex: serve many fine-tuned variants of one Mixture-of-Experts LLM from one process."""

__version__ = "0.1.0"


def __getattr__(name: str):
    """`moeplex.LLM` imports the engine (and torch) only when first used, so `import moeplex` stays light."""
    if name == "LLM":
        from moeplex.engine.llm import LLM

        return LLM
    raise AttributeError(f"module 'moeplex' has no attribute '{name}'")
