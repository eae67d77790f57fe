"""Quantized experts: int8 / int4 weight-only formats, mixed-precision expert compute, selection policies.

Import from the modules (`moeplex.quant.experts`, `.apply`, `.policies`, ...); this package file stays
empty so that option parsers can import `moeplex.quant.formats` without torch.
"""
