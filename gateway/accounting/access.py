"""Which models a key may use.

A managed key may list the models it may use (``models``; none listed: all
of them). A name on the list covers the model under every name it has: the
canonical name of ``[models]`` and each of its aliases, so a key given
``gpt-4o-mini`` (an alias) may call the model by its own name and the other
way round. An adapter or stack counts as its base model, or as itself when
the list names it. Fallbacks are the operator's routing, not the client's
choice: a request the key may make may be served by its model's fallbacks.
"""

from __future__ import annotations

from gateway.accounting.principal import Principal
from gateway.catalog import Catalog
from gateway.errors import PermissionDeniedError
from gateway.routing import Route


def names_of(catalog: Catalog, asked: str, model: str) -> set[str]:
    """Every name that means this request's model: what was asked, the
    canonical model, its aliases."""
    names = {asked, model}
    names.update(alias for alias, target in catalog.aliases.items() if target == model)
    return names


def check_route(principal: Principal | None, catalog: Catalog, route: Route) -> None:
    """Raises 403 when ``principal`` may not use the route's model."""
    if principal is None or principal.models is None:
        return
    if principal.models.isdisjoint(names_of(catalog, route.name, route.entry.name)):
        raise not_permitted(route.name)


def check_name(principal: Principal | None, catalog: Catalog, asked: str) -> None:
    """Raises 403 for a model of the catalog ``principal`` may not use,
    before any hook sees the request (a hook may answer it: a cache must
    not serve a model to a key that may not use it). Names the catalog does
    not know (adapters, or names a hook rewrites) are checked on the route."""
    if principal is None or principal.models is None or not catalog.knows(asked):
        return
    if principal.models.isdisjoint(names_of(catalog, asked, catalog.canonical(asked))):
        raise not_permitted(asked)


def may_see(principal: Principal | None, catalog: Catalog, name: str, base: str | None) -> bool:
    """Whether ``/v1/models`` shows ``principal`` the model ``name`` (an
    adapter or stack: ``base`` is the model it fine-tunes)."""
    if principal is None or principal.models is None:
        return True
    model = catalog.canonical(base or name)
    return not principal.models.isdisjoint(names_of(catalog, name, model))


def not_permitted(model: str) -> PermissionDeniedError:
    return PermissionDeniedError(
        f"This API key may not use the model `{model}`.",
        param="model",
        code="model_not_permitted",
    )
