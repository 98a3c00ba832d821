"""Prometheus metrics of one worker (or exporter) process: its own registry, served by probes.py.

Children never write metrics: they report over their socket and the supervisor
records what they did, so there are no multiprocess files to manage. Labelled
counters start at 0 for every label value they can take, so a pod's first
timeout is an increase from 0, not a series that appears (which ``increase()``
cannot see). The queue's gauges are in queue_gauges.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from loadwarden.producer.contract import LoadReport, Outcome

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

MiB, GiB = 1 << 20, 1 << 30
#: Load times from a tiny file on a warm cache to an hour-long pull of a huge model.
SECONDS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
#: Model-sized memory: 16 MiB to 256 GiB in steps of 4x.
BYTES_BUCKETS = tuple(float(16 * MiB * 4**i) for i in range(8))
#: The limits a load is sampled against (monitor.py) and the anomaly kinds (supervisor.py).
LIMITS = ("memory", "cpu", "deadline")
ANOMALY_KINDS = ("wall", "peak_rss")


class Metrics:
    """Every loadwarden metric, registered in a registry of its own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        # Imported here, not with this module: the supervisor's modules import this one,
        # and `loadwarden load` (which records nothing: Unrecorded) does without them.
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

        from loadwarden.worker.ops.queue_gauges import QueueGauges

        r = self.registry = registry or CollectorRegistry()
        self.loads = Counter("loadwarden_loads", "Loads by outcome.", ["outcome"], registry=r)
        self.duration = Histogram(
            "loadwarden_load_duration_seconds",
            "Wall time of a load.",
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.cpu = Histogram(
            "loadwarden_load_cpu_seconds",
            "CPU time of a load (user + system).",
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.peak_rss = Histogram(
            "loadwarden_load_peak_rss_bytes",
            "Peak resident memory of a load.",
            buckets=BYTES_BUCKETS,
            registry=r,
        )
        self.read = Histogram(
            "loadwarden_load_read_bytes", "Bytes a load read.", buckets=BYTES_BUCKETS, registry=r
        )
        self.retries = Counter("loadwarden_retries", "Attempts that were retried.", registry=r)
        self.dead_letters = Counter("loadwarden_dead_letters", "Jobs dead-lettered.", registry=r)
        self.thresholds = Counter(
            "loadwarden_threshold_crossings",
            "Loads that crossed a fraction of a limit.",
            ["limit"],
            registry=r,
        )
        self.anomalies = Counter(
            "loadwarden_load_anomalies", "Loads far beyond their history.", ["kind"], registry=r
        )
        self.in_flight = Gauge("loadwarden_loads_in_flight", "Loads running now.", registry=r)
        self.budget = Gauge(
            "loadwarden_memory_budget_bytes", "This worker's memory budget.", registry=r
        )
        self.budget_in_use = Gauge(
            "loadwarden_memory_budget_in_use_bytes",
            "Memory limits of the loads running now.",
            registry=r,
        )
        self.queue = QueueGauges(r)
        self.queue_wait = Histogram(
            "loadwarden_queue_wait_seconds",
            "From enqueue to the start of a load (retries: to the start of the attempt).",
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.over_budget = Counter(
            "loadwarden_over_budget_refusals",
            "Loads refused because their memory limit exceeds this worker's whole budget.",
            registry=r,
        )
        self.failure_refusals = Counter(
            "loadwarden_failure_memory_refusals",
            "Loads refused at once because their model failed repeatedly (repeatedly_failing).",
            registry=r,
        )
        self.forkserver_restarts = Counter(
            "loadwarden_forkserver_restarts",
            "Fork servers started in place of a lost one (killed or crashed).",
            registry=r,
        )
        self.forkserver_down = Gauge(
            "loadwarden_forkserver_down_seconds",
            "Seconds since this worker's fork server was lost while none has stayed up 30 s"
            " since (none started, or each lost again soon after its start; 0 once one has):"
            " meanwhile the worker claims no job, or barely any.",
            registry=r,
        )
        self.confinement = Info(
            "loadwarden_confinement", "What confines this worker's loads.", registry=r
        )
        self.info = Info("loadwarden_worker", "This process.", registry=r)
        for outcome in Outcome:
            self.loads.labels(outcome=str(outcome))
        for limit in LIMITS:
            self.thresholds.labels(limit=limit)
        for kind in ANOMALY_KINDS:
            self.anomalies.labels(kind=kind)

    def bind(
        self,
        in_flight: Callable[[], float],
        budget: Callable[[], float],
        in_use: Callable[[], float],
    ) -> None:
        """Gauges read on scrape from the supervisor's own state."""
        self.in_flight.set_function(in_flight)
        self.budget.set_function(budget)
        self.budget_in_use.set_function(in_use)

    def observe(self, report: LoadReport) -> None:
        """Count a finished load, its wait in the queue and its resources."""
        self.loads.labels(outcome=str(report.outcome)).inc()
        if report.error is not None and report.error.code == "over_budget":
            self.over_budget.inc()
        if report.error is not None and report.error.code == "repeatedly_failing":
            self.failure_refusals.inc()
        if report.enqueued_at is not None:
            wait_s = (report.started_at - report.enqueued_at).total_seconds()
            self.queue_wait.observe(max(0.0, wait_s))
        res = report.resources
        if res is not None:
            self.duration.observe(res.wall_seconds)
            self.cpu.observe(res.cpu_user_seconds + res.cpu_system_seconds)
            self.peak_rss.observe(res.peak_rss_bytes)
            self.read.observe(res.read_bytes)


class _Nothing:
    """Takes any call or attribute, records nothing."""

    def __call__(self, *_args: object, **_kwargs: object) -> _Nothing:
        return self

    def __getattr__(self, _name: str) -> _Nothing:
        return self


class Unrecorded(Metrics):
    """Metrics that no one will read: every metric takes its calls and records nothing.

    For a process that serves no metrics (``loadwarden load``: one load, then exit), so
    that it never imports prometheus_client (~10 ms of the command's start, measured
    with ``-X importtime``). ``bind`` and ``observe`` run as in ``Metrics``.
    """

    def __init__(self) -> None:  # no registry and no metric: each is looked up below
        pass

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _Nothing()
