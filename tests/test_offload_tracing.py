"""Activation tracing, the bounded trace library and its files, predictors and their scoring."""

import pytest
import torch

from moeplex.errors import MoeplexError
from moeplex.offload.evaluation import PredictionScorer
from moeplex.offload.prediction import (
    CombinedPredictor,
    RouterLookahead,
    TraceMatcher,
    batch_need,
)
from moeplex.offload.tracing import ActivationTracer, TraceLibrary

LAYERS, EXPERTS, TOP_K = 3, 6, 2


def random_choices(generator, tokens):
    """[T, k] distinct expert ids per token."""
    return torch.stack([torch.randperm(EXPERTS, generator=generator)[:TOP_K] for _ in range(tokens)])


def test_tracer_counts_choices_per_layer_and_files_a_trace_when_the_request_ends():
    generator = torch.Generator().manual_seed(21)
    library = TraceLibrary(LAYERS, EXPERTS)
    tracer = ActivationTracer(library)
    tracer.begin("python")
    expected = torch.zeros(LAYERS, EXPERTS)
    for layer in [0, 1, 2, 0, 1, 2]:
        ids = random_choices(generator, 3)
        tracer.record(layer, ids)
        expected[layer] += torch.bincount(ids.flatten(), minlength=EXPERTS).float()
    assert len(library) == 0
    tracer.end()
    assert len(library) == 1
    assert torch.equal(library.matrices("python")[0], expected)


def test_library_is_bounded_keeps_the_newest_and_round_trips_through_files(tmp_path):
    generator = torch.Generator().manual_seed(22)
    library = TraceLibrary(LAYERS, EXPERTS, capacity=3)
    added = [(f"v{i % 2}", torch.rand(LAYERS, EXPERTS, generator=generator) * 5) for i in range(5)]
    for variant, matrix in added:
        library.add(variant, matrix)
    assert len(library) == 3
    assert torch.equal(library.matrices(), torch.stack([m for _, m in added[2:]]))
    assert torch.equal(library.matrices("v1"), added[3][1][None])
    assert torch.equal(library.matrices("unknown"), library.matrices())  # no traces of it: all traces
    library.save(tmp_path / "traces")
    loaded = TraceLibrary.load(tmp_path / "traces")
    assert loaded.capacity == 3
    assert torch.equal(loaded.matrices(), library.matrices())
    assert torch.equal(loaded.matrices("v0"), library.matrices("v0"))
    assert len(TraceLibrary.load(tmp_path / "traces", capacity=2)) == 2


def test_loading_a_missing_library_is_a_clear_error(tmp_path):
    with pytest.raises(MoeplexError, match="cannot read the trace library"):
        TraceLibrary.load(tmp_path / "nothing")


def pattern(experts_per_layer):
    matrix = torch.zeros(LAYERS, EXPERTS)
    for layer, experts in enumerate(experts_per_layer):
        matrix[layer, experts] = 10.0
    return matrix


def tracer_over(library, variant, partial):
    """A tracer whose running request has recorded `partial` [L, E] (counts of one visit per layer)."""
    tracer = ActivationTracer(library)
    tracer.begin(variant)
    tracer.matrix, tracer.recent = partial.clone(), partial.clone()
    return tracer


def test_trace_matching_predicts_the_later_layers_of_the_most_similar_traces():
    library = TraceLibrary(LAYERS, EXPERTS)
    first, second = pattern([[0, 1], [2, 3], [4, 5]]), pattern([[4, 5], [0, 1], [2, 3]])
    for _ in range(3):
        library.add("v", first)
        library.add("v", second)
    partial = torch.zeros(LAYERS, EXPERTS)
    partial[0, [4, 5]] = 1.0  # so far, this request looks like the second pattern
    predicted = TraceMatcher(tracer_over(library, "v", partial), TOP_K, matches=3).predict([1, 2], tokens=1)  # [2, E]
    assert set(torch.topk(predicted[0], 2).indices.tolist()) == {0, 1}
    assert set(torch.topk(predicted[1], 2).indices.tolist()) == {2, 3}
    assert predicted[0, 0] > 0.9 and predicted[0, 4] < 0.1


