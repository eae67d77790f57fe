"""Measure a store under one expert-precision choice: decode tokens/s on a short workload, and perplexity.

The store's variants are loaded once in bf16 over one shared ExpertBank; each choice re-quantizes the bank
from its dense experts, so every variant computes with it. The workload decodes one seeded random prompt
per variant in turn at batch 1; decode tokens/s = decoded tokens / (median full run - median prefill-only
run), the runs alternating after a warm-up (as `moeplex bench quant` times one model).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from moeplex.bench.measure import alternate, median
from moeplex.consolidate.analysis import calibration_tokens
from moeplex.eval.perplexity import runtime_logits, windowed_perplexity
from moeplex.model.generate import generate
from moeplex.model.sampling import SamplingParams
from moeplex.quant.apply import quantize_bank_experts
from moeplex.quant.bank_calibration import BankCalibration, calibrate_bank
from moeplex.quant.experts import quantize_expert
from moeplex.quant.formats import DEFAULT_GROUP_SIZE, PRECISIONS, UNQUANTIZED
from moeplex.store.layout import MANIFEST, TOKENIZER
from moeplex.store.reader import StoreReader

MEASURE_DTYPE = torch.bfloat16


@dataclass(frozen=True)
class MeterSettings:
    new_tokens: int = 24  # per variant and run
    prompt_tokens: int = 16
    repeats: int = 5  # alternating timed runs per configuration
    calibration_tokens_per_domain: int = 512  # training-split text: errors, frequencies and perplexity
    group_size: int = DEFAULT_GROUP_SIZE
    threads: int = 1
    seed: int = 0


class StoreMeter:
    """The store's variants resident once; `use(precision_of_id)` sets the bank's precisions for what follows."""

    def __init__(self, store: str | Path, settings: MeterSettings | None = None):
        settings = settings or MeterSettings()
        torch.set_num_threads(settings.threads)
        self.store, self.settings = Path(store), settings
        reader = StoreReader(store)
        self.tables = {variant: reader.expert_table(variant) for variant in reader.variants}
        self.models = reader.load_variant_models(reader.variants, MEASURE_DTYPE, progress=True)
        self.bank = next(iter(self.models.values())).experts.bank
        self.dense = self.bank.compute
        self.expert_ids = list(self.bank.row_of)
        self.tokenizer_folder = self.store / TOKENIZER
        generator = torch.Generator().manual_seed(settings.seed)
        vocab = next(iter(self.models.values())).spec.vocab_size
        self.prompts = {
            variant: torch.randint(3, vocab, (1, settings.prompt_tokens), generator=generator).tolist()
            for variant in self.models
        }

    def context(self) -> dict:
        """What the measurements depend on besides the configuration (a cache is only valid for the same context)."""
        manifest = hashlib.sha256((self.store / MANIFEST).read_bytes()).hexdigest()
        return {"manifest_sha256": manifest, "torch": torch.__version__, **dataclasses.asdict(self.settings)}

    def bytes_per_expert(self) -> dict[str, int]:
        """Bytes of one expert in each precision (every expert of a store has one shape)."""
        gate_up, down = self.dense.gate_up[0][0], self.dense.down[0][0]
        return {p: quantize_expert(gate_up, down, p, self.settings.group_size).nbytes for p in PRECISIONS}

    def backbone_bytes(self) -> int:
        return sum(model.backbone.nbytes for model in self.models.values())

    def calibration_token_ids(self) -> torch.Tensor:
        return calibration_tokens(self.tokenizer_folder, self.settings.calibration_tokens_per_domain)

    def calibrate(self, token_ids: torch.Tensor) -> BankCalibration:
        self.use({})
        return calibrate_bank(self.models, self.tables, self.bank, token_ids, self.settings.group_size, progress=True)

    def use(self, precision_of_id: Mapping[str, str]) -> None:
        self.bank.compute = self.dense
        quantized = {expert_id: p for expert_id, p in precision_of_id.items() if p != UNQUANTIZED}
        if quantized:
            quantize_bank_experts(self.bank, quantized, self.settings.group_size)

    def decode_tokens_per_s(self) -> float:
        runs = {"full": self._workload(self.settings.new_tokens), "prefill": self._workload(1)}
        samples = alternate(runs, self.settings.repeats)
        decoded = len(self.models) * (self.settings.new_tokens - 1)
        return decoded / (median(samples["full"]) - median(samples["prefill"]))

    def perplexity(self, token_ids: torch.Tensor) -> float:
        """Mean over variants of each one's perplexity on the tokens."""
        return sum(windowed_perplexity(runtime_logits(m), token_ids) for m in self.models.values()) / len(self.models)

    def _workload(self, new_tokens: int):
        params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)

        def run():
            for variant, model in self.models.items():
                generate(model, self.prompts[variant], params)

        return run
