"""Routing: each request goes to the ready replica with the least outstanding work."""
from splitfuse import protocol
from splitfuse.config import EngineConfig, SamplingParams
from splitfuse.frontend.replicas import Lost, Replica, Serving, Supervisor, worker_env
from splitfuse.frontend.router import Job, Router, least_loaded


def _replica(index: int, *jobs: Job, ready: bool = True) -> Replica:
    replica = Replica(index, identity=b"w%d" % index if ready else None)
    replica.jobs = {job.key: job for job in jobs}
    return replica


def test_job_work_is_its_prompt_until_the_first_token_then_what_is_left_to_generate():
    job = Job("a", [1] * 100, SamplingParams(max_new_tokens=10), max_model_len=512)
    assert job.work == 110
    job.generated = 4
    assert job.work == 6


def test_job_work_counts_only_what_the_model_can_generate():
    # max_new_tokens 10**9 is no more work than filling the model's length: its replica still gets requests.
    job = Job("a", [1] * 100, SamplingParams(max_new_tokens=10**9), max_model_len=512)
    assert job.work == 512
    job.generated = 12
    assert job.work == 400
    short = [Job(str(i), [1] * 10, SamplingParams(max_new_tokens=8), max_model_len=512) for i in range(50)]
    assert least_loaded([_replica(0, job), _replica(1, *short[:5])]).index == 1   # 400 against 90
    assert least_loaded([_replica(0, job), _replica(1, *short)]).index == 0       # 400 against 900


def test_routing_picks_the_ready_replica_with_the_least_outstanding_work():
    long_prompt = Job("a", [1] * 1000, SamplingParams(max_new_tokens=8), max_model_len=2048)
    many_short = [Job(str(i), [1] * 10, SamplingParams(max_new_tokens=8), max_model_len=2048) for i in range(5)]
    # Five requests on replica 1 are still less work than one long prompt on replica 0: not round-robin.
    replicas = [_replica(0, long_prompt), _replica(1, *many_short), _replica(2, ready=False)]
    assert least_loaded(replicas).index == 1
    assert least_loaded([_replica(0), _replica(1)]).index == 0
    assert least_loaded([_replica(0, ready=False)]) is None


def test_a_replica_lost_in_the_drain_that_made_it_ready_leaves_the_waiting_jobs_waiting():
    """The router handles a drain's events after the supervisor saw them all: a replica that said ready may
    be gone (here: never ready) by then, and the requests that waited for one must wait on, not crash."""
    supervisor = Supervisor(EngineConfig(), replicas=1)
    try:
        supervisor.info = protocol.Ready(0, 0, "", 4096, "")
        router = Router(supervisor)
        router.submit("a", [1, 2, 3], SamplingParams())
        replica = supervisor.replicas[0]
        assert router.handle([Serving(replica), Lost(replica, "replica 0 exited")]) == []
        assert [job.key for job in router.waiting] == ["a"] and "a" in router.jobs
        replica.identity = b"w0"  # it serves after all: the waiting request goes to it
        assert router.handle([Serving(replica)]) == [] and not router.waiting and "a" in replica.jobs
    finally:
        supervisor.close()


def test_workers_start_with_malloc_asking_for_huge_pages_unless_the_user_said_otherwise(monkeypatch):
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    assert worker_env()["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    assert worker_env()["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=0")
    assert worker_env()["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=0"
