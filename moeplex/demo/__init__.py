"""The demo family: small Mixtral-architecture models built from local text, for serving and measuring."""

from moeplex.demo.build import DemoFamily, DemoFamilyMissingError, build_demo_family, demo_root, load_demo_family
from moeplex.demo.corpora import DOMAINS
from moeplex.demo.recipes import DEMO_SIZES

__all__ = [
    "DEMO_SIZES",
    "DOMAINS",
    "DemoFamily",
    "DemoFamilyMissingError",
    "build_demo_family",
    "demo_root",
    "load_demo_family",
]
