"""The adapter registry: where adapter files may live, their sha256, and how
the `model` field addresses adapters and stacks. No model loads here."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pytest

from gateway.errors import InvalidRequestError, NotFoundError
from gateway.lora.registry import AdapterRegistry, parse_stack
from gateway.lora.sources import AdapterSourceError, locate, sha256_of

BASE = "smollm2-135m-instruct"
MODELS = {BASE, "other", "llama3:8b"}
ALIASES = {"gpt-4o-mini": BASE}


def _peft(folder: Path, weights: bytes = b"weights") -> str:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_bytes(b'{"r": 8}')
    (folder / "adapter_model.safetensors").write_bytes(weights)
    return hashlib.sha256(b'{"r": 8}' + weights).hexdigest()


def _registry(root: Path) -> AdapterRegistry:
    return AdapterRegistry(
        root,
        lambda name: name in MODELS or name in ALIASES,
        lambda name: ALIASES.get(name, name),
    )


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "adapters").mkdir()
    return tmp_path / "adapters"


# ------------------------------------------------------------------ sources


def test_a_peft_folders_sha256_is_its_config_then_its_weights(root: Path) -> None:
    expected = _peft(root / "alpha")
    source = locate(root, "alpha")
    assert (source.format, source.relative_path) == ("peft", "alpha")
    assert sha256_of(source) == expected


def test_a_gguf_files_sha256_is_the_files(root: Path) -> None:
    (root / "beta.gguf").write_bytes(b"GGUF...")
    source = locate(root, "beta.gguf")
    assert source.format == "gguf"
    assert sha256_of(source) == hashlib.sha256(b"GGUF...").hexdigest()


@pytest.mark.parametrize("path", ["../outside", "/etc", "a/../../outside", ""])
def test_paths_that_escape_the_root_are_refused(root: Path, path: str) -> None:
    (root.parent / "outside").mkdir()
    with pytest.raises(AdapterSourceError, match=r"escapes|relative"):
        locate(root, path)


def test_a_symlink_out_of_the_root_is_refused(root: Path) -> None:
    _peft(root.parent / "elsewhere")
    (root / "sneaky").symlink_to(root.parent / "elsewhere")
    with pytest.raises(AdapterSourceError, match="escapes the adapter root"):
        locate(root, "sneaky")


def test_a_symlinked_weights_file_out_of_the_root_is_refused(root: Path) -> None:
    _peft(root / "alpha")
    (root.parent / "weights.safetensors").write_bytes(b"x")
    (root / "alpha" / "adapter_model.safetensors").unlink()
    (root / "alpha" / "adapter_model.safetensors").symlink_to(root.parent / "weights.safetensors")
    with pytest.raises(AdapterSourceError, match="escapes the adapter root"):
        locate(root, "alpha")


@pytest.mark.parametrize("name", ["adapter_model.bin", "adapter_model.pt", "weights.pth"])
def test_pickled_weights_are_refused(root: Path, name: str) -> None:
    _peft(root / "alpha")
    (root / "alpha" / name).write_bytes(b"pickle")
    with pytest.raises(AdapterSourceError, match="pickled weights"):
        locate(root, "alpha")
    (root / name).write_bytes(b"pickle")
    with pytest.raises(AdapterSourceError, match="pickled weights"):
        locate(root, name)


def test_a_peft_folder_without_its_weights_is_refused(root: Path) -> None:
    (root / "empty").mkdir()
    (root / "empty" / "adapter_config.json").write_text("{}")
    with pytest.raises(AdapterSourceError, match=r"adapter_model\.safetensors is missing"):
        locate(root, "empty")


# ------------------------------------------------------------- registration


def test_registration_checks_the_sha256(root: Path) -> None:
    sha = _peft(root / "alpha")
    registry = _registry(root)
    with pytest.raises(ValueError, match="have sha256"):
        registry.add_verified("alpha", BASE, "alpha", "0" * 64)
    adapter = registry.add_verified("alpha", BASE, "alpha", sha)
    assert (adapter.base_model, adapter.format, adapter.sha256) == (BASE, "peft", sha)


def test_an_alias_as_base_is_stored_as_the_model(root: Path) -> None:
    sha = _peft(root / "alpha")
    adapter = _registry(root).add_verified("alpha", "gpt-4o-mini", "alpha", sha)
    assert adapter.base_model == BASE


@pytest.mark.parametrize(
    ("name", "base", "message"),
    [
        ("alpha", "nope", "is not a model"),
        (BASE, BASE, "already taken"),
        ("bad:name", BASE, "not a valid name"),
        ("a@b", BASE, "not a valid name"),
    ],
)
def test_registration_refuses_bad_names_and_bases(
    root: Path, name: str, base: str, message: str
) -> None:
    sha = _peft(root / "alpha")
    with pytest.raises(ValueError, match=message):
        _registry(root).add_verified(name, base, "alpha", sha)


def test_runtime_registration_errors_are_400s(root: Path) -> None:
    with pytest.raises(InvalidRequestError, match="no such file"):
        asyncio.run(_registry(root).register("alpha", BASE, "missing", "0" * 64))


def test_removing_an_adapter_used_by_a_stack_is_refused(root: Path) -> None:
    registry = _registry(root)
    registry.add_verified("alpha", BASE, "alpha", _peft(root / "alpha"))
    registry.add_stack("mix", BASE, ["alpha@0.5"])
    with pytest.raises(InvalidRequestError, match="stack"):
        registry.remove("alpha")
    registry.remove("mix")
    registry.remove("alpha")
    with pytest.raises(NotFoundError):
        registry.remove("alpha")


# --------------------------------------------------------------- addressing


@pytest.fixture
def registry(root: Path) -> AdapterRegistry:
    registry = _registry(root)
    registry.add_verified("alpha", BASE, "alpha", _peft(root / "alpha", b"a"))
    registry.add_verified("beta", BASE, "beta", _peft(root / "beta", b"b"))
    registry.add_verified("gamma", "other", "gamma", _peft(root / "gamma", b"c"))
    registry.add_stack("mix", BASE, ["alpha@0.7", "beta@0.3"])
    return registry


def _spelled(registry: AdapterRegistry, model: str) -> tuple[str, list[tuple[str, float]]]:
    addressed = registry.address(model)
    assert addressed is not None
    return addressed.base_model, [(u.adapter.name, u.scale) for u in addressed.uses]


def test_an_adapter_is_addressed_by_its_name_and_as_base_colon_name(
    registry: AdapterRegistry,
) -> None:
    assert _spelled(registry, "alpha") == (BASE, [("alpha", 1.0)])
    assert _spelled(registry, f"{BASE}:alpha") == (BASE, [("alpha", 1.0)])
    assert _spelled(registry, "gpt-4o-mini:alpha") == (BASE, [("alpha", 1.0)])


def test_stacks_ad_hoc_and_named(registry: AdapterRegistry) -> None:
    assert _spelled(registry, f"{BASE}:alpha@0.7+beta@0.3") == (
        BASE,
        [("alpha", 0.7), ("beta", 0.3)],
    )
    assert _spelled(registry, "mix") == (BASE, [("alpha", 0.7), ("beta", 0.3)])
    addressed = registry.address(f"{BASE}:alpha@1+beta@0")
    assert addressed is not None and addressed.needs_stacking
    single = registry.address("alpha")
    assert single is not None and not single.needs_stacking


def test_models_are_not_adapters(registry: AdapterRegistry) -> None:
    assert registry.address(BASE) is None
    assert registry.address("llama3:8b") is None  # a model whose name has a colon
    assert registry.address("unknown-model") is None


def test_addressing_errors(registry: AdapterRegistry) -> None:
    with pytest.raises(NotFoundError):
        registry.address(f"{BASE}:nope")
    with pytest.raises(InvalidRequestError, match="fine-tunes other"):
        registry.address(f"{BASE}:gamma")
    with pytest.raises(InvalidRequestError, match="not a scale"):
        registry.address(f"{BASE}:alpha@x")
    with pytest.raises(InvalidRequestError, match="outside"):
        registry.address(f"{BASE}:alpha@100")
    with pytest.raises(InvalidRequestError, match="twice"):
        registry.address(f"{BASE}:alpha+alpha")


def test_parse_stack() -> None:
    assert parse_stack("a@0.7+b") == (("a", 0.7), ("b", 1.0))
    assert parse_stack("a@-0.5") == (("a", -0.5),)
    with pytest.raises(ValueError):
        parse_stack("a@nan")
