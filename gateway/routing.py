"""From the ``model`` a client named to the deployments that may serve it.

One step resolves the name (a model, an alias, an adapter, a named or ad hoc
stack) into a :class:`Route`: the model that serves it, its fallbacks, the
adapters to apply, and the prompt-size estimate the rules read (made once).
Then, for each model of the route in turn, :meth:`Router.eligible` gives the
deployments that can serve this request: the pool its rules pick, aimed at
the adapters, without those whose engine lacks a feature the request uses.
Health, cooldown and the policy's ranking come after, in the pipeline.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from gateway.catalog import Catalog, ModelEntry
from gateway.contract import (
    AdapterUse,
    AnyRequest,
    Backend,
    Candidate,
    RequestContext,
    SupportsEmbeddings,
)
from gateway.errors import InvalidRequestError
from gateway.lora.registry import AdapterRegistry, Addressed
from gateway.rules import estimate_prompt_tokens, select_pool
from gateway.stats import serves_adapters
from gateway.validation import missing_feature, needs_capabilities, unsupported


@dataclass(frozen=True, slots=True)
class Route:
    """Where one request may go: its model first, then the fallbacks."""

    # The name the client wrote; answers carry it.
    name: str
    chain: tuple[ModelEntry, ...]
    adapters: tuple[AdapterUse, ...] = ()
    # Estimated only when some model of the chain has rules.
    prompt_tokens: int = 0
    # For POST /v1/embeddings (else chat or completions).
    embeddings: bool = False

    @property
    def entry(self) -> ModelEntry:
        return self.chain[0]

    @property
    def needs_stacking(self) -> bool:
        return len(self.adapters) > 1 or any(use.scale != 1.0 for use in self.adapters)


class Router:
    def __init__(
        self,
        catalog: Catalog,
        backends: Mapping[str, Backend],
        adapters: AdapterRegistry | None = None,
    ) -> None:
        self.catalog = catalog
        self.backends = backends
        self.adapters = adapters

    def resolve(self, request: AnyRequest, *, embeddings: bool = False) -> Route:
        """Raises NotFoundError for an unknown name, InvalidRequestError for a
        malformed adapter stack. ``embeddings``: the request is for
        embeddings (its completion-shaped view, see gateway/embeddings)."""
        name = request.model
        addressed = None if self.catalog.knows(name) else self._address(name)
        if addressed is not None:
            # An adapter fine-tunes one base model: other models are no fallback.
            chain: tuple[ModelEntry, ...] = (self.catalog.resolve(addressed.base_model),)
            uses = addressed.uses
        else:
            entry = self.catalog.resolve(name)
            chain = (entry, *(self.catalog.resolve(f) for f in entry.fallbacks))
            uses = ()
        has_rules = any(model.rules for model in chain)
        tokens = estimate_prompt_tokens(request) if has_rules else 0
        return Route(name, chain, uses, tokens, embeddings)

    def _address(self, name: str) -> Addressed | None:
        return self.adapters.address(name) if self.adapters is not None else None

    def eligible(
        self, route: Route, model: ModelEntry, request: AnyRequest, ctx: RequestContext
    ) -> list[Candidate]:
        """The deployments of ``model`` that can serve ``request``. For the
        route's own model, none is a 400 that says why; a fallback that cannot
        serve it is simply skipped."""
        strict = model is route.entry
        if not _serves(route, model, strict):
            return []
        pool = list(select_pool(model.candidates, model.rules, route.prompt_tokens, ctx))
        if route.embeddings:
            pool = self._embedding(route, pool, strict)
        if route.adapters:
            pool = self._aimed_at_adapters(route, pool, strict)
        if needs_capabilities(request):
            pool = self._capable(route, pool, request, strict)
        return pool

    def _embedding(self, route: Route, pool: Sequence[Candidate], strict: bool) -> list[Candidate]:
        able = [c for c in pool if _embeds(self.backends[c.backend], c.target.engine_model)]
        if not able and strict:
            raise InvalidRequestError(
                f"model `{route.name}`: no deployment of {route.entry.name} can make embeddings "
                f"(its backends: {_names(pool)})",
                param="model",
            )
        return able

    def _aimed_at_adapters(
        self, route: Route, pool: Sequence[Candidate], strict: bool
    ) -> list[Candidate]:
        stacking = route.needs_stacking
        able = [c for c in pool if _applies(self.backends[c.backend], stacking)]
        if not able and strict:
            what = "a stack of adapters or a scale" if stacking else "an adapter"
            raise InvalidRequestError(
                f"model `{route.name}`: {what} needs an engine that can apply it, and no "
                f"deployment of {route.entry.name} can (its backends: {_names(pool)})",
                param="model",
            )
        return [
            dataclasses.replace(
                c,
                target=dataclasses.replace(c.target, model=route.name, adapters=route.adapters),
            )
            for c in able
        ]

    def _capable(
        self, route: Route, pool: Sequence[Candidate], request: AnyRequest, strict: bool
    ) -> list[Candidate]:
        capable, lacking = [], None
        for candidate in pool:
            backend = self.backends[candidate.backend]
            missing = missing_feature(request, backend.capabilities(candidate.target.engine_model))
            if missing is None:
                capable.append(candidate)
            else:
                lacking = lacking or missing
        if not capable and lacking is not None and strict:
            raise unsupported(route.name, lacking, _names(pool))
        return capable


def _serves(route: Route, model: ModelEntry, strict: bool) -> bool:
    """Whether ``model`` serves what the route is for (a fallback that does
    not is skipped; the route's own model is a 400 naming it)."""
    wanted = "embeddings" if route.embeddings else "chat"
    if wanted in model.capabilities:
        return True
    if not strict:
        return False
    if route.embeddings:
        message = f"model `{route.name}` does not make embeddings: it is a chat model"
    else:
        message = f"model `{route.name}` is an embedding model: it serves POST /v1/embeddings only"
    raise InvalidRequestError(message, param="model")


def _embeds(backend: Backend, engine_model: str) -> bool:
    return isinstance(backend, SupportsEmbeddings) and backend.embeds(engine_model)


def _applies(backend: Backend, stacking: bool) -> bool:
    return serves_adapters(backend) and (backend.can_stack() or not stacking)


def _names(pool: Sequence[Candidate]) -> str:
    return ", ".join(sorted({c.backend for c in pool})) or "none"
