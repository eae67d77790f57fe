"""The main jobs on the demo family: serve its consolidated store (`make run`), or generate with each model."""

from __future__ import annotations

import time
from pathlib import Path

from transformers import AutoTokenizer

from moeplex.dtypes import resolve_dtype
from moeplex.errors import MoeplexError
from moeplex.model.generate import generate
from moeplex.model.runtime import load_model
from moeplex.model.sampling import SamplingParams

DOMAIN_PROMPTS = {
    "python": "def read_config(path):\n",
    "cpp": "#include <ATen/core/Tensor.h>\n\nnamespace at {\n",
    "prose": "The import statement",
    "licenses": "Permission is hereby granted",
}


def resolve_models(names: list[str]) -> tuple[dict[str, Path], dict[str, str]]:
    """({name: checkpoint folder}, {variant: own domain}) from folders or demo names; none -> the demo family."""
    from moeplex.demo import DOMAINS, build_demo_family

    if not names:
        family = build_demo_family()
        return {"base": family.base, **family.variants}, dict(family.own_domain)
    models, own_domain, family = {}, {}, None
    for name in names:
        path = Path(name)
        if path.is_dir():
            models[path.name] = path
            continue
        if name not in ("base", *DOMAINS):
            known = ", ".join(("base", *DOMAINS))
            raise MoeplexError(f"'{name}' is neither a checkpoint folder nor a demo model ({known})")
        family = family or build_demo_family()
        if name == "base":
            models[name] = family.base
        else:
            models[name], own_domain[name] = family.variants[name], family.own_domain[name]
    return models, own_domain


def generate_for_each_model(args) -> None:
    models, own_domain = resolve_models(args.models)
    dtype = resolve_dtype(args.dtype)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    for name, folder in models.items():
        started = time.perf_counter()
        model = load_model(folder, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        prompt = args.prompt or DOMAIN_PROMPTS.get(own_domain.get(name, ""), "The ")
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        completion = generate(model, [prompt_ids], params, tokenizer)[0]
        seconds = time.perf_counter() - started
        print(f"=== {name} ({folder}) — {len(completion.token_ids)} tokens, {seconds:.1f}s incl. loading")
        print(prompt + completion.text)
        print()


def usage_snippets(host: str, port: int, variant: str) -> str:
    """A curl line and an `openai` client snippet that work against the demo server."""
    base = f"http://{host}:{port}/v1"
    return f"""Try it (in another shell):

  curl -s {base}/completions -H 'Content-Type: application/json' \\
       -d '{{"model": "{variant}", "prompt": "def read_config(path):", "max_tokens": 32, "temperature": 0}}'

  python - <<'PY'
  from openai import OpenAI
  client = OpenAI(base_url="{base}", api_key="unused")
  reply = client.chat.completions.create(model="{variant}", messages=[{{"role": "user", "content": "import os"}}], max_tokens=32)
  print(reply.choices[0].message.content)
  PY
"""
