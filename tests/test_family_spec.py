"""Family YAML files: paths relative to the file, and checkpoints that must share one architecture."""

from __future__ import annotations

import shutil

import pytest
import yaml

from moeplex.consolidate.family_spec import FamilySpecError, load_family_spec
from moeplex.errors import MoeplexError
from tests.conftest import family_configs, make_hf_model


def save_model(folder, family="mixtral", seed=0, **overrides):
    config = family_configs()[family]
    for key, value in overrides.items():
        setattr(config, key, value)
    make_hf_model(config, seed).save_pretrained(folder)
    return folder


def write_yaml(root, data) -> object:
    path = root / "family.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def base_and_variant(tmp_path_factory):
    root = tmp_path_factory.mktemp("family")
    save_model(root / "base", seed=0)
    save_model(root / "python", seed=1)
    return root


def test_paths_are_relative_to_the_yaml_and_base_comes_first(base_and_variant):
    path = write_yaml(
        base_and_variant,
        {"name": "tiny", "base": "base", "variants": {"python": "python"}, "own_domain": {"python": "py"}},
    )
    family = load_family_spec(path)
    assert family.name == "tiny" and family.own_domain == {"python": "py"}
    assert family.checkpoints() == {"base": base_and_variant / "base", "python": base_and_variant / "python"}
    assert list(family.checkpoints()) == ["base", "python"]


def test_family_without_base(base_and_variant):
    family = load_family_spec(write_yaml(base_and_variant, {"name": "tiny", "variants": {"python": "python"}}))
    assert family.base is None and family.checkpoints() == {"python": base_and_variant / "python"}


@pytest.mark.parametrize(
    "overrides, field",
    [({"hidden_size": 32}, "hidden_size"), ({"num_local_experts": 4}, "num_experts")],
)
def test_mismatched_variant_is_named_with_the_field(tmp_path, base_and_variant, overrides, field):
    save_model(tmp_path / "odd", seed=2, **overrides)
    data = {"name": "tiny", "base": str(base_and_variant / "base"), "variants": {"odd": "odd"}}
    with pytest.raises(FamilySpecError, match=rf"variant 'odd'.*{field}"):
        load_family_spec(write_yaml(tmp_path, data))


def test_other_architecture_is_rejected(tmp_path, base_and_variant):
    save_model(tmp_path / "qwen", family="qwen3_moe")
    data = {"name": "tiny", "base": str(base_and_variant / "base"), "variants": {"qwen": "qwen"}}
    with pytest.raises(FamilySpecError, match="variant 'qwen' is a qwen3_moe model"):
        load_family_spec(write_yaml(tmp_path, data))


def test_tensor_that_contradicts_the_shared_config_is_named(tmp_path, base_and_variant):
    save_model(tmp_path / "odd", seed=3, num_key_value_heads=4)
    shutil.copyfile(base_and_variant / "base" / "config.json", tmp_path / "odd" / "config.json")
    data = {"name": "tiny", "base": str(base_and_variant / "base"), "variants": {"odd": "odd"}}
    with pytest.raises(FamilySpecError, match=r"variant 'odd': tensor 'model\.layers\.0\.self_attn\.k_proj\.weight'"):
        load_family_spec(write_yaml(tmp_path, data))


def test_missing_folder_is_a_clear_error(tmp_path, base_and_variant):
    data = {"name": "tiny", "base": str(base_and_variant / "base"), "variants": {"gone": "nowhere"}}
    with pytest.raises(FamilySpecError, match=r"variant 'gone': checkpoint folder not found: .*nowhere"):
        load_family_spec(write_yaml(tmp_path, data))


@pytest.mark.parametrize(
    "data, message",
    [
        ({"name": "tiny"}, "'variants' must map names"),
        ({"name": "tiny", "variants": {}}, "'variants' is empty"),
        ({"variants": {"python": "python"}}, "'name' must be a non-empty string"),
        ({"name": "tiny", "variants": {"../up": "python"}}, "variant name '../up'"),
        ({"name": "tiny", "variants": {"python": "python"}, "own_domain": {"cpp": "c"}}, "unknown variants"),
    ],
)
def test_malformed_yaml_is_rejected(base_and_variant, data, message):
    with pytest.raises(FamilySpecError, match=message):
        load_family_spec(write_yaml(base_and_variant, data))


def test_missing_yaml_and_invalid_yaml(tmp_path):
    with pytest.raises(FamilySpecError, match="family file not found"):
        load_family_spec(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    with pytest.raises(MoeplexError, match="not valid YAML"):
        load_family_spec(tmp_path / "bad.yaml")
