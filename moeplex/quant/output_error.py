"""How much quantizing each expert changes its output, measured on calibration inputs.

The inputs are those `moeplex.consolidate.calibration.record_expert_inputs` captures (the hidden states
that reached each expert); the error is relative, ||E_q(x) - E(x)|| / ||E(x)|| averaged over rows, as
consolidation measures sharing error.
"""

from __future__ import annotations

from tqdm import tqdm

from moeplex.consolidate.calibration import ExpertInputs
from moeplex.consolidate.similarity import relative_output_error
from moeplex.model.experts import DenseExperts
from moeplex.model.ops import swiglu_mlp
from moeplex.quant.experts import quantize_expert
from moeplex.quant.formats import DEFAULT_GROUP_SIZE, QUANTIZED, Position


def expert_output_errors(
    experts: DenseExperts,
    inputs: ExpertInputs,
    precisions: tuple[str, ...] = QUANTIZED,
    group_size: int = DEFAULT_GROUP_SIZE,
    progress: bool = False,
) -> dict[Position, dict[str, float]]:
    """Per recorded position and precision: relative output error of the quantized expert vs fp32 math.

    A position no calibration token reached gets 0.0 (its routing frequency is 0, so its cost is too).
    """
    errors = {}
    for (layer, expert), x in tqdm(inputs.inputs.items(), desc="quantization error", disable=not progress):
        gate_up, down = experts.gate_up[layer][expert], experts.down[layer][expert]
        if x.shape[0] == 0:
            errors[(layer, expert)] = {precision: 0.0 for precision in precisions}
            continue
        reference = swiglu_mlp(x, gate_up.float(), down.float())  # [n, H]
        errors[(layer, expert)] = {
            precision: relative_output_error(reference, quantize_expert(gate_up, down, precision, group_size)(x))
            for precision in precisions
        }
    return errors
