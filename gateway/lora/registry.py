"""The adapter registry, and how a ``model`` field addresses adapters.

Adapters are declared in the config (``[lora.adapters.NAME]``) or registered
and removed at run time through the admin API. Every registration checks the
files under the adapter root against the given sha256 before the adapter can
be used; engines check again before each load (the files may have changed).

Addressing, in the ``model`` field of a request:

- ``NAME``: a registered adapter (as vLLM does), on its base model;
- ``STACK``: a named stack from ``[lora.stacks.NAME]``;
- ``BASE:NAME``: the adapter, with its base model spelled out;
- ``BASE:A@0.7+B@0.3``: an ad hoc stack, each adapter with an optional scale
  (default 1.0). Only engines that can stack (llama.cpp) serve stacks and
  scales other than 1.

A model whose own name contains ``:`` is still found by that name first.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from gateway.contract import Adapter, AdapterUse
from gateway.errors import InvalidRequestError, NotFoundError
from gateway.lora.sources import AdapterSourceError, locate, sha256_of
from gateway.lora.uploads import StoredUpload

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
MAX_SCALE = 8.0


@dataclass(frozen=True, slots=True)
class Addressed:
    """A request's base model and the adapters to apply on it."""

    base_model: str
    uses: tuple[AdapterUse, ...]
    # The name answers carry: what the client wrote.
    name: str

    @property
    def needs_stacking(self) -> bool:
        return len(self.uses) > 1 or any(use.scale != 1.0 for use in self.uses)


@dataclass(frozen=True, slots=True)
class Stack:
    name: str
    base_model: str
    parts: tuple[tuple[str, float], ...]


def parse_stack(text: str) -> tuple[tuple[str, float], ...]:
    """``"a@0.7+b"`` -> ``(("a", 0.7), ("b", 1.0))``; raises ValueError."""
    parts = []
    for item in text.split("+"):
        name, _, scale_text = item.strip().partition("@")
        if NAME.fullmatch(name) is None:
            raise ValueError(f"{name!r} is not an adapter name")
        scale = 1.0
        if scale_text:
            try:
                scale = float(scale_text)
            except ValueError:
                raise ValueError(f"{scale_text!r} is not a scale (a number)") from None
            if not math.isfinite(scale) or abs(scale) > MAX_SCALE:
                raise ValueError(f"scale {scale_text} is outside -{MAX_SCALE}..{MAX_SCALE}")
        parts.append((name, scale))
    if len({name for name, _ in parts}) != len(parts):
        raise ValueError("an adapter appears twice in the stack")
    return tuple(parts)


