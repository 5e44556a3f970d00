"""Drift signals: live inputs and outputs binned against the reference the registry stored, as Prometheus counters.

``dlstack models register ... --reference-data FILE.npz`` writes ``reference.json`` into the artifact
(listed in ``model.yaml`` ``files``, so its sha256 is verified like the model's). For every numeric
tensor it holds up to ``MAX_GROUPS`` contiguous feature groups of the flattened non-batch dims; a row's
statistic per group is the group mean. Each group has ``BINS`` bins whose inner edges are the deciles of
that statistic on the reference data (the first and last bins are open-ended), and the share of
reference rows in each bin. Outputs are binned the same way (on what the model answered for the
reference data), so a shift in what the model predicts shows up even when each input looks fine.

In the server, ``install`` adds a ``DriftObserver`` when the artifact has a reference and
``drift_sample`` > 0. It bins a sampled fraction of successful requests (every row of the request) and
adds them to ``dlstack_drift_bin_total{model,version,tensor,group,bin}``; the reference shares are the
gauge ``dlstack_drift_reference_ratio`` with the same labels. The population stability index over them
is a recording rule (``infra.alerts``). Series per tensor: groups x bins (at most 80), bounded.

A sampled request only appends references to its arrays to a per-worker list; a thread of the worker
bins everything listed since its last pass in one vectorised pass every ``FLUSH_S`` (and at a graceful
exit) and moves the counts to the counters, incrementing only the bins that changed. Binned one request
at a time, numpy's per-call overhead made a 1-row request cost ~25 us; one pass over a second's rows
costs ~3 us per sampled request (300 1-row MLP requests in 0.9 ms). In multiprocess mode one counter
increment is a locked mmap write (~2 us): done per bin per request, the 16 increments of a 1-row MLP
request would cost more than all of its binning. The counters lag by at most ``FLUSH_S``, far below a
scrape interval. The listed arrays are bounded by ``QUEUED_BYTES``: a request that finds more listed
bins them all on its own thread.

``drift_max_rows_per_s`` caps the rows a server bins (split evenly over its workers): on a fast, busy
model a fixed share samples far more rows than the PSI needs, and each sampled answer costs the worker
(in ``make bench``, 10 % of 2,750 req/s per worker cost ~3 % of its throughput, 1 % nothing measurable;
handing answers over, a rarely run and so cache-cold path, looks costlier than binning them: the bucket
alone measured 0.969x, with ``adjust`` 0.990x, in one 22-block run). So the cap works twice:
- every ``FLUSH_S`` the flush thread lowers the share ``inference.notify`` hands over (``sample``) so
  that the rows handed run at ``HEADROOM`` x the cap, and raises it back, up to ``drift_sample``, when
  traffic falls;
- a token bucket of one second's rows admits a handed request while it holds any token, so bursts
  within a second stay under the cap too. A request larger than the bucket is binned whole and the next
  ones wait until it is paid back: every row of a binned request is counted.
Below the cap every sampled request is binned. Under it the live shares are of rows spread evenly over
time, not over requests: a burst counts for less than its share of traffic.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
from prometheus_client import Counter, Gauge
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from services.serving.artifact import ArtifactError, ModelSpec, format_validation_error
from services.serving.server.observe import nbytes
from services.serving.server.settings import ServerSettings, layout

REFERENCE_FILE = "reference.json"  # in the artifact directory, listed in model.yaml files
MAX_GROUPS = 8  # feature groups per tensor: bounds the series count, keeps each group's mean informative
BINS = 10  # decile bins per group
MIN_ROWS = 100  # fewer reference rows give deciles too noisy to compare against
FLUSH_S = 1.0  # s between moves of a worker's pending bin counts to the counters (well under any scrape interval)
QUEUED_BYTES = 8 << 20  # sampled arrays a worker keeps for its next binning pass, at most
HEADROOM = 1.25  # rows handed to the observer per row the cap admits: the bucket, not the estimate, sets the rate

LABELS = ["model", "version", "tensor", "group", "bin"]
BIN_COUNTS = Counter("dlstack_drift_bin", "Sampled rows per drift bin (group mean of a tensor's features)", LABELS)
REFERENCE_RATIO = Gauge(
    "dlstack_drift_reference_ratio",
    "Share of the reference data in each drift bin",
    LABELS,
    multiprocess_mode="max",  # every worker sets the same values
)

log = logging.getLogger("dlstack.server")


class TensorReference(BaseModel):
    """The reference bins of one tensor."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str  # tensor name in the signature
    side: Literal["input", "output"]
    label: str  # the `tensor` metric label: the name, "output:NAME" when an input has the same name
    width: int = Field(ge=1)  # features per row (product of the non-batch dims)
    starts: list[int]  # first feature of each group; group g is [starts[g], starts[g+1])
    edges: list[list[float]]  # per group, the BINS-1 inner edges (reference deciles), ascending
    ratios: list[list[float]]  # per group, the share of reference rows in each of the BINS bins

    @model_validator(mode="after")
    def _consistent(self) -> TensorReference:
        g = len(self.starts)
        if not 1 <= g <= min(MAX_GROUPS, self.width) or self.starts[0] != 0 or sorted(set(self.starts)) != self.starts:
            raise ValueError(
                f"tensor {self.name!r}: starts {self.starts} are not 1-{MAX_GROUPS} ascending group starts"
            )
        if self.starts[-1] >= self.width:
            raise ValueError(f"tensor {self.name!r}: a group starts past the width {self.width}")
        if len(self.edges) != g or any(len(e) != BINS - 1 or e != sorted(e) for e in self.edges):
            raise ValueError(f"tensor {self.name!r}: edges must be {g} ascending lists of {BINS - 1}")
        if len(self.ratios) != g or any(len(r) != BINS or abs(sum(r) - 1) > 1e-6 for r in self.ratios):
            raise ValueError(f"tensor {self.name!r}: ratios must be {g} lists of {BINS} shares summing to 1")
        return self