def test_trace_matching_weighs_the_requests_recent_tokens_most():
    generator = torch.Generator().manual_seed(25)
    tracer = ActivationTracer(TraceLibrary(LAYERS, EXPERTS), decay=0.5)
    tracer.begin("v")
    for _ in range(4):
        tracer.record(1, torch.tensor([[0, 1]]))
    tracer.record(1, torch.tensor([[2, 3]]))
    tracer.record(0, random_choices(generator, 1))
    per_token = TraceMatcher(tracer, TOP_K).per_token()
    assert tracer.matrix[1, 0] == 4 and tracer.matrix[1, 2] == 1
    assert per_token[1, 2] > per_token[1, 0]  # the latest token outweighs four older ones
    assert per_token[1].sum() == pytest.approx(TOP_K)
    assert torch.allclose(per_token[2], torch.full((EXPERTS,), TOP_K / EXPERTS))  # nothing seen there: uniform


def test_trace_matching_chooses_library_matches_once_per_pass_and_the_own_row_at_every_layer():
    generator = torch.Generator().manual_seed(31)
    library = TraceLibrary(LAYERS, EXPERTS)
    for _ in range(5):
        library.add("v", torch.rand(LAYERS, EXPERTS, generator=generator) * 4)
    tracer = ActivationTracer(library)
    tracer.begin("v")
    matcher = TraceMatcher(tracer, TOP_K, matches=2)
    tracer.record(0, random_choices(generator, 1))
    first = matcher.per_token().clone()
    tracer.record(1, random_choices(generator, 1))
    within_pass = matcher.per_token()
    assert torch.equal(within_pass[2], first[2])  # nothing of the request's own at layer 2 yet: the same matches
    assert not torch.allclose(within_pass[1], first[1])  # the own row took layer 1's choice at once
    for layer in range(LAYERS):  # a whole pass later the matches are chosen again
        tracer.record(layer, random_choices(generator, 1))
    assert torch.allclose(matcher.per_token(), TraceMatcher(tracer, TOP_K, matches=2).per_token())


def test_trace_matching_with_an_empty_library_and_request_is_uniform():
    per_token = TraceMatcher(ActivationTracer(TraceLibrary(LAYERS, EXPERTS)), TOP_K).per_token()
    assert torch.allclose(per_token, torch.full((LAYERS, EXPERTS), TOP_K / EXPERTS))


def test_batch_need_grows_with_the_number_of_tokens():
    per_token = torch.tensor([0.1, 0.5])
    assert torch.allclose(batch_need(per_token, 1), per_token)
    assert torch.allclose(batch_need(per_token, 2), torch.tensor([0.19, 0.75]))


def test_router_lookahead_applies_the_later_layers_router_to_the_current_input():
    generator = torch.Generator().manual_seed(23)
    hidden_size = 16
    routers = [torch.randn(EXPERTS, hidden_size, generator=generator) * 3 for _ in range(LAYERS)]
    hidden = torch.randn(1, hidden_size, generator=generator)
    predicted = RouterLookahead(routers, TOP_K).predict(hidden, [2])[0]  # [E]
    chosen = set(torch.topk(routers[2] @ hidden[0], TOP_K).indices.tolist())
    assert {e for e in range(EXPERTS) if predicted[e] == pytest.approx(1.0)} == chosen, "the look-ahead's own top-k is certain"
    others = torch.tensor([e not in chosen for e in range(EXPERTS)])
    probs = torch.softmax(routers[2] @ hidden[0], dim=-1)
    assert torch.allclose(predicted[others], (TOP_K * probs[others]).clamp(max=1.0), atol=1e-6), "the rest: k x router probability"


