"""A queue whose owners (API keys) take turns: one owner with many jobs
waiting cannot make another's wait behind all of them. The chat scheduler
(:mod:`gateway.engine.scheduler`) and the embedding engine
(:mod:`gateway.engine.embedding`) queue their work in one."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar


class Owned(Protocol):
    @property
    def owner(self) -> str: ...


J = TypeVar("J", bound=Owned)


@dataclass(slots=True)
class FairQueue(Generic[J]):
    """Jobs by owner; :meth:`pop` takes the next owner's oldest job."""

    by_owner: dict[str, deque[J]] = field(default_factory=dict)
    turns: deque[str] = field(default_factory=deque)
    size: int = 0

    def push(self, job: J) -> None:
        if job.owner not in self.by_owner:
            self.by_owner[job.owner] = deque()
            self.turns.append(job.owner)
        self.by_owner[job.owner].append(job)
        self.size += 1

    def pop(self) -> J:
        owner = self.turns.popleft()
        jobs = self.by_owner[owner]
        job = jobs.popleft()
        self.size -= 1
        if jobs:
            self.turns.append(owner)
        else:
            del self.by_owner[owner]
        return job

    def discard(self, job: J) -> bool:
        """Take ``job`` out of the queue; False if it was not queued."""
        jobs = self.by_owner.get(job.owner)
        if jobs is None or job not in jobs:
            return False
        jobs.remove(job)
        self.size -= 1
        if not jobs:
            del self.by_owner[job.owner]
            self.turns.remove(job.owner)
        return True