class Reference(BaseModel):
    """The content of ``reference.json``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal[1] = 1  # bumped when the layout changes; an old server refuses a newer file
    rows: int = Field(ge=MIN_ROWS)  # reference rows the bins were computed from
    data_sha256: str  # sha256 of the .npz they came from (lineage)
    tensors: list[TensorReference]


def bin_index(means: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin (0..BINS-1) per (row, group) of (rows, groups) statistics: how many inner edges are at or below it."""
    # Broadcast over the <= 8 x 9 edges: the same answer as np.searchsorted(edges[g], x, "right")
    # per group, in one vectorised pass instead of a Python loop over groups.
    return np.asarray((means[:, :, None] >= edges[None, :, :]).sum(axis=2))


def group_starts(width: int) -> list[int]:
    """Up to MAX_GROUPS contiguous, near-equal groups of ``width`` features (np.array_split's split)."""
    return [int(part[0]) for part in np.array_split(np.arange(width), min(MAX_GROUPS, width))]


def group_means(flat: np.ndarray, starts: list[int]) -> np.ndarray:
    """(rows, groups) mean of each group's features of a (rows, width) array, in float64."""
    x = flat.astype(np.float64, copy=False)
    sizes = np.diff([*starts, x.shape[1]])
    return np.asarray(np.add.reduceat(x, starts, axis=1) / sizes)


def reference_bins(means: np.ndarray) -> tuple[list[list[float]], list[list[float]]]:
    """Decile edges and the share of rows per bin, per group, of (rows, groups) reference statistics."""
    edges = np.quantile(means, np.linspace(0, 1, BINS + 1)[1:-1], axis=0).T  # (groups, BINS-1)
    idx = bin_index(means, edges)
    ratios = [np.bincount(idx[:, g], minlength=BINS) / len(means) for g in range(means.shape[1])]
    return edges.tolist(), [r.tolist() for r in ratios]


def tensor_label(name: str, side: str, input_names: set[str]) -> str:
    return f"output:{name}" if side == "output" and name in input_names else name


def read_reference(path: Path) -> Reference:
    try:
        return Reference.model_validate_json(path.read_bytes())
    except OSError as exc:
        raise ArtifactError(f"{path}: cannot read the drift reference ({exc.strerror})") from exc
    except ValidationError as exc:
        raise ArtifactError(
            f"{path}: not a drift reference ({format_validation_error(exc)}); re-register the model with "
            "`dlstack models register ... --reference-data FILE.npz`"
        ) from exc


