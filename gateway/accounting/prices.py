"""Token prices: what a request is charged on a deployment, in nano-USD.

Each deployment may carry ``input_usd_per_million``,
``output_usd_per_million`` and ``cached_input_usd_per_million`` (what a
hosted API charges, or what the operator charges for a self-hosted model).
Prices are held as integer nano-USD per million tokens, so a charge is exact
integer arithmetic rounded once, to the nearest nano-USD: sums over a ledger
never drift and a budget compares exactly.

A self-hosted node's own price (``usd_per_hour`` on its backend) is not a
token price: :mod:`gateway.accounting.compute` apportions it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from gateway import wire
from gateway.accounting.money import to_nano
from gateway.settings import Settings

TOKENS_PER_PRICE = 1_000_000


@dataclass(frozen=True, slots=True)
class TokenPrices:
    """One deployment's prices, each in nano-USD per million tokens."""

    input: int = 0
    cached_input: int = 0
    output: int = 0

    @classmethod
    def of_usd(
        cls, input_usd: float, output_usd: float, cached_input_usd: float | None = None
    ) -> TokenPrices:
        """From USD per million tokens; cached input defaults to the input price."""
        cached = input_usd if cached_input_usd is None else cached_input_usd
        return cls(to_nano(input_usd), to_nano(cached), to_nano(output_usd))

    @property
    def free(self) -> bool:
        return not (self.input or self.cached_input or self.output)

    def charge_nano(self, prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> int:
        """The charge of a usage: uncached prompt tokens at the input price,
        cached ones at the cached price, completion at the output price."""
        cached = max(0, min(cached_tokens, prompt_tokens))
        scaled = (
            (prompt_tokens - cached) * self.input
            + cached * self.cached_input
            + completion_tokens * self.output
        )
        return _per_million(scaled)

    def worst_case_nano(self, prompt_tokens: int, completion_tokens: int) -> int:
        """The most a request of this size can be charged: no prompt token
        cached (unless cached input is the dearer), every completion token
        generated."""
        prompt_price = max(self.input, self.cached_input)
        return _per_million(prompt_tokens * prompt_price + completion_tokens * self.output)

    def per_million_usd(self) -> float:
        """One number for ranking: input plus output price per million tokens
        (a request's tokens are mostly one or the other; the sum orders
        deployments the way a mixed workload pays)."""
        return (self.input + self.output) / 1e9


FREE = TokenPrices()


def _per_million(scaled: int) -> int:
    """``scaled`` / 1e6, rounded half up (all inputs are non-negative)."""
    return (scaled + TOKENS_PER_PRICE // 2) // TOKENS_PER_PRICE


def cached_tokens(usage: wire.Usage) -> int:
    details = usage.prompt_tokens_details
    return (details.cached_tokens or 0) if details is not None else 0


@dataclass(frozen=True, slots=True)
class PriceBook:
    """Every deployment's token prices (by deployment id, ``"<model>/<index>"``
    as :class:`gateway.contract.Target` names it) and every self-hosted
    backend's price per hour. Unknown deployments are free."""

    deployments: Mapping[str, TokenPrices] = field(default_factory=dict)
    # Per model: the deployment ids it and its fallbacks (transitively) may reach.
    reachable_ids: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # Per backend name: its price per hour in USD, for self-hosted nodes that set one.
    hourly_usd: Mapping[str, float] = field(default_factory=dict)
    # Per model: the distinct prices of the deployments it may reach, the
    # free ones left out (a free one adds nothing to a worst case), so a
    # request's worst case walks only those: none at all without prices.
    _priced: Mapping[str, tuple[TokenPrices, ...]] = field(
        init=False, repr=False, compare=False, default_factory=dict
    )

    def __post_init__(self) -> None:
        priced = {
            model: _priced(self.deployments.get(d, FREE) for d in ids)
            for model, ids in self.reachable_ids.items()
        }
        object.__setattr__(self, "_priced", priced)

    @classmethod
    def from_settings(cls, settings: Settings) -> PriceBook:
        prices = {
            f"{name}/{index}": TokenPrices.of_usd(
                d.input_usd_per_million, d.output_usd_per_million, d.cached_input_usd_per_million
            )
            for name, model in settings.models.items()
            for index, d in enumerate(model.deployments)
        }
        reachable = {name: _reachable(settings, name) for name in settings.models}
        hourly = {
            name: backend.usd_per_hour
            for name, backend in settings.backends.items()
            if backend.usd_per_hour is not None
        }
        return cls(prices, reachable, hourly)

    def prices(self, deployment: str) -> TokenPrices:
        return self.deployments.get(deployment, FREE)

    def charge_nano(
        self, deployment: str, usage: wire.Usage | None, estimated_output_tokens: int | None = None
    ) -> int:
        """What a request that ended with ``usage`` on ``deployment`` is
        charged. Without a usage (a stream cut before it came) only the
        output tokens counted on the stream are known and charged."""
        prices = self.deployments.get(deployment, FREE)
        if prices is FREE or prices.free:
            return 0
        if usage is None:
            return prices.charge_nano(0, 0, estimated_output_tokens or 0)
        return prices.charge_nano(
            usage.prompt_tokens, cached_tokens(usage), usage.completion_tokens
        )

    def worst_case_nano(
        self, deployments: Iterable[str], prompt_tokens: int, completion_tokens: int
    ) -> int:
        """The highest charge a request of ``prompt_tokens`` asking for up to
        ``completion_tokens`` can reach on any of ``deployments`` (the ones
        it may be served by: see :meth:`reachable`)."""
        worst = 0
        for deployment in deployments:
            charge = self.prices(deployment).worst_case_nano(prompt_tokens, completion_tokens)
            worst = max(worst, charge)
        return worst

    def model_worst_case_nano(self, model: str, prompt_tokens: int, completion_tokens: int) -> int:
        """:meth:`worst_case_nano` over the deployments ``model`` may reach
        (:meth:`reachable`), from the prices gathered once per model."""
        worst = 0
        for prices in self._priced.get(model, ()):
            charge = prices.worst_case_nano(prompt_tokens, completion_tokens)
            if charge > worst:
                worst = charge
        return worst

    def reachable(self, model: str) -> tuple[str, ...]:
        """The deployment ids a request for ``model`` (a catalog name) may be
        served by: its own, then its fallbacks' (transitively)."""
        return self.reachable_ids.get(model, ())

    def usd_per_hour(self, backend: str) -> float | None:
        return self.hourly_usd.get(backend)


def _priced(prices: Iterable[TokenPrices]) -> tuple[TokenPrices, ...]:
    return tuple(dict.fromkeys(p for p in prices if not p.free))


def _reachable(settings: Settings, model: str) -> tuple[str, ...]:
    seen: list[str] = []
    order = [model]
    ids: list[str] = []
    while order:
        name = order.pop(0)
        if name in seen or name not in settings.models:
            continue
        seen.append(name)
        entry = settings.models[name]
        ids.extend(f"{name}/{index}" for index in range(len(entry.deployments)))
        order.extend(entry.fallbacks)
    return tuple(ids)
