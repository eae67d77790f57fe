"""Which experts the next layers will need: trace matching, router look-ahead, and both combined.

Every predictor returns, for each target layer, the probability [E] that the running batch of T
tokens uses each expert there.
"""

from __future__ import annotations

import torch

from moeplex.model.ops import linear, unit_rms
from moeplex.offload.tracing import ActivationTracer


def batch_need(per_token: torch.Tensor, tokens: int) -> torch.Tensor:
    """Probability that at least one of `tokens` independent tokens picks each expert, from per-token odds."""
    if tokens == 1:  # a decode step of one sequence: the odds themselves
        return per_token.clamp(0.0, 1.0)
    return 1.0 - (1.0 - per_token.clamp(0.0, 1.0)) ** tokens


class TraceMatcher:
    """Predicts from the library traces most similar (cosine) to the running request's partial matrix.

    The request's own recency-weighted matrix counts as one more match of similarity 1, so a request
    that keeps choosing the same experts is predicted from itself even with an empty library. Matches
    weigh similarity ** sharpness: only close ones move the prediction away from the request's own.

    The library's matches are chosen again once per forward pass (every `refresh_records` records of
    the tracer, by default its number of layers) and when a request begins: within a pass the partial
    matrix gains one layer's counts and the similarities barely move, while choosing them costs more
    host time than the rest of the prediction. The request's own row, which changes at every layer,
    is blended in at every call.
    """

    def __init__(self, tracer: ActivationTracer, top_k: int, matches: int = 8, sharpness: float = 4.0, refresh_records: int | None = None):
        self.tracer, self.top_k, self.matches, self.sharpness = tracer, top_k, matches, sharpness
        self.refresh_records = refresh_records or tracer.library.num_layers
        self._computed: tuple[int, torch.Tensor] | None = None  # (tracer version, per_token) of the last call
        self._library_part: tuple[int, int, torch.Tensor, torch.Tensor] | None = None  # (request, records, weighted sum, weight)

    def per_token(self) -> torch.Tensor:
        """[L, E] probability that one token of the running request picks each expert at each layer."""
        if self._computed is None or self._computed[0] != self.tracer.version:
            self._computed = (self.tracer.version, self._match())
        return self._computed[1]

    def _match(self) -> torch.Tensor:
        summed, weight = self._library_matches()  # [L, E], [L, 1]
        recent = self.tracer.recent  # [L, E]
        own_tokens = recent.sum(-1, keepdim=True)  # [L, 1] (times k)
        own = (own_tokens > 0).float()  # the request's own row, similarity 1, where it has seen the layer
        total = weight + own
        matched = (summed + recent / own_tokens.clamp(min=1) * own) / total.clamp(min=1e-12) * self.top_k
        return torch.where(total > 0, matched, self.top_k / recent.shape[1])

    def _library_matches(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The best library matches' per-token rows summed by weight [L, E], and their weight per layer [L, 1]."""
        tracer, part = self.tracer, self._library_part
        if part is not None and part[0] == tracer.requests and tracer.records - part[1] < self.refresh_records:
            return part[2], part[3]
        partial = tracer.matrix  # [L, E]
        library = tracer.library.matrices(tracer.variant)  # [N, L, E]
        if library.shape[0] == 0 or partial.sum() == 0:
            summed, weight = torch.zeros_like(partial), torch.zeros(partial.shape[0], 1)
        else:
            similarity = torch.nn.functional.cosine_similarity(library.flatten(1), partial.flatten()[None], dim=1).clamp(min=0)  # [N]
            best = torch.topk(similarity, min(self.matches, similarity.numel()))
            rows = library[best.indices]  # [m, L, E]
            tokens = rows.sum(-1, keepdim=True)  # [m, L, 1] (times k)
            weights = best.values[:, None, None] ** self.sharpness * (tokens > 0)  # a match says nothing about layers it has not seen
            summed, weight = (rows / tokens.clamp(min=1) * weights).sum(0), weights.sum(0)
        self._library_part = (tracer.requests, tracer.records, summed, weight)
        return summed, weight

    def predict(self, layers: list[int], tokens: int) -> torch.Tensor:
        """[len(layers), E] probability that a batch of `tokens` tokens needs each expert."""
        return batch_need(self.per_token()[layers], tokens)


class RouterLookahead:
    """Applies later layers' routers to the current layer's router input, or to the layer's output.

    What it does exactly: at layer l the runtime hands the expert door x_l = mlp_norm_l(h) [T, H]; the
    prediction for layer l+d is softmax(router_{l+d} x_l), i.e. the residual stream is assumed not to
    change between the layers (it changes little per layer). A token is taken to pick the look-ahead's
    own top-k experts for sure and any other expert with chance min(1, k * router probability): the
    router's real choice is a top-k, and k * probability alone under-predicts it wherever routing is
    flat (next-layer recall 0.60 -> 0.77 on the tiny demo family, 0.52 -> 0.68 on the bench family,
    `moeplex bench offload`, docs/offloading.md).

    Once layer l has run, `predict_from_residual` predicts later layers from the residual stream after
    it, normalized as each target layer's own MLP norm would: for the next layer only its attention is
    then missing from its router input (next-layer recall 0.77 -> 0.85 on the tiny demo family, 0.68 ->
    0.72 on the bench family, `moeplex bench offload`). Each target's norm weight is folded into its
    router once, so the residual is normalized once for all targets and they run as one matmul.
    """

    def __init__(self, routers: list[torch.Tensor | None], top_k: int, mlp_norms: list[torch.Tensor] | None = None, eps: float = 1e-6):
        self.routers, self.top_k = routers, top_k  # per layer [E, H], None for dense layers
        self.mlp_norms, self.eps = mlp_norms, eps  # per layer [H]: what turns a residual into that layer's router input
        self._stacked: dict[tuple[int, ...], torch.Tensor] = {}  # target layers -> their routers as one [W*E, H] matrix
        self._stacked_normed: dict[tuple[int, ...], torch.Tensor] = {}  # the same with each router scaled by its layer's MLP norm

    def predict(self, hidden: torch.Tensor, layers: list[int]) -> torch.Tensor:
        """[len(layers), E] probability that the batch hidden [T, H] needs each expert, on the CPU (like the traces).

        All target layers' routers run as one matmul (one call per layer cost more host time than the math).
        """
        return self._need(hidden, layers).cpu()

    def predict_from_residual(self, residual: torch.Tensor, layers: list[int]) -> torch.Tensor:
        """[len(layers), E] probability that the batch needs each expert at each layer, from the residual stream [T, H].

        rms_norm(residual, norm) @ router.T is computed as unit_rms(residual) @ (router * norm).T.
        """
        if self.mlp_norms is None:
            raise ValueError("predicting from the residual stream needs the layers' MLP norms")
        key = tuple(layers)
        routers = self._stacked_normed.get(key)
        if routers is None:
            routers = self._stacked_normed[key] = torch.cat([self.routers[layer] * self.mlp_norms[layer] for layer in layers])
        unit = unit_rms(residual, self.eps)
        return self._need_from_logits(linear(unit, routers), len(layers)).cpu()

    def _need(self, router_input: torch.Tensor, layers: list[int]) -> torch.Tensor:
        """[W, E] for the W target layers, from router_input [T, H]."""
        key = tuple(layers)
        routers = self._stacked.get(key)
        if routers is None:
            routers = self._stacked[key] = torch.cat([self.routers[layer] for layer in layers])  # [W*E, H]
        return self._need_from_logits(linear(router_input, routers), len(layers))

    def _need_from_logits(self, stacked_logits: torch.Tensor, targets: int) -> torch.Tensor:
        """[W, E] from the W target layers' router logits side by side [T, W*E]."""
        logits = stacked_logits.float().unflatten(-1, (targets, -1))  # [T, W, E]
        probs = torch.softmax(logits, dim=-1)
        chosen = torch.topk(probs, self.top_k, dim=-1).indices  # [T, W, k]
        picks = (self.top_k * probs).clamp(max=1.0).scatter(-1, chosen, 1.0)  # [T, W, E]
        if picks.shape[0] == 1:  # one token: its own odds
            return picks[0]
        return 1.0 - torch.prod(1.0 - picks, dim=0)


class CombinedPredictor:
    """lookahead_weight * router look-ahead + (1 - lookahead_weight) * trace matching, or either one alone.

    When both are on, layers of the next token (the window wraps past the last layer) use trace
    matching alone: their router input does not exist yet. Look-ahead alone guesses them from the
    current token's hidden state.
    """

    def __init__(self, matcher: TraceMatcher | None, lookahead: RouterLookahead | None, lookahead_weight: float = 0.7):
        if matcher is None and lookahead is None:
            raise ValueError("a predictor needs trace matching, router look-ahead or both")
        self.matcher, self.lookahead, self.lookahead_weight = matcher, lookahead, lookahead_weight
        self._weights: dict[tuple[bool, ...], torch.Tensor] = {}  # same_token -> [W, 1] look-ahead weight per target

    @property
    def reads_residuals(self) -> bool:
        """Whether `predict_from_residual` works (router look-ahead with the layers' MLP norms)."""
        return self.lookahead is not None and self.lookahead.mlp_norms is not None

    def predict(self, hidden: torch.Tensor, layers: list[int], same_token: list[bool]) -> torch.Tensor:
        """[len(layers), E] need probabilities for the target layers from a router input hidden [T, H];
        same_token[i]: layers[i] is still this token's."""
        if self.lookahead is None:
            return self.matcher.predict(layers, hidden.shape[0])
        return self._blend(self.lookahead.predict(hidden, layers), layers, same_token, hidden.shape[0])

    def predict_from_residual(self, residual: torch.Tensor, layers: list[int]) -> torch.Tensor:
        """The same for later layers of this token, from the residual stream [T, H] after a layer (needs `reads_residuals`)."""
        return self._blend(self.lookahead.predict_from_residual(residual, layers), layers, [True] * len(layers), residual.shape[0])

    def _blend(self, ahead: torch.Tensor, layers: list[int], same_token: list[bool], tokens: int) -> torch.Tensor:
        if self.matcher is None:
            return ahead
        key = tuple(same_token)
        weight = self._weights.get(key)
        if weight is None:
            weight = self._weights[key] = torch.tensor([self.lookahead_weight if same else 0.0 for same in same_token])[:, None]
        return torch.lerp(self.matcher.predict(layers, tokens), ahead, weight)
