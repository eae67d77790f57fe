"""The demo families' stores, built on first use: the tiny family consolidated (what `make run` serves) and as an
identity store, and the bench family's base alone."""

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


def bench_base_store() -> Path:
    """An identity store of the bench demo family's base alone (untrained, bench-size); built, once, if missing."""
    from moeplex.consolidate.family_spec import FamilySpec
    from moeplex.demo import build_demo_family
    from moeplex.store.writer import identity_store as write_identity_store

    demo = build_demo_family(size="bench")
    return write_identity_store(FamilySpec("bench-offload", base=None, variants={"base": demo.base}), demo.root / "offload-bench-store")
