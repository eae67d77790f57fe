"""Profile configurations of a store: each one's least-error-first precisions, decode tokens/s and perplexity.

Timing runs round-robin: each round times every configuration not measured yet once, in turn, so a slow
spell of a shared machine falls on all of them alike instead of on whichever ran during it. With an
expert budget (the device memory left after the backbones), a configuration whose experts do not fit
is timed with offloaded experts, as much of them resident as the budget holds.
"""

from __future__ import annotations

from collections.abc import Iterable

from tqdm import tqdm

from moeplex.bench.measure import median
from moeplex.planner.cache import MeasurementCache
from moeplex.planner.configurations import Configuration
from moeplex.planner.meter import StoreMeter
from moeplex.planner.pareto import Measurement
from moeplex.quant.bank_calibration import BankCalibration
from moeplex.quant.formats import UNQUANTIZED
from moeplex.quant.policies import LeastErrorFirst
from moeplex.quant.store_copies import write_quantized_copies


class Profiler:
    """Measures configurations with a StoreMeter; with a cache, reuses (and adds to) earlier runs' measurements.

    Which experts get int4 / int8 is chosen on calibration (training-split) text; perplexity is held-out.

    expert_budget: device bytes for experts; None holds every configuration's experts resident.
    """

    def __init__(self, meter: StoreMeter, cache: MeasurementCache | None = None, expert_budget: int | None = None):
        self.meter, self.cache, self.expert_budget = meter, cache, expert_budget
        self.calibration_texts = meter.calibration_texts()
        self.heldout = meter.heldout_texts()
        self.calibration = self._calibration()
        self.policy = LeastErrorFirst(self.calibration.errors, self.calibration.frequency)
        self.bytes_per_expert = meter.bytes_per_expert()
        self.backbone_bytes = meter.backbone_bytes()
        if expert_budget is not None and expert_budget < max(self.bytes_per_expert.values()):
            raise ValueError(f"an expert budget of {expert_budget} bytes holds no expert (one bf16 expert: "
                             f"{max(self.bytes_per_expert.values())} bytes)")

    @property
    def num_experts(self) -> int:
        return len(self.meter.expert_ids)

    def precisions(self, config: Configuration) -> dict[str, str]:
        """Expert id -> precision: int4, then int8, to the ids of least measured error x routing frequency."""
        return self.policy.choose(self.meter.expert_ids, config.quantized_counts)

    def expert_bytes(self, config: Configuration) -> int:
        """Bytes of every expert in the configuration's precisions."""
        return config.expert_bytes(self.bytes_per_expert)

    def offload_budget(self, config: Configuration) -> int | None:
        """The expert budget when the configuration's experts do not all fit in it, else None (all resident)."""
        if self.expert_budget is None or self.expert_bytes(config) <= self.expert_budget:
            return None
        return self.expert_budget

    def resident_bytes(self, config: Configuration) -> int:
        """Device bytes: the experts that are resident (all, or the budget's worth) and every backbone."""
        budget = self.offload_budget(config)
        return self.backbone_bytes + (self.expert_bytes(config) if budget is None else budget)

    def resident_fraction(self, config: Configuration) -> float:
        """Of the configuration's expert bytes, the share resident."""
        budget = self.offload_budget(config)
        return 1.0 if budget is None else budget / self.expert_bytes(config)

    def key(self, config: Configuration) -> str:
        budget = self.offload_budget(config)
        return config.key if budget is None else f"{config.key},expert_budget={budget}"

    def measure(self, configs: Iterable[Configuration]) -> list[Measurement]:
        """Each configuration's measurement: from the cache, or perplexity and then round-robin timing."""
        configs = list(configs)
        measured = {config: self.cache.measurement(self.key(config)) if self.cache else None for config in configs}
        missing = [config for config, found in measured.items() if found is None or "kl" not in found]
        if missing:
            quality = self._qualities(missing)
            tokens_per_s = self._decode_rates(missing)
            for config in missing:
                ppl, kl = quality[config]
                measured[config] = {"tokens_per_s": tokens_per_s[config], "ppl": ppl, "kl": kl}
                if self.cache:
                    self.cache.add_measurement(self.key(config), measured[config])
        self.meter.use({})
        return [
            Measurement(config, measured[config]["tokens_per_s"], measured[config]["ppl"], self.resident_bytes(config),
                        self.resident_fraction(config), measured[config]["kl"])
            for config in configs
        ]

    def _qualities(self, configs: list[Configuration]) -> dict[Configuration, tuple[float, float]]:
        """(held-out perplexity, KL from all bf16) of each configuration."""
        quality = {}
        for config in tqdm(configs, desc="perplexity and KL", unit="config"):
            self.meter.use(self.precisions(config))
            quality[config] = self.meter.quality(self.heldout)
        return quality

    def _decode_rates(self, configs: list[Configuration]) -> dict[Configuration, float]:
        """Decode tokens/s = decoded tokens / (median full run - median prefill-only run), over the rounds."""
        self._write_copies([config for config in configs if self.offload_budget(config) is not None])
        rounds = self.meter.settings.repeats
        full: dict[Configuration, list[float]] = {config: [] for config in configs}
        prefill: dict[Configuration, list[float]] = {config: [] for config in configs}
        with tqdm(total=rounds * len(configs), desc="timing (round-robin)", unit="run") as bar:
            for _ in range(rounds):
                for config in configs:
                    self.meter.use(self.precisions(config), self.offload_budget(config))
                    seconds_full, seconds_prefill = self.meter.time_runs()
                    full[config].append(seconds_full)
                    prefill[config].append(seconds_prefill)
                    bar.update()
        decoded = self.meter.decoded_tokens
        return {config: decoded / (median(full[config]) - median(prefill[config])) for config in configs}

    def _write_copies(self, offloaded: list[Configuration]) -> None:
        """The store's quantized copies of every expert the offloaded configurations quantize (read on each fetch)."""
        ids_of: dict[str, set[str]] = {}
        for config in offloaded:
            for expert_id, precision in self.precisions(config).items():
                if precision != UNQUANTIZED:
                    ids_of.setdefault(precision, set()).add(expert_id)
        for precision, ids in sorted(ids_of.items()):
            write_quantized_copies(self.meter.store, dict.fromkeys(sorted(ids), precision), self.meter.settings.group_size)

    def _calibration(self) -> BankCalibration:
        if self.cache and self.cache.calibration is not None:
            return BankCalibration.from_json(self.cache.calibration)
        calibration = self.meter.calibrate(self.calibration_texts)
        if self.cache:
            self.cache.set_calibration(calibration.to_json())
        return calibration
