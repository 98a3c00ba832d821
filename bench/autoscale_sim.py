"""Autoscaling simulation: the formula's pool against a fixed pool sized for the peak.

    python bench/autoscale_sim.py [--loads 10000] [--seed 1] [--target-drain-s 120]
        [--formula-target-s S] [--interval-s 15] [--startup-s 30] [--rate-window-s 3600]
        [--min-workers 0] [--max-workers 20] [--concurrency 2]

A discrete-event simulation (``heapq``, no sleeping; a few seconds at most) of a bursty
arrival trace: quiet periods with sparse Poisson arrivals, and spikes of a few hundred
loads. Model sizes are log-normal (median 800 MB) clipped to 1 MB..20 GB, and a load takes
a fixed overhead plus its size over a bandwidth (1 s + size / 400 MB/s). A worker runs
``--concurrency`` loads at once and takes jobs first-come first-served.

Two pools run the same trace:

(a) **policy**: every ``--interval-s`` it evaluates ``loadwarden.worker.ops.autoscale.decide``
    on the ready and running jobs, with ``target_drain_s`` = ``--formula-target-s``
    (default ``(target - interval - start-up) / 2``, as the README and
    ``AutoscalePolicy.target_drain_s`` advise) and the service rate
    measured over ``--rate-window-s`` by production's ``autoscale.service_rate`` (jobs
    per busy slot-second, times the slots of a worker). New workers take
    ``--startup-s`` to come up and cost worker-seconds meanwhile; surplus ones still
    starting are cancelled, running ones leave only when idle (newest first). No
    stabilisation window: KEDA/HPA add one in a cluster, which costs more worker-seconds.
(b) **fixed**: as many workers as the policy ever wanted, up from the start.

Scale-down is modelled as a ReplicaSet does it (``--victims replicaset``): workers still
starting go first, then the newest, busy or not. A removed busy worker takes no more jobs
and its loads get ``--drain-grace-s``; those that need longer are killed and queued again.
The policy also keeps KEDA's running-jobs trigger as a floor (``--running-per-worker``).
A second table runs the same trace three ways: the deployment before issue #15 (running
trigger at the concurrency, 30 s grace), this one (1 per worker, grace = deadline ceiling),
and an oracle that removes only idle workers (what a pod-deletion cost could at best buy).

For each it prints the backlog drain time after each burst (from the burst's last arrival
to the end of its last load; max and p95), the wait of a job before it starts, and the
worker-seconds over the same horizon; then the ratio policy/fixed, PASS or FAIL on the
issue's goal (the policy drains every burst within ``--target-drain-s`` with fewer
worker-seconds than the fixed pool, and no scale-down kills a load), and a one-line JSON
summary. Exit status 0 on PASS.

The formula sizes the pool to drain a backlog in ``target_drain_s`` from when it is
measured, but workers arrive up to ``--interval-s`` + ``--startup-s`` later, a burst's
last load may be its largest, and job counts ignore sizes. So a formula target equal to
the checked one overshoots it; ``--formula-target-s`` budgets for that, e.g.
``(target - interval - start-up) / 2``.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import random
import sys
from collections import deque
from dataclasses import dataclass, field, replace

from loadwarden.worker.ops.autoscale import AutoscaleInput, decide, service_rate

MB = 1_000_000


@dataclass(frozen=True, slots=True)
class Job:
    """One load of the trace."""

    arrival_s: float
    service_s: float
    burst: int | None  # index of the burst it arrived in; None in a quiet period


@dataclass(frozen=True, slots=True)
class Trace:
    """Jobs sorted by arrival, and each burst's last arrival."""

    jobs: list[Job]
    burst_ends_s: list[float]


@dataclass(frozen=True, slots=True)
class TraceShape:
    """The arrival and size distributions (defaults: a catalog-like mix, bursts of hundreds)."""

    loads: int = 10_000
    median_bytes: float = 800 * MB
    sigma: float = 1.5
    min_bytes: float = 1 * MB
    max_bytes: float = 20_000 * MB
    bandwidth_bytes_per_s: float = 400 * MB
    overhead_s: float = 1.0
    burst_jobs: tuple[int, int] = (50, 300)
    burst_s: tuple[float, float] = (5.0, 90.0)
    quiet_s: tuple[float, float] = (600.0, 2400.0)
    quiet_rate_per_s: tuple[float, float] = (0.005, 0.03)


