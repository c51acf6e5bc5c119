"""nomoat-template: the smallest complete nomoat plugin. Copy it to start one.

It offers one of each kind of component most plugins need:

* a request hook, ``type = "blocklist"``: rejects requests whose ``user``
  field is in a configured list, with a 403 (``PermissionDeniedError``);
* a routing policy, ``policy = "reverse-order"``: tries a model's deployments
  last-configured first, each with a score and a reason.

To make your own: copy the folder, rename the distribution (``pyproject.toml``)
and the import package, change the names in :data:`manifest` (they must not
clash with another installed plugin's), and keep to ``gateway.contract``: it is
the only nomoat module a plugin may rely on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from pydantic import BaseModel, ConfigDict

# Everything a plugin needs comes from the contract (types, errors, manifest).
from gateway.contract import (
    AnyRequest,
    AnyResponse,
    Candidate,
    CandidateStats,
    HookType,
    PermissionDeniedError,
    PluginManifest,
    PolicyType,
    RankedCandidate,
    RequestContext,
)

__all__ = ["BlocklistConfig", "BlocklistHook", "ReverseOrderConfig", "ReverseOrderPolicy"]

# ----------------------------------------------------------------- the hook


class BlocklistConfig(BaseModel):
    """The ``options`` table of a ``[[hooks]]`` entry with ``type = "blocklist"``.

    ``extra="forbid"`` makes a misspelt option a config error, reported by path
    (``hooks[0].options.blocked: unknown key``) by ``nomoat check-config``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Values of the request's `user` field to refuse.
    blocked_users: frozenset[str] = frozenset()
    # The message the client gets (in the OpenAI error body).
    message: str = "This user is not allowed to use this gateway."


class BlocklistHook:
    """A request hook: it only needs ``on_request`` (see ``RequestHook``).

    Returning the request lets it go on; raising a ``GatewayError`` subclass
    rejects it with that error's status and message. Any other exception
    would be reported as a 500 ``hook_failed`` naming the hook (or the hook
    skipped, with ``fail_open = true``).
    """

    def __init__(self, config: BlocklistConfig) -> None:
        self.config = config
        self.rejected = 0  # observable in tests

    async def on_request(
        self, request: AnyRequest, ctx: RequestContext
    ) -> AnyRequest | AnyResponse:
        if request.user is not None and request.user in self.config.blocked_users:
            self.rejected += 1
            raise PermissionDeniedError(self.config.message, param="user")
        return request


# --------------------------------------------------------------- the policy


class ReverseOrderConfig(BaseModel):
    """A model's ``policy_options``; this policy takes none."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ReverseOrderPolicy:
    """A routing policy: ``rank`` orders the healthy candidates, best first.

    It runs on the event loop for every request, so it must be quick and must
    not block. Candidates it leaves out are not tried.
    """

    def rank(
        self,
        request: AnyRequest,
        ctx: RequestContext,
        candidates: Sequence[Candidate],
        stats: Mapping[str, CandidateStats],
    ) -> list[RankedCandidate]:
        count = len(candidates)
        return [
            RankedCandidate(
                candidate, float(position + 1), f"position {position} of {count}, reversed"
            )
            for position, candidate in reversed(list(enumerate(candidates)))
        ]


# ------------------------------------------------------------- the manifest

# Factories take the validated config and return the component.


def _blocklist(config: BlocklistConfig) -> BlocklistHook:
    return BlocklistHook(config)


def _reverse_order(config: ReverseOrderConfig) -> ReverseOrderPolicy:
    return ReverseOrderPolicy()


# The entry point (pyproject.toml, group "nomoat.plugins") names this object.
manifest = PluginManifest(
    name="template",
    hooks={"blocklist": HookType(BlocklistConfig, _blocklist)},
    policies={"reverse-order": PolicyType(ReverseOrderConfig, _reverse_order)},
)
