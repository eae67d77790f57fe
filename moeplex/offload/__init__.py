"""Expert offloading: tiers under byte budgets, request-level tracing, prediction, prefetch, eviction policies.

Import from the modules (`moeplex.offload.loading`, `.pool`, `.policies`, ...); this package file stays
empty so that option parsers can import `moeplex.offload.bench_options` without torch.
"""