def reference_path(artifact_dir: Path, spec: ModelSpec) -> Path | None:
    """The artifact's reference file when model.yaml lists it (so its sha256 is checked), else None."""
    if any(f.path == REFERENCE_FILE for f in spec.files):
        return Path(artifact_dir) / REFERENCE_FILE
    return None


class _Tensor:
    """One tensor's bins bound to its counter children and its pending counts (flat: group * BINS + bin)."""

    def __init__(self, ref: TensorReference, model: str, version: str) -> None:
        self.name = ref.name
        self.width = ref.width
        self.groups = len(ref.starts)
        # Arrays built once: converting the reference's lists on every request cost more than the binning.
        self.starts = np.asarray(ref.starts)
        self.sizes = np.diff([*ref.starts, ref.width]).astype(np.float64)
        self.edges = np.asarray(ref.edges, dtype=np.float64)
        self.offsets = np.arange(self.groups) * BINS
        self.pending = np.zeros(self.groups * BINS, dtype=np.int64)  # binned, not yet on the counters
        self.children = [
            BIN_COUNTS.labels(model, version, ref.label, str(g), str(b))
            for g in range(self.groups)
            for b in range(BINS)
        ]
        for g, shares in enumerate(ref.ratios):
            for b, share in enumerate(shares):
                REFERENCE_RATIO.labels(model, version, ref.label, str(g), str(b)).set(share)

    def observe(self, arrays: list[np.ndarray]) -> None:
        """Add the rows of ``arrays`` to the pending counts (the caller holds the observer's bin lock)."""
        width = self.width
        # An array not of the reference's width (its rows != its size / width) has nothing to compare with.
        valid = [a.reshape(-1, width) for a in arrays if a.ndim and a.shape[0] and a.size == a.shape[0] * width]
        if not valid:
            return
        rows = np.concatenate(valid) if len(valid) > 1 else valid[0]
        means = np.add.reduceat(rows, self.starts, axis=1, dtype=np.float64) / self.sizes
        idx = bin_index(means, self.edges) + self.offsets
        self.pending += np.bincount(idx[np.isfinite(means)], minlength=self.pending.size)

    def take(self) -> np.ndarray:
        """The pending counts, leaving zeros (the caller holds the observer's bin lock)."""
        counts, self.pending = self.pending, np.zeros_like(self.pending)
        return counts

    def add(self, counts: np.ndarray) -> None:
        for i in np.flatnonzero(counts).tolist():
            self.children[i].inc(int(counts[i]))


