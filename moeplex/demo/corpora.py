"""Text corpora for the demo family, built only from text already on this machine."""

from __future__ import annotations

import functools
import hashlib
import os
import re
import site
import sysconfig
from collections.abc import Iterator
from pathlib import Path

DOMAINS: tuple[str, ...] = ("python", "cpp", "prose", "licenses")
SPLITS: tuple[str, ...] = ("train", "heldout")

HELDOUT_PER_MILLE = 100
MAX_DOC_CHARS = 16_000
MAX_DOMAIN_CHARS = 3_000_000
MIN_DOC_CHARS = 200

PYTHON_SKIPPED_DIRS = frozenset(
    {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test", "idlelib", "turtledemo"}
)
CPP_SKIPPED_DIRS = frozenset({"ops"})
LICENSE_NAME = re.compile(r"^(LICEN[CS]E|COPYING|NOTICE)", re.IGNORECASE)
LICENSE_SEARCH_DEPTH = 3


class EmptyCorpusError(RuntimeError):
    """Raised when a domain finds no local text to build its corpus from."""


def is_heldout(domain: str, identity: str) -> bool:
    """Whether a document belongs to the heldout split; a stable hash of its identity decides."""
    digest = hashlib.sha256(f"{domain}\0{identity}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 1000 < HELDOUT_PER_MILLE


def read_text(path: Path) -> str | None:
    """The file's UTF-8 text, or None when it is not UTF-8."""
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def python_stdlib_files() -> Iterator[tuple[str, Path]]:
    """(relative path, path) of the running interpreter's standard library sources, sorted, no tests."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        parts = relative.parts[:-1]
        if any(part in PYTHON_SKIPPED_DIRS or part.startswith("test") for part in parts):
            continue
        if relative.name.startswith(("test_", "_sysconfigdata")):
            continue
        yield relative.as_posix(), path


def torch_header_files() -> Iterator[tuple[str, Path]]:
    """(relative path, path) of the C++ headers bundled in torch's package, sorted, generated op headers left out."""
    import torch

    root = Path(torch.__file__).parent / "include"
    for path in sorted(root.rglob("*.h")):
        relative = path.relative_to(root)
        if any(part in CPP_SKIPPED_DIRS for part in relative.parts[:-1]):
            continue
        yield relative.as_posix(), path


def site_package_dirs() -> list[Path]:
    """The site-packages folders of the running interpreter, deduplicated, sorted."""
    paths = sysconfig.get_paths()
    candidates = [paths["purelib"], paths["platlib"], *site.getsitepackages()]
    return sorted({Path(p).resolve() for p in candidates if Path(p).is_dir()})


def is_license_file(relative: Path) -> bool:
    """Whether a file under site-packages holds a license text."""
    if LICENSE_NAME.match(relative.name):
        return True
    return len(relative.parts) >= 2 and relative.parts[-2] == "licenses" and relative.parts[0].endswith(".dist-info")


def license_files() -> Iterator[Path]:
    """License files of installed packages, at most a few folders deep, sorted."""
    for root in site_package_dirs():
        found = []
        for folder, dirnames, filenames in os.walk(root):
            depth = len(Path(folder).relative_to(root).parts)
            if depth >= LICENSE_SEARCH_DEPTH:
                dirnames.clear()
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            for name in filenames:
                path = Path(folder) / name
                if is_license_file(path.relative_to(root)):
                    found.append(path)
        yield from sorted(found)


def normalized(text: str) -> str:
    """Text with runs of whitespace collapsed, for spotting duplicate documents."""
    return " ".join(text.split())


def python_documents() -> Iterator[tuple[str, str]]:
    """Standard library modules, identified by their path inside the stdlib folder."""
    for identity, path in python_stdlib_files():
        text = read_text(path)
        if text is not None:
            yield identity, text


def cpp_documents() -> Iterator[tuple[str, str]]:
    """torch's C++ headers, identified by their path inside torch/include."""
    for identity, path in torch_header_files():
        text = read_text(path)
        if text is not None:
            yield identity, text


def prose_documents() -> Iterator[tuple[str, str]]:
    """Python's documentation topics, identified by topic key."""
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield key, topics[key]


def license_documents() -> Iterator[tuple[str, str]]:
    """License texts, each distinct text once; its identity is the hash of its normalized content."""
    seen: set[str] = set()
    for path in license_files():
        text = read_text(path)
        if text is None:
            continue
        identity = hashlib.sha256(normalized(text).encode()).hexdigest()
        if identity not in seen:
            seen.add(identity)
            yield identity, text


DOCUMENT_SOURCES = {
    "python": python_documents,
    "cpp": cpp_documents,
    "prose": prose_documents,
    "licenses": license_documents,
}


@functools.cache
def domain_documents(domain: str) -> tuple[tuple[str, str], ...]:
    """(identity, text) of one domain's documents in both splits, capped in size, in a fixed order."""
    if domain not in DOCUMENT_SOURCES:
        raise ValueError(f"unknown demo domain {domain!r}; expected one of {DOMAINS}")
    documents = []
    total = 0
    for identity, text in DOCUMENT_SOURCES[domain]():
        text = text.strip()[:MAX_DOC_CHARS]
        if len(text) < MIN_DOC_CHARS:
            continue
        documents.append((identity, text))
        total += len(text)
        if total >= MAX_DOMAIN_CHARS:
            break
    if not documents:
        raise EmptyCorpusError(f"no local text found for demo domain {domain!r}")
    return tuple(documents)


def load_documents(domain: str, split: str) -> list[str]:
    """The texts of one domain's split ("train" or "heldout")."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    want_heldout = split == "heldout"
    documents = [text for identity, text in domain_documents(domain) if is_heldout(domain, identity) == want_heldout]
    if not documents:
        raise EmptyCorpusError(f"demo domain {domain!r} has no {split} documents")
    return documents


def capped_documents(domain: str, split: str, max_chars: int | None) -> list[str]:
    """The split's first documents up to max_chars characters in all (the last one cut short); all when None."""
    documents = load_documents(domain, split)
    if max_chars is None:
        return documents
    capped = []
    remaining = max_chars
    for document in documents:
        if remaining <= 0:
            break
        capped.append(document[:remaining])
        remaining -= len(capped[-1])
    return capped


def domain_text(domain: str, split: str, max_chars: int | None = None) -> str:
    """One domain's split as one string, documents separated by blank lines, at most max_chars long."""
    text = "\n\n".join(capped_documents(domain, split, max_chars))
    return text if max_chars is None else text[:max_chars]
