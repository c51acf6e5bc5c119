"""Token prices: charges in exact nano-USD, the worst case over the
deployments a request may reach, and the settings they come from."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway import wire
from gateway.accounting.prices import PriceBook, TokenPrices
from gateway.settings import ConfigError, load_settings


def usage(prompt: int, completion: int, cached: int | None = None) -> wire.Usage:
    details = None if cached is None else wire.PromptTokensDetails(cached_tokens=cached)
    return wire.Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=details,
    )


def settings_of(tmp_path: Path, text: str) -> PriceBook:
    path = tmp_path / "nomoat.toml"
    path.write_text(text)
    return PriceBook.from_settings(load_settings(path))


CONFIG = """
[backends.a]
type = "llamacpp"
usd_per_hour = 0.36
[backends.b]
type = "openai"

[models.small]
fallbacks = ["big"]
[[models.small.deployments]]
backend = "a"
input_usd_per_million = 0.15
output_usd_per_million = 0.6
cached_input_usd_per_million = 0.075
[[models.small.deployments]]
backend = "b"
input_usd_per_million = 2.5
output_usd_per_million = 10.0

[models.big]
deployments = [{ backend = "b", input_usd_per_million = 5.0, output_usd_per_million = 15.0 }]
fallbacks = ["small"]
"""


def test_a_charge_is_exact_in_nano_usd() -> None:
    prices = TokenPrices.of_usd(0.15, 0.6, 0.075)
    # 0.15 USD per million = 0.15e-6 USD a token = 150 nano-USD a token.
    assert prices.charge_nano(1000, 0, 0) == 150_000
    assert prices.charge_nano(1000, 400, 10) == 600 * 150 + 400 * 75 + 10 * 600
    # A third of a nano-USD a token: rounded once, at the end, to the nearest.
    third = TokenPrices.of_usd(0.000_333, 0.0)
    assert third.charge_nano(3, 0, 0) == 1
    assert third.charge_nano(1_000_000, 0, 0) == 333_000
    assert third.charge_nano(1, 0, 0) == 0


def test_cached_input_defaults_to_the_input_price_and_is_clamped() -> None:
    prices = TokenPrices.of_usd(1.0, 2.0)
    assert prices.charge_nano(100, 100, 0) == prices.charge_nano(100, 0, 0) == 100_000
    # An upstream claiming more cached than prompt tokens is not paid for it.
    cheap = TokenPrices.of_usd(1.0, 2.0, 0.5)
    assert cheap.charge_nano(10, 50, 0) == 10 * 500


def test_the_book_charges_usages_and_cut_streams(tmp_path: Path) -> None:
    book = settings_of(tmp_path, CONFIG)
    assert book.charge_nano("small/0", usage(1000, 100, cached=200)) == (
        800 * 150 + 200 * 75 + 100 * 600
    )
    assert book.charge_nano("small/1", usage(10, 10)) == 10 * 2500 + 10 * 10_000
    # A stream cut before its usage: the output tokens counted on it.
    assert book.charge_nano("small/0", None, estimated_output_tokens=7) == 7 * 600
    # A deployment without prices, or unknown, is free.
    assert book.charge_nano("nowhere/0", usage(10, 10)) == 0


def test_the_worst_case_is_the_dearest_reachable_deployment(tmp_path: Path) -> None:
    book = settings_of(tmp_path, CONFIG)
    # Fallbacks included, transitively, each model once (they point at each other).
    assert book.reachable("small") == ("small/0", "small/1", "big/0")
    assert book.reachable("big") == ("big/0", "small/0", "small/1")
    worst = book.worst_case_nano(book.reachable("small"), 1000, 500)
    assert worst == 1000 * 5000 + 500 * 15_000
    assert book.worst_case_nano(["small/0"], 1000, 500) == 1000 * 150 + 500 * 600
    assert book.worst_case_nano([], 1000, 500) == 0
    # Per model, from the prices gathered once (the request path's way): the same.
    for model in ("small", "big"):
        for sizes in ((1000, 500), (1, 0), (0, 7)):
            assert book.model_worst_case_nano(model, *sizes) == book.worst_case_nano(
                book.reachable(model), *sizes
            )
    assert book.model_worst_case_nano("nowhere", 1000, 500) == 0


def test_backends_carry_their_price_per_hour(tmp_path: Path) -> None:
    book = settings_of(tmp_path, CONFIG)
    assert book.usd_per_hour("a") == pytest.approx(0.36)
    assert book.usd_per_hour("b") is None


def test_the_old_single_price_is_refused_naming_the_new_keys(tmp_path: Path) -> None:
    path = tmp_path / "nomoat.toml"
    path.write_text(
        '[backends.a]\ntype = "llamacpp"\n'
        '[models.m]\ndeployments = [{ backend = "a", cost_per_million_tokens = 1.0 }]\n'
    )
    with pytest.raises(ConfigError) as raised:
        load_settings(path)
    (problem,) = raised.value.problems
    assert problem.startswith("models.m.deployments[0]")
    assert "input_usd_per_million" in problem and "output_usd_per_million" in problem