def make_trace(shape: TraceShape, rng: random.Random) -> Trace:
    """Alternate quiet periods and bursts (Poisson arrivals in each) until ``loads`` jobs."""
    jobs: list[Job] = []
    burst_ends: list[float] = []
    now = 0.0

    def add(at: float, burst: int | None) -> None:
        size = rng.lognormvariate(math.log(shape.median_bytes), shape.sigma)
        size = min(shape.max_bytes, max(shape.min_bytes, size))
        jobs.append(Job(at, shape.overhead_s + size / shape.bandwidth_bytes_per_s, burst))

    while len(jobs) < shape.loads:
        quiet_end = now + rng.uniform(*shape.quiet_s)
        rate = rng.uniform(*shape.quiet_rate_per_s)
        while len(jobs) < shape.loads:
            now += rng.expovariate(rate)
            if now >= quiet_end:
                now = quiet_end
                break
            add(now, None)
        count = min(rng.randint(*shape.burst_jobs), shape.loads - len(jobs))
        if count == 0:
            break
        rate = count / rng.uniform(*shape.burst_s)
        for _ in range(count):
            now += rng.expovariate(rate)
            add(now, len(burst_ends))
        burst_ends.append(now)
    return Trace(jobs, burst_ends)


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    """The formula's parameters, the cluster's reaction times and how it removes workers."""

    target_drain_s: float
    min_workers: int
    max_workers: int
    default_rate: float
    interval_s: float
    startup_s: float
    rate_window_s: float
    #: The running-jobs trigger: never fewer workers than ceil(running / this).
    running_per_worker: int = 1
    #: "replicaset": the newest pods go first, busy or not (a ReplicaSet cannot see what a
    #: pod runs); "idle-first": only idle workers go (what a pod-deletion cost would buy).
    victims: str = "replicaset"
    #: SIGTERM's drain grace: a removed worker's loads that need longer are killed and rerun.
    drain_grace_s: float = 540.0


@dataclass(slots=True)
class _Worker:
    requested_s: float
    up: bool = False
    running: int = 0
    gone_s: float | None = None
    jobs: set[int] = field(default_factory=set)


@dataclass(slots=True)
class RunResult:
    """What one pool did with the trace."""

    drains_s: list[float]
    waits_s: list[float]
    worker_spans: list[tuple[float, float | None]]
    end_s: float
    max_desired: int = 0
    decisions: int = 0
    default_rate_used: int = 0
    #: Busy workers removed, loads killed by a drain that ran out, and their lost load-seconds.
    busy_removed: int = 0
    killed_loads: int = 0
    killed_load_s: float = 0.0

    def worker_seconds(self, horizon_s: float) -> float:
        """Worker-seconds from each request to its removal, or to ``horizon_s``."""
        return sum(min(horizon_s, end or horizon_s) - start for start, end in self.worker_spans)


# Event kinds, in the order they are handled at equal times: a load that ends frees its
# slot before a new one is dispatched, and the scaler sees the state after both.
_DONE, _UP, _ARRIVE, _EVALUATE, _KILL = range(5)
# A _DONE event's payload packs the job's index and its worker's: job * _SPLIT + worker.
_SPLIT = 1 << 20