def test_router_lookahead_over_several_layers_equals_each_layer_alone():
    generator = torch.Generator().manual_seed(24)
    hidden_size = 16
    routers = [torch.randn(EXPERTS, hidden_size, generator=generator) * 3 for _ in range(LAYERS)]
    hidden = torch.randn(2, hidden_size, generator=generator)  # a batch: the need is over both tokens
    lookahead = RouterLookahead(routers, TOP_K)
    together = lookahead.predict(hidden, [2, 1])
    assert together.shape == (2, EXPERTS)
    assert torch.allclose(together[0], lookahead.predict(hidden, [2])[0])
    assert torch.allclose(together[1], lookahead.predict(hidden, [1])[0])
    assert not torch.allclose(together[0], together[1])


def test_router_lookahead_from_the_residual_uses_the_target_layers_own_norm():
    generator = torch.Generator().manual_seed(25)
    hidden_size = 16
    routers = [torch.randn(EXPERTS, hidden_size, generator=generator) * 3 for _ in range(LAYERS)]
    norms = [torch.rand(hidden_size, generator=generator) + 0.5 for _ in range(LAYERS)]
    residual = torch.randn(3, hidden_size, generator=generator) * 7
    lookahead = RouterLookahead(routers, TOP_K, norms, eps=1e-6)
    router_input = residual * torch.rsqrt(residual.pow(2).mean(-1, keepdim=True) + 1e-6) * norms[2]
    from_residual = lookahead.predict_from_residual(residual, [2, 1])
    assert torch.allclose(from_residual[0], lookahead.predict(router_input, [2])[0], atol=1e-6)
    assert torch.allclose(from_residual[1], lookahead.predict(router_input / norms[2] * norms[1], [1])[0], atol=1e-6)
    other_norm = lookahead.predict(residual * torch.rsqrt(residual.pow(2).mean(-1, keepdim=True)) * norms[1], [2])[0]
    assert not torch.allclose(from_residual[0], other_norm)
    with pytest.raises(ValueError, match="MLP norms"):
        RouterLookahead(routers, TOP_K).predict_from_residual(residual, [2])


def test_combined_prediction_uses_trace_matching_alone_for_the_next_token():
    generator = torch.Generator().manual_seed(24)
    library = TraceLibrary(LAYERS, EXPERTS)
    library.add("v", pattern([[0, 1], [2, 3], [4, 5]]))
    matcher = TraceMatcher(tracer_over(library, "v", pattern([[0, 1], [], []])), TOP_K)
    lookahead = RouterLookahead([torch.randn(EXPERTS, 8, generator=generator) for _ in range(LAYERS)], TOP_K)
    combined = CombinedPredictor(matcher, lookahead, lookahead_weight=0.6)
    hidden = torch.randn(2, 8, generator=generator)
    got = combined.predict(hidden, [2, 0], same_token=[True, False])
    matched = matcher.predict([2, 0], tokens=2)
    ahead = lookahead.predict(hidden, [2, 0])
    assert torch.allclose(got[0], 0.6 * ahead[0] + 0.4 * matched[0])
    assert torch.allclose(got[1], matched[1])


def test_combined_prediction_from_the_residual_blends_like_at_the_router():
    generator = torch.Generator().manual_seed(27)
    library = TraceLibrary(LAYERS, EXPERTS)
    library.add("v", pattern([[0, 1], [2, 3], [4, 5]]))
    matcher = TraceMatcher(tracer_over(library, "v", pattern([[0, 1], [], []])), TOP_K)
    norms = [torch.rand(8, generator=generator) + 0.5 for _ in range(LAYERS)]
    lookahead = RouterLookahead([torch.randn(EXPERTS, 8, generator=generator) for _ in range(LAYERS)], TOP_K, norms)
    combined = CombinedPredictor(matcher, lookahead, lookahead_weight=0.6)
    assert combined.reads_residuals and not CombinedPredictor(matcher, None).reads_residuals
    residual = torch.randn(2, 8, generator=generator) * 5
    got = combined.predict_from_residual(residual, [1, 2])
    expected = 0.6 * lookahead.predict_from_residual(residual, [1, 2]) + 0.4 * matcher.predict([1, 2], tokens=2)
    assert torch.allclose(got, expected, atol=1e-6)


