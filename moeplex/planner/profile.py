"""Profile configurations of a store: each one's least-error-first precisions, decode tokens/s and perplexity."""

from __future__ import annotations

from collections.abc import Iterable

from tqdm import tqdm

from moeplex.planner.cache import MeasurementCache
from moeplex.planner.configurations import Configuration
from moeplex.planner.meter import StoreMeter
from moeplex.planner.pareto import Measurement
from moeplex.quant.bank_calibration import BankCalibration
from moeplex.quant.policies import LeastErrorFirst


class Profiler:
    """Measures configurations with a StoreMeter; with a cache, reuses (and adds to) earlier runs' measurements."""

    def __init__(self, meter: StoreMeter, cache: MeasurementCache | None = None):
        self.meter, self.cache = meter, cache
        self.calibration_ids = meter.calibration_token_ids()
        self.calibration = self._calibration()
        self.policy = LeastErrorFirst(self.calibration.errors, self.calibration.frequency)
        self.bytes_per_expert = meter.bytes_per_expert()
        self.backbone_bytes = meter.backbone_bytes()

    @property
    def num_experts(self) -> int:
        return len(self.meter.expert_ids)

    def precisions(self, config: Configuration) -> dict[str, str]:
        """Expert id -> precision: int4, then int8, to the ids of least measured error x routing frequency."""
        return self.policy.choose(self.meter.expert_ids, config.quantized_counts)

    def resident_bytes(self, config: Configuration) -> int:
        return config.resident_bytes(self.bytes_per_expert, self.backbone_bytes)

    def measure(self, configs: Iterable[Configuration]) -> list[Measurement]:
        configs = list(configs)
        measurements = []
        for config in tqdm(configs, desc="configurations", unit="config"):
            measured = self.cache.measurement(config.key) if self.cache else None
            if measured is None:
                self.meter.use(self.precisions(config))
                measured = {"tokens_per_s": self.meter.decode_tokens_per_s(), "ppl": self.meter.perplexity(self.calibration_ids)}
                if self.cache:
                    self.cache.add_measurement(config.key, measured)
            measurements.append(Measurement(config, measured["tokens_per_s"], measured["ppl"], self.resident_bytes(config)))
        self.meter.use({})
        return measurements

    def _calibration(self) -> BankCalibration:
        if self.cache and self.cache.calibration is not None:
            return BankCalibration.from_json(self.cache.calibration)
        calibration = self.meter.calibrate(self.calibration_ids)
        if self.cache:
            self.cache.set_calibration(calibration.to_json())
        return calibration
