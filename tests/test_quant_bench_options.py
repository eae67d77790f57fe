"""`moeplex bench quant`'s options: which store the selection and frontier parts run on, and on how much held-out text."""

import argparse
from pathlib import Path

import pytest

import moeplex.demo.stores
from moeplex.quant.bench_options import TINY_HELDOUT_TOKENS_PER_DOMAIN, add_options, heldout_tokens_per_domain, store_parts_store


def parsed(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_options(parser)
    return parser.parse_args(list(argv))


@pytest.fixture
def demo_stores(monkeypatch):
    """The demo stores as named paths, so that no test builds a family."""
    monkeypatch.setattr(moeplex.demo.stores, "identity_store", lambda: Path("tiny-identity-store"))
    monkeypatch.setattr(moeplex.demo.stores, "bench_base_store", lambda: Path("bench-base-store"))


@pytest.mark.parametrize("argv,store", [
    ((), "tiny-identity-store"),
    (("--family", "tiny"), "tiny-identity-store"),
    (("--family", "bench"), "bench-base-store"),
    (("--family", "bench", "--store", "mine"), "mine"),
])
def test_the_store_parts_run_on_store_else_the_familys_demo_store(demo_stores, argv, store):
    assert store_parts_store(parsed(*argv)) == Path(store)


@pytest.mark.parametrize("argv,tokens", [
    ((), TINY_HELDOUT_TOKENS_PER_DOMAIN),
    (("--family", "bench"), None),  # the planner's default
    (("--store", "mine"), None),
    (("--family", "bench", "--heldout-tokens", "300"), 300),
])
def test_only_the_tiny_demo_store_scores_on_more_heldout_text_by_default(argv, tokens):
    assert heldout_tokens_per_domain(parsed(*argv)) == tokens


def test_an_unknown_family_is_refused(capsys):
    with pytest.raises(SystemExit):
        parsed("--family", "huge")
    assert "invalid choice: 'huge'" in capsys.readouterr().err