class AdapterRegistry:
    """Every adapter and named stack the gateway knows, by name.

    ``is_model(name)`` says whether a name is a model (or alias) of the
    catalog; ``canonical(name)`` maps an alias to its model.
    """

    def __init__(
        self,
        root: Path | None,
        is_model: Callable[[str], bool],
        canonical: Callable[[str], str],
    ) -> None:
        self.root = root
        self._is_model = is_model
        self._canonical = canonical
        self._adapters: dict[str, Adapter] = {}
        self._stacks: dict[str, Stack] = {}
        self._lock = asyncio.Lock()

    # ------------------------------------------------------------ contents

    @property
    def adapters(self) -> Mapping[str, Adapter]:
        return self._adapters

    @property
    def stacks(self) -> Mapping[str, Stack]:
        return self._stacks

    def add_verified(self, name: str, base_model: str, relative: str, sha256: str) -> Adapter:
        """Blocking (hashes the files). Raises ValueError with a clear message."""
        self._check_new_name(name)
        self._check_base(base_model)
        if _SHA256.fullmatch(sha256) is None:
            raise ValueError("sha256 must be 64 lowercase hex digits")
        if self.root is None:
            raise ValueError("no adapter root is configured (lora.root)")
        try:
            source = locate(self.root, relative)
            actual = sha256_of(source)
        except AdapterSourceError as error:
            raise ValueError(str(error)) from None
        if actual != sha256:
            raise ValueError(f"the files at {relative!r} have sha256 {actual}, not {sha256}")
        adapter = Adapter(
            name,
            self._canonical(base_model),
            sha256,
            source.format,
            source.path,
            source.relative_path,
        )
        self._adapters[name] = adapter
        return adapter

    def add_stack(self, name: str, base_model: str, parts: Iterable[str]) -> Stack:
        self._check_new_name(name)
        if not self._is_model(base_model):
            raise ValueError(f'base model "{base_model}" is not a model of this gateway')
        parsed = parse_stack("+".join(parts))
        base = self._canonical(base_model)
        for adapter_name, _ in parsed:
            adapter = self._adapters.get(adapter_name)
            if adapter is None:
                raise ValueError(f'unknown adapter "{adapter_name}"')
            if adapter.base_model != base:
                raise ValueError(
                    f'adapter "{adapter_name}" is for {adapter.base_model}, not {base}'
                )
        stack = Stack(name, base, parsed)
        self._stacks[name] = stack
        return stack

    async def register(self, name: str, base_model: str, relative: str, sha256: str) -> Adapter:
        """At run time: hash in a worker thread, one registration at a time."""
        async with self._lock:
            try:
                return await asyncio.to_thread(
                    self.add_verified, name, base_model, relative, sha256
                )
            except ValueError as error:
                raise InvalidRequestError(str(error)) from None

    def uploaded(self, name: str, sha256: str) -> Adapter | None:
        """The adapter already registered as ``name`` with these bytes: an
        upload of them again is a no-op."""
        existing = self._adapters.get(name)
        return existing if existing is not None and existing.sha256 == sha256 else None

    def check_upload(self, name: str, base_model: str) -> Path:
        """Whether an upload could be registered as ``name`` on ``base_model``
        (checked before its body is kept); the adapter root to store it in."""
        if self.root is None:
            raise InvalidRequestError("this node has no adapter root (lora.root) to store into")
        try:
            self._check_new_name(name)
            self._check_base(base_model)
        except ValueError as error:
            raise InvalidRequestError(f"adapter upload refused: {error}") from None
        return self.root

    async def register_stored(self, name: str, base_model: str, stored: StoredUpload) -> Adapter:
        """Register uploaded files (see :mod:`gateway.lora.uploads`); if that
        is refused, the files this upload made are removed."""
        try:
            return await self.register(name, base_model, stored.relative, stored.sha256)
        except BaseException:
            stored.discard()
            raise

    def remove(self, name: str) -> Adapter | Stack:
        if name in self._stacks:
            return self._stacks.pop(name)
        adapter = self._adapters.get(name)
        if adapter is None:
            raise NotFoundError(f"no adapter or stack named `{name}`", code="adapter_not_found")
        users = sorted(s.name for s in self._stacks.values() if name in dict(s.parts))
        if users:
            raise InvalidRequestError(
                f"adapter `{name}` is part of the stack(s) {', '.join(users)}; remove them first"
            )
        return self._adapters.pop(name)

    def _check_base(self, base_model: str) -> None:
        if not self._is_model(base_model):
            raise ValueError(f'base model "{base_model}" is not a model of this gateway')

    def _check_new_name(self, name: str) -> None:
        if NAME.fullmatch(name) is None:
            raise ValueError(
                f"{name!r} is not a valid name (letters, digits, '.', '_', '-'; "
                "starting with a letter or digit)"
            )
        if name in self._adapters or name in self._stacks or self._is_model(name):
            raise ValueError(f'the name "{name}" is already taken')

    # ---------------------------------------------------------- addressing

    def address(self, model: str) -> Addressed | None:
        """The adapters ``model`` names, or None if it names none (a plain model).

        Raises NotFoundError for an unknown adapter, InvalidRequestError for a
        malformed stack or one that does not match its base model.
        """
        if self._is_model(model):
            return None
        adapter = self._adapters.get(model)
        if adapter is not None:
            return Addressed(adapter.base_model, (AdapterUse(adapter),), model)
        stack = self._stacks.get(model)
        if stack is not None:
            return Addressed(stack.base_model, self._uses(stack.base_model, stack.parts), model)
        base, colon, spec = model.rpartition(":")
        if not colon or not self._is_model(base):
            return None
        try:
            parts = parse_stack(spec)
        except ValueError as error:
            raise InvalidRequestError(f"model `{model}`: {error}", param="model") from None
        canonical = self._canonical(base)
        return Addressed(canonical, self._uses(canonical, parts), model)

    def _uses(self, base: str, parts: tuple[tuple[str, float], ...]) -> tuple[AdapterUse, ...]:
        uses = []
        for name, scale in parts:
            adapter = self._adapters.get(name)
            if adapter is None:
                raise NotFoundError(
                    f"The model `{name}` does not exist or you do not have access to it.",
                    param="model",
                )
            if adapter.base_model != base:
                raise InvalidRequestError(
                    f"adapter `{name}` fine-tunes {adapter.base_model}, not {base}",
                    param="model",
                )
            uses.append(AdapterUse(adapter, scale))
        return tuple(uses)
