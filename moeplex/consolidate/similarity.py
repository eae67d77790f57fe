"""How alike the variants' experts are: weight-space distances and output-space errors on calibration inputs."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from tqdm import tqdm

from moeplex.consolidate.calibration import ExpertInputs
from moeplex.consolidate.family_spec import OpenCheckpoint
from moeplex.store.materialize import materialize_expert
from moeplex.consolidate.plan import ExpertSource, Position



def relative_output_error(reference: torch.Tensor, approximate: torch.Tensor) -> float:
    """Mean row norm of the difference over mean row norm of the reference (both [n, H])."""
    return float((approximate - reference).norm(dim=-1).mean() / reference.norm(dim=-1).mean().clamp_min(1e-12))

class FamilyExperts:
    """Lazy, cached reads of any model's expert in a family (variants and base), by position."""

    def __init__(self, opened: dict[str, OpenCheckpoint], cache_size: int = 4096):
        self.opened = opened
        self.read = lru_cache(maxsize=cache_size)(self._read)

    def _read(self, position: Position) -> dict[str, torch.Tensor]:
        name, layer, expert = position
        checkpoint = self.opened[name]
        return checkpoint.family.read_expert(checkpoint.reader, checkpoint.spec, layer, expert)

    def spec(self, name: str):
        return self.opened[name].spec


@dataclass
class WeightDistances:
    """Per (layer, expert): pairwise L2 distance and cosine similarity [M, M] over models `names`."""

    names: tuple[str, ...]
    l2: dict[tuple[int, int], torch.Tensor]
    cosine: dict[tuple[int, int], torch.Tensor]

    def mean_pairwise_l2(self, layer: int, expert: int, among: tuple[str, ...]) -> float:
        idx = [self.names.index(n) for n in among]
        block = self.l2[(layer, expert)][idx][:, idx]
        count = len(idx) * (len(idx) - 1)
        return float(block.sum() / count) if count else 0.0


def weight_distances(experts: FamilyExperts, names: tuple[str, ...], progress: bool = True) -> WeightDistances:
    """L2 over the concatenated expert matrices (the published metric) and cosine, one position at a time."""
    spec = experts.spec(names[0])
    l2, cosine = {}, {}
    layers = [l for l, sparse in enumerate(spec.sparse_layers) if sparse]
    positions = [(l, e) for l in layers for e in range(spec.num_experts)]
    for layer, expert in tqdm(positions, desc="weight similarity", unit="position", disable=not progress):
        flat = torch.stack(
            [torch.cat([w.float().flatten() for w in experts.read((n, layer, expert)).values()]) for n in names]
        )  # [M, P]
        l2[(layer, expert)] = torch.cdist(flat, flat)
        unit = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)
        cosine[(layer, expert)] = unit @ unit.T
    return WeightDistances(names, l2, cosine)


class OutputErrorModel:
    """Relative output error ||E_v(x) - S(x)|| / ||E_v(x)|| of serving variant v's position by source S.

    x are the calibration inputs that reached that position in variant v. Routing frequencies weight
    the errors in the planners.
    """

    def __init__(self, experts: FamilyExperts, inputs: dict[str, ExpertInputs]):
        self.experts, self.inputs = experts, inputs
        self._cache: dict[tuple, float] = {}

    def frequency(self, variant: str, layer: int, expert: int) -> float:
        return self.inputs[variant].frequency[(layer, expert)]

    def error(self, variant: str, layer: int, expert: int, source: ExpertSource) -> float:
        key = (variant, layer, expert, source.members, source.weights)
        if key not in self._cache:
            self._cache[key] = self._measure(variant, layer, expert, source)
        return self._cache[key]

    def _measure(self, variant: str, layer: int, expert: int, source: ExpertSource) -> float:
        if source.members == ((variant, layer, expert),):
            return 0.0
        x = self.inputs[variant].inputs[(layer, expert)]  # [n, H] fp32
        if x.shape[0] == 0:
            return 0.0
        own = self.experts.read((variant, layer, expert))
        replacement = materialize_expert(source, self.experts.read)
        checkpoint = self.experts.opened[variant]
        y_own = checkpoint.family.expert_output(checkpoint.spec, own, x)
        y_new = checkpoint.family.expert_output(checkpoint.spec, replacement, x)
        return relative_output_error(y_own, y_new)