@dataclass
class _Simulation:
    """One pool, one trace: a policy-driven pool when ``policy`` is set, else a fixed one."""

    trace: Trace
    concurrency: int
    policy: PolicyConfig | None
    fixed_workers: int = 0
    now: float = 0.0
    workers: list[_Worker] = field(default_factory=list)
    ready: deque[int] = field(default_factory=deque)
    events: list[tuple[float, int, int, int]] = field(default_factory=list)
    seq: int = 0
    running: int = 0
    left: int = 0
    burst_left: list[int] = field(default_factory=list)
    result: RunResult = field(default_factory=lambda: RunResult([], [], [], 0.0))
    # Rate observation: totals so far, and (time, completed, busy_slot_s) at each decision.
    completed: int = 0
    busy_slot_s: float = 0.0
    samples: deque[tuple[float, int, float]] = field(default_factory=deque)
    #: When each running job started and will end (a DONE for another end is stale).
    started: dict[int, float] = field(default_factory=dict)
    ends: dict[int, float] = field(default_factory=dict)

    def push(self, at: float, kind: int, payload: int) -> None:
        self.seq += 1
        heapq.heappush(self.events, (at, kind, self.seq, payload))

    def run(self) -> RunResult:
        """Replay the whole trace; the result's spans are open for workers still up."""
        self.burst_left = [0] * len(self.trace.burst_ends_s)
        for index, job in enumerate(self.trace.jobs):
            self.push(job.arrival_s, _ARRIVE, index)
            if job.burst is not None:
                self.burst_left[job.burst] += 1
        self.result.drains_s = [0.0] * len(self.burst_left)
        self.left = len(self.trace.jobs)
        if self.policy is None:
            self.workers = [_Worker(0.0, up=True) for _ in range(self.fixed_workers)]
        else:
            self.push(0.0, _EVALUATE, 0)
        while self.events:
            at, kind, _, payload = heapq.heappop(self.events)
            self.busy_slot_s += self.running * (at - self.now)
            self.now = at
            if kind == _DONE:
                job_index, worker_index = divmod(payload, _SPLIT)
                if self.ends.get(job_index) == at:
                    self.finish(job_index, worker_index)
            elif kind == _KILL:
                self.kill(*divmod(payload, _SPLIT))
            elif kind == _UP:
                worker = self.workers[payload]
                worker.up = worker.gone_s is None
            elif kind == _ARRIVE:
                self.ready.append(payload)
            else:
                self.evaluate()
            self.dispatch()
        self.result.end_s = self.now
        self.result.worker_spans = [(w.requested_s, w.gone_s) for w in self.workers]
        return self.result

    def finish(self, job_index: int, worker_index: int) -> None:
        """A load ends: free its slot; the last load of a burst ends that burst's drain."""
        self.workers[worker_index].running -= 1
        self.workers[worker_index].jobs.discard(job_index)
        self.ends.pop(job_index, None)
        self.running -= 1
        self.completed += 1
        self.left -= 1
        burst = self.trace.jobs[job_index].burst
        if burst is not None:
            self.burst_left[burst] -= 1
            if self.burst_left[burst] == 0:
                self.result.drains_s[burst] = self.now - self.trace.burst_ends_s[burst]

    def dispatch(self) -> None:
        """Oldest workers first, as if they polled first: newer ones go idle and can leave."""
        for index, worker in enumerate(self.workers):
            if not self.ready:
                return
            if not worker.up or worker.gone_s is not None:
                continue
            while self.ready and worker.running < self.concurrency:
                job_index = self.ready.popleft()
                job = self.trace.jobs[job_index]
                self.result.waits_s.append(self.now - job.arrival_s)
                worker.running += 1
                worker.jobs.add(job_index)
                self.running += 1
                self.started[job_index] = self.now
                self.ends[job_index] = self.now + job.service_s
                self.push(self.now + job.service_s, _DONE, job_index * _SPLIT + index)

    def kill(self, job_index: int, worker_index: int) -> None:
        """The drain grace ran out: the load is killed and its job queued again, first."""
        if job_index not in self.workers[worker_index].jobs:
            return
        worker = self.workers[worker_index]
        worker.jobs.discard(job_index)
        worker.running -= 1
        self.running -= 1
        self.ends.pop(job_index, None)
        self.result.killed_loads += 1
        self.result.killed_load_s += self.now - self.started[job_index]
        self.ready.appendleft(job_index)

    def remove(self, index: int, grace_s: float) -> None:
        """SIGTERM: the worker takes no more jobs; its loads get ``grace_s`` to finish."""
        worker = self.workers[index]
        if not worker.jobs:
            worker.gone_s = self.now
            return
        self.result.busy_removed += 1
        deadline = self.now + grace_s
        for job_index in worker.jobs:
            if self.ends[job_index] > deadline:
                self.push(deadline, _KILL, job_index * _SPLIT + index)
        worker.gone_s = min(deadline, max(self.ends[j] for j in worker.jobs))

    def observed_rate(self, policy: PolicyConfig) -> float | None:
        """The service rate over the last rate window, by production's formula: the jobs
        completed per busy slot-second, times the slots of a worker."""
        self.samples.append((self.now, self.completed, self.busy_slot_s))
        while self.samples[0][0] < self.now - policy.rate_window_s:
            self.samples.popleft()
        _since_s, completed, busy_slot_s = self.samples[0]
        return service_rate(
            self.completed - completed, self.busy_slot_s - busy_slot_s, self.concurrency
        )

    def evaluate(self) -> None:
        """Ask the formula, start or retire workers, and schedule the next evaluation."""
        policy = self.policy
        assert policy is not None
        decision = decide(
            AutoscaleInput(
                ready=len(self.ready),
                running=self.running,
                service_rate_per_worker=self.observed_rate(policy),
                target_drain_s=policy.target_drain_s,
                min_workers=policy.min_workers,
                max_workers=policy.max_workers,
                default_service_rate_per_worker=policy.default_rate,
            )
        )
        # KEDA runs the larger of its triggers: the running-jobs one is a floor.
        floor = math.ceil(self.running / policy.running_per_worker)
        desired = min(policy.max_workers, max(decision.desired, floor))
        self.result.decisions += 1
        self.result.default_rate_used += decision.service_rate_per_worker == policy.default_rate
        self.result.max_desired = max(self.result.max_desired, desired)
        live = [i for i, w in enumerate(self.workers) if w.gone_s is None]
        excess = len(live) - desired
        for _ in range(-excess):
            self.workers.append(_Worker(self.now))
            self.push(self.now + policy.startup_s, _UP, len(self.workers) - 1)
        # Surplus: workers still starting go first (a ReplicaSet deletes unready pods first),
        # then the newest: idle ones only with "idle-first", any with "replicaset".
        for index in reversed(live):
            worker = self.workers[index]
            if excess > 0 and not worker.up:
                worker.gone_s = self.now
                excess -= 1
        for index in reversed(live):
            worker = self.workers[index]
            if excess <= 0 or not worker.up or worker.gone_s is not None:
                continue
            if policy.victims == "replicaset" or worker.running == 0:
                self.remove(index, policy.drain_grace_s)
                excess -= 1
        still_up = sum(1 for w in self.workers if w.gone_s is None)
        if self.left > 0 or still_up > policy.min_workers:
            self.push(self.now + policy.interval_s, _EVALUATE, 0)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (0 for no values)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def print_removal(
    compared: dict[str, RunResult], horizon_s: float, victims: str
) -> dict[str, dict[str, float]]:
    """The table of how each way of removing workers did; returns its rows."""
    print(f"\nremoving workers (victims: a ReplicaSet's pick, busy or not; {victims} above):")
    print(
        f"{'':34}{'busy removed':>13}{'loads killed':>13}{'lost load-s':>12}"
        f"{'drain max':>10}{'worker-s':>10}"
    )
    rows: dict[str, dict[str, float]] = {}
    for name, run in compared.items():
        r = rows[name] = {
            "busy_removed": run.busy_removed,
            "killed_loads": run.killed_loads,
            "killed_load_s": round(run.killed_load_s),
            "drain_max_s": round(max(run.drains_s, default=0.0), 1),
            "worker_seconds": round(run.worker_seconds(horizon_s)),
        }
        print(
            f"{name:34}{r['busy_removed']:>13}{r['killed_loads']:>13}{r['killed_load_s']:>12}"
            f"{r['drain_max_s']:>10}{r['worker_seconds']:>10}"
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--loads", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--target-drain-s", type=float, default=120.0)
    parser.add_argument(
        "--formula-target-s",
        type=float,
        default=None,
        help="target_drain_s given to the formula (default: (target - interval - start-up) / 2)",
    )
    parser.add_argument("--interval-s", type=float, default=15.0)
    parser.add_argument("--startup-s", type=float, default=30.0)
    parser.add_argument("--min-workers", type=int, default=0)
    parser.add_argument("--max-workers", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--default-rate", type=float, default=0.33, help="jobs/s per worker")
    parser.add_argument("--rate-window-s", type=float, default=3600.0)
    parser.add_argument("--bandwidth-mb-s", type=float, default=400.0)
    parser.add_argument("--overhead-s", type=float, default=1.0)
    parser.add_argument(
        "--running-per-worker",
        type=int,
        default=1,
        help="threshold of the running-jobs trigger (deploy/k8s: 1)",
    )
    parser.add_argument("--victims", choices=("replicaset", "idle-first"), default="replicaset")
    parser.add_argument(
        "--drain-grace-s", type=float, default=540.0, help="SIGTERM's grace (the deadline ceiling)"
    )
    parser.add_argument("--old-grace-s", type=float, default=30.0, help="the grace before #15")
    args = parser.parse_args(argv)

    shape = TraceShape(
        loads=args.loads,
        bandwidth_bytes_per_s=args.bandwidth_mb_s * MB,
        overhead_s=args.overhead_s,
    )
    trace = make_trace(shape, random.Random(args.seed))
    policy = PolicyConfig(
        target_drain_s=args.formula_target_s
        or (args.target_drain_s - args.interval_s - args.startup_s) / 2,
        min_workers=args.min_workers,
        max_workers=args.max_workers,
        default_rate=args.default_rate,
        interval_s=args.interval_s,
        startup_s=args.startup_s,
        rate_window_s=args.rate_window_s,
        running_per_worker=args.running_per_worker,
        victims=args.victims,
        drain_grace_s=args.drain_grace_s,
    )
    scaled = _Simulation(trace, args.concurrency, policy).run()
    # How workers are removed, side by side: the deployment before issue #15 (running trigger
    # at the concurrency, 30 s grace), this one, and an oracle that removes only idle workers.
    choices = {
        f"before: running/{args.concurrency}, grace {args.old_grace_s:g}s": replace(
            policy,
            running_per_worker=args.concurrency,
            victims="replicaset",
            drain_grace_s=args.old_grace_s,
        ),
        f"now: running/{args.running_per_worker}, grace {args.drain_grace_s:g}s": policy,
        "idle workers only (oracle)": replace(policy, victims="idle-first"),
    }
    compared = {name: _Simulation(trace, args.concurrency, c).run() for name, c in choices.items()}
    fixed_n = max(1, scaled.max_desired)
    fixed = _Simulation(trace, args.concurrency, None, fixed_workers=fixed_n).run()
    horizon_s = max(scaled.end_s, fixed.end_s)

    service = [job.service_s for job in trace.jobs]
    mean_service = sum(service) / len(service)
    print(
        f"trace: {len(trace.jobs)} loads, {len(trace.burst_ends_s)} bursts, seed {args.seed}, "
        f"horizon {horizon_s / 3600:.1f} h; load time mean {mean_service:.1f} s, "
        f"p50 {percentile(service, 50):.1f} s, max {max(service):.1f} s "
        f"({args.overhead_s:g} s + size / {args.bandwidth_mb_s:g} MB/s)"
    )
    print(
        f"policy: formula target {policy.target_drain_s:g} s, workers "
        f"{args.min_workers}..{args.max_workers} x {args.concurrency} slots, every "
        f"{args.interval_s:g} s, start-up {args.startup_s:g} s, rate window "
        f"{args.rate_window_s:g} s (default {args.default_rate:g} jobs/s/worker used in "
        f"{scaled.default_rate_used} of {scaled.decisions} decisions)"
    )
    print(f"fixed pool: {fixed_n} workers, the most the policy asked for")
    rows: dict[str, dict[str, float]] = {}
    print(f"{'':28}{'policy':>12}{f'fixed ({fixed_n})':>14}")
    for name, run in (("policy", scaled), ("fixed", fixed)):
        rows[name] = {
            "drain_max_s": round(max(run.drains_s, default=0.0), 1),
            "drain_p95_s": round(percentile(run.drains_s, 95), 1),
            "wait_p95_s": round(percentile(run.waits_s, 95), 1),
            "wait_max_s": round(max(run.waits_s, default=0.0), 1),
            "worker_seconds": round(run.worker_seconds(horizon_s)),
        }
    labels = {
        "drain_max_s": "drain after burst, max (s)",
        "drain_p95_s": "drain after burst, p95 (s)",
        "wait_p95_s": "wait before start, p95 (s)",
        "wait_max_s": "wait before start, max (s)",
        "worker_seconds": "worker-seconds",
    }
    for key, label in labels.items():
        print(f"{label:28}{rows['policy'][key]:>12}{rows['fixed'][key]:>14}")
    ratio = rows["policy"]["worker_seconds"] / rows["fixed"]["worker_seconds"]
    print(f"{'ratio policy/fixed':28}{ratio:>12.3f}")
    choice_rows = print_removal(compared, horizon_s, args.victims)
    drains_ok = rows["policy"]["drain_max_s"] <= args.target_drain_s
    cheaper = ratio < 1
    none_killed = scaled.killed_loads == 0
    verdict = "PASS" if drains_ok and cheaper and none_killed else "FAIL"
    print(
        f"{verdict}: policy drains every burst within {args.target_drain_s:g} s: "
        f"{'yes' if drains_ok else 'no'} (max {rows['policy']['drain_max_s']} s); "
        f"fewer worker-seconds than the fixed pool: {'yes' if cheaper else 'no'} "
        f"({ratio:.1%}); no load killed by a scale-down: {'yes' if none_killed else 'no'} "
        f"({scaled.killed_loads})"
    )
    summary = {
        "verdict": verdict,
        "seed": args.seed,
        "loads": len(trace.jobs),
        "bursts": len(trace.burst_ends_s),
        "target_drain_s": args.target_drain_s,
        "formula_target_drain_s": policy.target_drain_s,
        "fixed_workers": fixed_n,
        "policy": rows["policy"],
        "fixed": rows["fixed"],
        "worker_seconds_ratio": round(ratio, 4),
        "removal": choice_rows,
    }
    print(json.dumps(summary, separators=(",", ":")))
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
