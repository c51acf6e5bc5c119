"""Before every load, an adapter's registered files are hashed again.

Registration checks the files against their sha256 once; the files can
change after that (a training job writing into the same folder, a sync
job, a half-finished copy). So every load into an engine hashes them again
first: vLLM's ``/v1/load_lora_adapter``, an edge node's registration or
upload, the llama.cpp engine's load (reusing a GGUF made earlier too).

The files are read in full every time, in a worker thread. No cache keyed
by size and modification time: timestamps are coarse (a clock tick) and
can be set back (``cp -p``, ``rsync -t``), so an unchanged stat does not
prove unchanged bytes; and loads are rare next to requests (once per
adapter until it is evicted), while the engine reads the same bytes anyway.

A mismatch is the operator's problem, not the client's: a 500 naming the
adapter (not retried on another deployment: they all load the same files),
with the details in the log.
"""

from __future__ import annotations

import asyncio
import logging

from gateway.contract import Adapter
from gateway.errors import InternalError
from gateway.lora.sources import AdapterSource, sha256_of

_log = logging.getLogger(__name__)
FILES_CHANGED = "adapter_files_changed"


def source_of(adapter: Adapter) -> AdapterSource:
    return AdapterSource(adapter.path, adapter.relative_path, adapter.format)


async def check_files(adapter: Adapter, engine: str) -> None:
    """Hash ``adapter``'s files (in a worker thread); refuse a load into
    ``engine`` unless they still hash to the registered sha256."""
    try:
        actual = await asyncio.to_thread(sha256_of, source_of(adapter))
    except OSError as error:
        raise unreadable(adapter, engine, error) from None
    expect_sha256(adapter, engine, actual)


def expect_sha256(adapter: Adapter, engine: str, actual: str) -> None:
    """Refuse a load of bytes hashing to ``actual`` unless that is ``adapter``'s sha256."""
    if actual != adapter.sha256:
        raise files_changed(adapter, engine, f"its files hash to {actual}")


def unreadable(adapter: Adapter, engine: str, error: OSError) -> InternalError:
    return files_changed(adapter, engine, f"its files cannot be read ({error})")


def files_changed(adapter: Adapter, engine: str, detail: str) -> InternalError:
    """Log the refusal for the operator; the error to send the client."""
    _log.error(
        "%s: refused to load adapter %s from %s: %s, not the registered %s "
        "(restore the files, or register the adapter again)",
        engine,
        adapter.name,
        adapter.path,
        detail,
        adapter.sha256,
    )
    return InternalError(
        f"adapter `{adapter.name}` cannot be loaded: its files no longer match the sha256 "
        "it was registered with; the gateway's operator must restore them or register "
        "it again",
        code=FILES_CHANGED,
    )
