"""The tiny demo family's two stores, built on first use: consolidated (what `make run` serves) and identity."""

from __future__ import annotations

from pathlib import Path

DEMO_STORE_BUDGET = "2x"


def demo_store(budget: str = DEMO_STORE_BUDGET) -> Path:
    """The tiny demo family consolidated (quality-aware, `budget`) into a store; built if missing."""
    from moeplex.consolidate.command import run_consolidate
    from moeplex.demo import build_demo_family

    family = build_demo_family()
    store = family.root / f"store-{budget}"
    if not (store / "manifest.json").is_file():
        print(f"consolidating the demo family into {store} (budget {budget} of one model)", flush=True)
        run_consolidate(family.spec_file, budget, store)
    return store


def identity_store() -> Path:
    """The tiny demo family's identity store: every checkpoint's experts, byte-identical ones once; built if missing."""
    from moeplex.consolidate.family_spec import load_family_spec
    from moeplex.demo import build_demo_family
    from moeplex.store.writer import identity_store as write_identity_store

    demo = build_demo_family()
    out = demo.root / "serve-bench-store"
    if not (out / "manifest.json").is_file():
        print(f"writing the demo family's identity store to {out}", flush=True)
    return write_identity_store(load_family_spec(demo.spec_file), out)
