"""Which replica runs a request. The router sends each request to the ready replica with the least
outstanding work (prompt tokens not yet computed plus tokens still to generate, as tracked here);
with prefix caching, the replica thought to hold a request's prompt prefix (from the prompt blocks
recently sent to each) counts that prefix as work it need not do. It learns what happens to the
replicas from the supervisor's events (replicas.py): a replica that serves takes the requests that
waited for one, and the requests of one that is lost end with an error."""
import logging
from collections import deque
from dataclasses import dataclass, field

from splitfuse import protocol
from splitfuse.config import SamplingParams
from splitfuse.frontend.replicas import Event, Lost, Outputs, Replica, Serving, Supervisor

log = logging.getLogger(__name__)


def prompt_block_hashes(prompt_ids: list[int], block_size: int) -> list[int]:
    """Chained hashes of the prompt's full blocks. Python's hash of an int tuple is fixed within this
    process: enough for a routing hint (a collision costs one misrouted request, not a wrong answer)."""
    hashes, h = [], 0
    for start in range(0, len(prompt_ids) - block_size + 1, block_size):
        h = hash((h, *prompt_ids[start:start + block_size]))
        hashes.append(h)
    return hashes


@dataclass(slots=True)
class Job:
    """A request as the router tracks it."""
    key: str
    prompt_ids: list[int]
    params: SamplingParams
    max_model_len: int
    stream: bool = True   # false: its worker sends what it generates after the first token in one piece, at the end
    replica: Replica | None = None
    generated: int = 0
    prefix: list[int] = field(default_factory=list)  # prompt_block_hashes, when routing by prefix
    cached: int = 0                                  # prompt tokens its replica probably has cached

    @property
    def work(self) -> int:
        """Tokens this request still costs: its prompt until the first token comes back, then the rest of
        what it can generate: max_new_tokens, capped by the model's length (an upper bound: it may stop sooner)."""
        prompt = len(self.prompt_ids) - self.cached if self.generated == 0 else 0
        return prompt + min(self.params.max_new_tokens, self.max_model_len - len(self.prompt_ids)) - self.generated


def least_loaded(replicas: list[Replica]) -> Replica | None:
    """The ready replica with the least outstanding work; ties go to the lowest index."""
    return min((r for r in replicas if r.ready), key=lambda r: r.outstanding, default=None)


def best_for_prefix(replicas: list[Replica], job: Job, block_size: int) -> Replica | None:
    """The ready replica where the request adds the least to the work outstanding: its prompt less the
    prefix the replica probably holds, on top of what it already has. A hot prefix's replica takes its
    requests until its backlog exceeds another's by what the prefix saves, then the other computes the
    prefix too; without a cached prefix anywhere this is least_loaded. Ties go to the lowest index."""
    return min((r for r in replicas if r.ready), default=None,
               key=lambda r: r.outstanding - block_size * r.cached_prefix_blocks(job.prefix))


class Router:
    def __init__(self, supervisor: Supervisor):
        self.config = supervisor.config
        self.supervisor = supervisor
        self.jobs: dict[str, Job] = {}
        self.waiting: deque[Job] = deque()     # submitted while no replica was ready

    def submit(self, key: str, prompt_ids: list[int], params: SamplingParams, stream: bool = True) -> None:
        job = Job(key, prompt_ids, params, self.supervisor.info.max_model_len, stream)
        if self.config.enable_prefix_caching and self.config.prefix_routing:
            job.prefix = prompt_block_hashes(prompt_ids, self.config.block_size)
        self.jobs[key] = job
        replica = self._choose(job)
        if replica is None:
            self.waiting.append(job)
        else:
            self._dispatch(job, replica)

    def abort(self, key: str) -> None:
        """Forget a request and have its worker free its KV blocks."""
        job = self.jobs.pop(key, None)
        if job is None:
            return
        if job.replica is None:
            self.waiting.remove(job)
        else:
            del job.replica.jobs[key]
            self.supervisor.send(job.replica, protocol.Abort(key))

    def handle(self, events: list[Event]) -> list[protocol.Output | protocol.Error]:
        """The outputs of jobs still tracked, from the supervisor's events; a final one (finish reason or
        error) also ends its job here, and so does the loss of its replica (an error output)."""
        outputs = []
        for event in events:
            if isinstance(event, Serving):
                self._dispatch_waiting()
            elif isinstance(event, Lost):
                outputs += self._fail_jobs(event.replica, event.reason)
            else:
                outputs += self._track(event)
        return outputs

    def _dispatch_waiting(self) -> None:
        """Events are handled after the supervisor saw them all: a replica that became ready may be lost already."""
        while self.waiting and (replica := self._choose(self.waiting[0])) is not None:
            self._dispatch(self.waiting.popleft(), replica)

    def _track(self, event: Outputs) -> list[protocol.Output | protocol.Error]:
        tracked = []
        for out in event.outputs:
            job = event.replica.jobs.get(out.id)
            if job is None:  # aborted meanwhile
                continue
            if isinstance(out, protocol.Error) or out.finish_reason is not None:
                del self.jobs[out.id], event.replica.jobs[out.id]
            else:
                job.generated += len(out.token_ids)
            tracked.append(out)
        return tracked

    def _choose(self, job: Job) -> Replica | None:
        replicas = self.supervisor.replicas
        return best_for_prefix(replicas, job, self.config.block_size) if job.prefix else least_loaded(replicas)

    def _dispatch(self, job: Job, replica: Replica) -> None:
        job.replica = replica
        job.cached = self.config.block_size * replica.cached_prefix_blocks(job.prefix)
        replica.remember(job.prefix)
        replica.jobs[job.key] = job
        replica.served += 1
        self.supervisor.send(replica, protocol.Generate(job.key, prompt_ids=job.prompt_ids, params=job.params,
                                                        stream=job.stream))

    def _fail_jobs(self, replica: Replica, reason: str) -> list[protocol.Output]:
        failed = [protocol.Output(key, finish_reason="error", error=f"{reason} while running this request")
                  for key in replica.jobs]
        for key in replica.jobs:
            del self.jobs[key]
        replica.jobs.clear()
        return failed
