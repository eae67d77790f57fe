"""Names of the expert precisions and int4 group sizes (no torch import, so option parsers can use them)."""

Position = tuple[int, int]  # (layer, expert index) of one variant; (0, bank row) in a store's ExpertBank

UNQUANTIZED = "bf16"  # the model's own dtype (bf16 unless the model was loaded otherwise)
QUANTIZED = ("int4", "int8")  # lowest first: selection policies hand out int4 before int8
PRECISIONS = (UNQUANTIZED, "int8", "int4")

GROUP_SIZES = (32, 64, 128)  # input channels per int4 scale and zero
DEFAULT_GROUP_SIZE = 128  # as fast as any and the smallest int4 copy (docs/quantization.md)
