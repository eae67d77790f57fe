"""Measure a store under one expert-precision choice: timed runs of a short decode workload, perplexity and KL.

The store's variants are loaded once in bf16 over one shared ExpertBank; each choice re-quantizes the bank
from its dense experts, so every variant computes with it. With an expert budget smaller than the
choice's expert bytes, the timed runs use offloaded experts instead: one pool over the store (each
expert in its precision, read from disk past the page cache), the default offloading settings
(prediction, prefetch, trace-aware eviction). The workload decodes one seeded random prompt per variant
in turn at batch 1; the Profiler turns full and prefill-only runs into decode tokens/s.

Quality is always computed resident (where an expert lives does not change what it computes), on
held-out text: the calibration text that chooses which experts to quantize is training-split text, on
which a small model's perplexity can even drop when its experts are perturbed. Each variant is scored
on the held-out text of the domain it was fine-tuned on (the manifest's `own_domain`, when that is a
demo text domain), the others on every domain's: off its domain a small fine-tune is confidently
wrong, and noise in its experts can lower its perplexity there. The calibration text is chosen the same way
(a variant's routing and errors are measured on the text it serves). Beside perplexity, the KL divergence
from the all-bf16 model's predictions on the same text grows with how far quantization moves the
model, even where perplexity cannot resolve it.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer

from moeplex.bench.measure import timed
from moeplex.consolidate.analysis import calibration_tokens_by_domain
from moeplex.demo.corpora import DOMAINS
from moeplex.eval.domains import heldout_token_ids
from moeplex.eval.perplexity import runtime_logits, window_log_probs, windowed_ppl_and_kl
from moeplex.model.generate import generate
from moeplex.model.runtime import MoEModel
from moeplex.model.sampling import SamplingParams
from moeplex.offload.config import OffloadConfig
from moeplex.offload.loading import offload_variant_models
from moeplex.planner.model_error import model_output_errors
from moeplex.quant.apply import quantize_bank_experts
from moeplex.quant.bank_calibration import BankCalibration, calibrate_bank
from moeplex.quant.formats import DEFAULT_GROUP_SIZE, PRECISIONS, UNQUANTIZED
from moeplex.quant.kernels import int4_kernel_name
from moeplex.quant.policies import DEFAULT_SELECTION_ERROR, SELECTION_ERRORS
from moeplex.quant.sizes import expert_nbytes
from moeplex.store.layout import MANIFEST, TOKENIZER
from moeplex.store.reader import StoreReader

MEASURE_DTYPE = torch.bfloat16
# Which text each variant is calibrated on; in the cache context, so measurements calibrated otherwise are not reused
CALIBRATION_TEXT = "own domain, else every domain"


@dataclass(frozen=True)
class MeterSettings:
    new_tokens: int = 24  # per variant and run
    prompt_tokens: int = 16
    repeats: int = 5  # timed rounds: each measures every configuration once, in turn
    calibration_tokens_per_domain: int = 512  # training-split text: output errors and routing frequencies
    heldout_tokens_per_domain: int = 1024  # held-out text: perplexity
    # least-error-first's error: "model", the KL at the model's output with one expert id quantized (a forward
    # pass per id and precision); "expert", the quantized expert's own relative output error (seconds)
    selection_error: str = DEFAULT_SELECTION_ERROR
    group_size: int = DEFAULT_GROUP_SIZE
    threads: int = 1
    seed: int = 0

    def __post_init__(self):
        if self.selection_error not in SELECTION_ERRORS:
            raise ValueError(f"selection_error must be one of {', '.join(SELECTION_ERRORS)}, not {self.selection_error!r}")


class StoreMeter:
    """The store's variants resident once; `use(precision_of_id, expert_budget)` sets up what the next runs use."""

    def __init__(self, store: str | Path, settings: MeterSettings | None = None):
        settings = settings or MeterSettings()
        torch.set_num_threads(settings.threads)
        self.store, self.settings = Path(store), settings
        reader = StoreReader(store)
        self.manifest = reader.manifest
        self.tables = {variant: reader.expert_table(variant) for variant in reader.variants}
        self.models = reader.load_variant_models(reader.variants, MEASURE_DTYPE, progress=True)
        self.timed_models: dict[str, MoEModel] = self.models  # what the timed runs use: resident or offloaded
        self.bank = next(iter(self.models.values())).experts.bank
        self.dense = self.bank.compute
        self._reference: tuple[Mapping[str, torch.Tensor], dict[str, list[torch.Tensor]]] | None = None
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
        return {"manifest_sha256": manifest, "torch": torch.__version__,
                "int4_kernel": int4_kernel_name(self.settings.group_size),  # timings differ by kernel and path
                "calibration_text": CALIBRATION_TEXT,
                **dataclasses.asdict(self.settings)}

    def bytes_per_expert(self) -> dict[str, int]:
        """Bytes of one expert in each precision (every expert of a store has one shape)."""
        spec = next(iter(self.models.values())).spec
        hidden, inter = spec.hidden_size, spec.expert_intermediate_size
        return {p: expert_nbytes(hidden, inter, p, self.settings.group_size, MEASURE_DTYPE.itemsize) for p in PRECISIONS}

    def backbone_bytes(self) -> int:
        return sum(model.backbone.nbytes for model in self.models.values())

    def calibration_texts(self) -> dict[str, torch.Tensor]:
        """Variant -> training-split token ids: its own domain's, else every demo domain's (as `heldout_texts`)."""
        return self._per_variant(calibration_tokens_by_domain(self.tokenizer_folder, self.settings.calibration_tokens_per_domain))

    def heldout_texts(self) -> dict[str, torch.Tensor]:
        """Variant -> held-out token ids (no model was trained on them): its own domain's, else every demo domain's."""
        tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_folder)
        per_domain = self.settings.heldout_tokens_per_domain
        return self._per_variant({domain: heldout_token_ids(tokenizer, domain, per_domain) for domain in DOMAINS})

    def _per_variant(self, by_domain: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each variant's text: the manifest's own domain's, when that is one of by_domain, else all of them in turn."""
        every_domain = torch.cat(list(by_domain.values()))
        own = self.manifest.own_domain
        return {variant: by_domain.get(own.get(variant), every_domain) for variant in self.models}

    def calibrate(self, texts: Mapping[str, torch.Tensor]) -> BankCalibration:
        """Routing frequency and int4/int8 error per expert id on each variant's calibration text (the error as
        `selection_error` says); texts as `calibration_texts` gives them."""
        self.use({})
        at_expert = self.settings.selection_error == "expert"
        calibration = calibrate_bank(self.models, self.tables, self.bank, texts, self.settings.group_size,
                                     progress=True, expert_errors=at_expert)
        if at_expert:
            return calibration
        return BankCalibration(calibration.frequency, model_output_errors(self, texts, calibration.frequency))

    def use(self, precision_of_id: Mapping[str, str], expert_budget: int | None = None) -> None:
        """Quantize the bank as precision_of_id says; with expert_budget (bytes), time offloaded experts in those precisions."""
        self._close_offloaded()
        self.bank.compute = self.dense
        quantized = {expert_id: p for expert_id, p in precision_of_id.items() if p != UNQUANTIZED}
        if quantized:
            quantize_bank_experts(self.bank, quantized, self.settings.group_size)
        if expert_budget is not None:
            config = OffloadConfig(device_budget=expert_budget)
            self.timed_models = offload_variant_models(self.store, self.manifest, self.models, config, quantized, self.settings.group_size)

    @property
    def decoded_tokens(self) -> int:
        """Tokens a full run decodes beyond what a prefill-only run does."""
        return len(self.models) * (self.settings.new_tokens - 1)

    def time_runs(self) -> tuple[float, float]:
        """Seconds of one full run and one prefill-only run, after an untimed full run (warms caches and the pool)."""
        full, prefill = self._workload(self.settings.new_tokens), self._workload(1)
        full()
        return timed(full), timed(prefill)

    def quality(self, texts: Mapping[str, torch.Tensor]) -> tuple[float, float]:
        """(perplexity, KL from the all-bf16 model per token), each the mean over variants of its score on texts[variant].

        Experts resident, in the precisions of `use`; texts as `heldout_texts` gives them.
        """
        scores = list(self.quality_by_variant(texts).values())
        return sum(ppl for ppl, _ in scores) / len(scores), sum(kl for _, kl in scores) / len(scores)

    def quality_by_variant(self, texts: Mapping[str, torch.Tensor], variants: Iterable[str] | None = None) -> dict[str, tuple[float, float]]:
        """Variant (every one, or those named) -> (perplexity, KL from its all-bf16 model per token) on texts[variant]."""
        reference = self._reference_log_probs(texts)
        names = self.models if variants is None else variants
        return {v: windowed_ppl_and_kl(runtime_logits(self.models[v]), texts[v], reference[v]) for v in names}

    def _reference_log_probs(self, texts: Mapping[str, torch.Tensor]) -> dict[str, list[torch.Tensor]]:
        """Each variant's all-bf16 log-probabilities on its text, computed once per texts mapping (float32, [tokens, V])."""
        if self._reference is None or self._reference[0] is not texts:
            compute, self.bank.compute = self.bank.compute, self.dense
            try:
                log_probs = {v: window_log_probs(runtime_logits(m), texts[v]) for v, m in self.models.items()}
            finally:
                self.bank.compute = compute
            self._reference = (texts, log_probs)
        return self._reference[1]

    def close(self) -> None:
        self._close_offloaded()

    def _close_offloaded(self) -> None:
        if self.timed_models is not self.models:
            for model in self.timed_models.values():
                model.experts.close()
            self.timed_models = self.models

    def _workload(self, new_tokens: int):
        params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)

        def run():
            for variant, model in self.timed_models.items():
                request = getattr(model.experts, "request", None)  # offloaded experts trace each variant's run
                with request(variant) if request is not None else nullcontext():
                    generate(model, self.prompts[variant], params)

        return run