class DriftObserver:
    """Bins a sampled share of successful predictions (``observe.Observer``)."""

    def __init__(
        self,
        reference: Reference,
        model: str,
        version: str,
        sample: float,
        max_rows_per_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_sample = sample  # drift_sample: the share it is handed while under the cap
        self.sample = sample  # the share inference.notify hands it now; lowered while the cap binds
        self.max_rows_per_s = max_rows_per_s  # this worker's share of the cap; 0 = every sampled request
        self._clock = clock
        self._tokens = max_rows_per_s  # rows it may still bin; starts full (one second's worth)
        self._filled_at = self._adjusted_at = clock()
        self._handed_rows = 0  # rows handed to observe since the last adjustment of ``sample``
        self.inputs = [_Tensor(t, model, version) for t in reference.tensors if t.side == "input"]
        self.outputs = [_Tensor(t, model, version) for t in reference.tensors if t.side == "output"]
        self._failed = False
        self._lock = threading.Lock()  # the queued list: request threads append, a binning pass takes it
        self._queued: list[tuple[Mapping[str, np.ndarray], Mapping[str, np.ndarray]]] = []
        self._queued_bytes = 0
        self._bin_lock = threading.Lock()  # the pending counts: a binning pass adds, flush takes
        self._pid = 0  # the process whose flush thread runs

    def observe(self, p: Any) -> None:
        if p.status != 200 or p.inputs is None or p.outputs is None:
            return
        size = nbytes(p.inputs) + nbytes(p.outputs)
        first = next(iter(p.inputs.values()), None)
        rows = first.shape[0] if first is not None and first.ndim else 1
        with self._lock:
            self._handed_rows += rows
            if self.max_rows_per_s and not self._admit(rows):
                return
            self._queued.append((p.inputs, p.outputs))
            self._queued_bytes += size
            over = self._queued_bytes > QUEUED_BYTES
        if over:  # the flush thread fell behind (or huge tensors): bin here rather than hold more memory
            self.bin_queued()
        if self._pid != os.getpid():
            self._start()

    def _admit(self, rows: int) -> bool:
        """Take the request's rows from the bucket if it holds any token (the caller holds ``_lock``)."""
        now = self._clock()
        rate = self.max_rows_per_s
        self._tokens = min(rate, self._tokens + (now - self._filled_at) * rate)
        self._filled_at = now
        if self._tokens <= 0:
            return False
        self._tokens -= rows
        return True

    def adjust(self) -> None:
        """Set the share handed over so the rows handed since the last call would have run at HEADROOM x the
        cap (never above ``max_sample``). Nothing handed: back to ``max_sample``, the only share it can
        judge from (the flush thread calls this every FLUSH_S)."""
        if not self.max_rows_per_s:
            return
        now = self._clock()
        with self._lock:
            rows, self._handed_rows = self._handed_rows, 0
            elapsed, self._adjusted_at = now - self._adjusted_at, now
        if rows == 0:
            self.sample = self.max_sample
        elif elapsed > 0:
            self.sample = min(self.max_sample, self.sample * HEADROOM * self.max_rows_per_s * elapsed / rows)

    def bin_queued(self) -> None:
        """Bin the requests queued since the last pass into the pending counts, in one pass per tensor."""
        with self._lock:
            queued, self._queued, self._queued_bytes = self._queued, [], 0
        if not queued:
            return
        try:
            with self._bin_lock:
                self._bin(self.inputs, [inputs for inputs, _ in queued])
                self._bin(self.outputs, [outputs for _, outputs in queued])
        except Exception:  # an observer must never fail a request; say it once, not per pass
            if not self._failed:
                self._failed = True
                log.exception("drift binning failed; drift metrics of this worker may be incomplete")

    def flush(self) -> None:
        """Bin what is queued and move the pending counts to the counters now (the flush thread does it
        every FLUSH_S)."""
        self.bin_queued()
        tensors = [*self.inputs, *self.outputs]
        with self._bin_lock:
            taken = [t.take() for t in tensors]
        for t, counts in zip(tensors, taken, strict=True):
            t.add(counts)

    def _start(self) -> None:
        # Started by the first sampled request of each process: a thread started before gunicorn forks
        # would not exist in the worker.
        with self._lock:
            if self._pid == os.getpid():
                return
            self._pid = os.getpid()
        threading.Thread(target=self._run, name="dlstack-drift-flush", daemon=True).start()
        atexit.register(self.flush)  # a graceful exit keeps the last FLUSH_S of counts

    def _run(self) -> None:
        while True:
            time.sleep(FLUSH_S)
            try:
                self.adjust()
                self.flush()
            except Exception:  # keep flushing later counts; say it once, as for binning
                if not self._failed:
                    self._failed = True
                    log.exception("drift flush failed; drift metrics of this worker may be incomplete")

    @staticmethod
    def _bin(tensors: list[_Tensor], requests: list[Mapping[str, np.ndarray]]) -> None:
        for t in tensors:
            t.observe([arr for ts in requests if (arr := ts.get(t.name)) is not None])


class _Server(Protocol):
    spec: ModelSpec | None
    name: str
    version: str
    observers: list[Any]


def install(server: _Server, settings: ServerSettings) -> DriftObserver | None:
    """Append a DriftObserver to ``server.observers`` when drift_sample > 0 and the artifact has a reference.

    Each of the server's workers bins at most its share of ``drift_max_rows_per_s``. Without either
    nothing is installed and no drift series is exported. A reference that cannot be
    read is logged and skipped: drift signals are never a reason to stop serving.
    """
    if settings.drift_sample <= 0 or server.spec is None:
        return None
    path = reference_path(settings.artifact_dir, server.spec)
    if path is None:
        return None
    try:
        reference = read_reference(path)
    except ArtifactError as exc:
        log.error("drift metrics off: %s", exc.message)
        return None
    workers = layout(settings.cpus(), settings.workers).workers
    cap = settings.drift_max_rows_per_s / workers
    observer = DriftObserver(reference, server.name, server.version, settings.drift_sample, cap)
    server.observers.append(observer)
    return observer