def test_scorer_counts_precision_and_recall_by_distance():
    scorer = PredictionScorer(num_layers=2, threshold=0.5)
    window = torch.tensor([[0.9, 0.8, 0.1, 0.0, 0.0, 0.6]])  # predicts {0, 1, 5}
    scorer.observe(0, torch.tensor([[0, 2]]))
    scorer.expect(0, [1], [1], window)
    scorer.observe(1, torch.tensor([[0, 1]]))  # hit 0 and 1; 5 was wrong
    scorer.expect(1, [0], [1], window)  # for layer 0 of the next token
    scorer.observe(0, torch.tensor([[3, 4]]))  # all wrong, both missed
    report = scorer.report()[1]
    assert report["precision"] == pytest.approx(2 / 6)
    assert report["recall"] == pytest.approx(2 / 4)
    assert report["scored"] == 4


def test_scorer_revise_replaces_the_earlier_prediction_at_that_distance():
    scorer = PredictionScorer(num_layers=3, threshold=0.5)
    scorer.observe(0, torch.tensor([[0, 2]]))
    scorer.expect(0, [1, 2], [1, 2], torch.tensor([[1.0, 1.0, 0, 0, 0, 0], [0, 0, 1.0, 1.0, 0, 0]]))  # layer 1: {0, 1}
    scorer.revise(0, 1, 1, torch.tensor([0, 0, 0, 0.9, 0.8, 0]))  # layer 1: {3, 4}
    scorer.observe(1, torch.tensor([[3, 4]]))
    scorer.observe(2, torch.tensor([[2, 3]]))
    report = scorer.report()
    assert report[1] == {"precision": 1.0, "recall": 1.0, "scored": 2}, "only the revised prediction is scored"
    assert report[2]["recall"] == 1.0


def test_forecaster_revises_the_windows_layers_of_the_same_token_from_the_residual():
    from moeplex.offload.forecast import ExpertForecaster

    generator = torch.Generator().manual_seed(26)
    hidden_size = 8
    routers = [torch.randn(EXPERTS, hidden_size, generator=generator) for _ in range(LAYERS)]
    norms = [torch.rand(hidden_size, generator=generator) + 0.5 for _ in range(LAYERS)]
    lookahead = RouterLookahead(routers, TOP_K, norms, eps=1e-6)
    forecaster = ExpertForecaster((True,) * LAYERS, ActivationTracer(TraceLibrary(LAYERS, EXPERTS)), CombinedPredictor(None, lookahead), window=2)
    forecaster.begin_request("v")
    hidden, residual = torch.randn(2, hidden_size, generator=generator), torch.randn(2, hidden_size, generator=generator)
    forecaster.observe(0, hidden, random_choices(generator, 2))
    assert forecaster.revise(1, residual) is None, "layer 1 has not routed yet"
    revised = forecaster.revise(0, residual)
    assert torch.allclose(revised.window, lookahead.predict_from_residual(residual, [1, 2]))
    assert torch.allclose(revised.need[1:3], revised.window)
    before = forecaster.observe(1, hidden, random_choices(generator, 2)).window.clone()  # targets 2 and 0 (the next token's)
    revised = forecaster.revise(1, residual)
    assert torch.allclose(revised.window[0], lookahead.predict_from_residual(residual, [2])[0])
    assert torch.equal(revised.window[1], before[1]), "the next token's first layer keeps the prediction made at layer 1"
    forecaster.observe(2, hidden, random_choices(generator, 2))
    assert forecaster.revise(2, residual) is None, "the next token's layers are not predicted from this token"
