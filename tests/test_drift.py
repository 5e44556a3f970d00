"""Drift reference (registry side) and binning (server side), on real numbers and a real TorchScript model."""

from __future__ import annotations

import math
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from prometheus_client import REGISTRY

from services.registry.reference import compute_reference, load_reference_data, with_reference
from services.registry.store import RegistryError
from services.serving.artifact import load_spec, read_spec
from services.serving.runtimes import create_runtime
from services.serving.server import drift, inference
from services.serving.server.observe import Prediction
from services.serving.server.settings import ServerSettings
from tests.conftest import make_torch_mlp_artifact

RNG = np.random.default_rng(7)


def _ref_data(tmp_path: Path, rows: int = 400, width: int = 8, **extra: Any) -> Path:
    path = tmp_path / "ref.npz"
    np.savez(path, input=RNG.normal(size=(rows, width)).astype(np.float32), **extra)
    return path


@pytest.fixture(scope="module")
def artifact_with_reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("drift")
    art = make_torch_mlp_artifact(tmp / "art", name="drifty", sizes=(8, 16, 3))
    return with_reference(art, _ref_data(tmp), tmp / "with-ref")


def test_group_starts_split_features_into_at_most_eight_contiguous_groups() -> None:
    assert drift.group_starts(3) == [0, 1, 2]
    assert drift.group_starts(8) == list(range(8))
    assert drift.group_starts(20) == [0, 3, 6, 9, 12, 14, 16, 18]
    assert drift.group_starts(784)[:3] == [0, 98, 196]


def test_group_means_and_decile_bins() -> None:
    flat = np.arange(12, dtype=np.float32).reshape(2, 6)
    assert drift.group_means(flat, [0, 2, 4]).tolist() == [[0.5, 2.5, 4.5], [6.5, 8.5, 10.5]]
    # 1000 evenly spread values: edges at the deciles, 10% of rows in every bin
    means = np.linspace(0, 1, 1000)[:, None]
    edges, ratios = drift.reference_bins(means)
    assert np.allclose(edges[0], np.quantile(means[:, 0], np.linspace(0.1, 0.9, 9)))
    assert np.allclose(ratios[0], 0.1)
    # first and last bins are open-ended; a value on an edge goes to the bin above (searchsorted "right")
    e = np.asarray(edges)
    probe = np.array([[-50.0], [e[0, 0]], [0.5], [e[0, 8]], [50.0]])
    assert drift.bin_index(probe, e)[:, 0].tolist() == [0, 1, 5, 9, 9]
    assert drift.bin_index(probe, e)[:, 0].tolist() == [int(np.searchsorted(e[0], v, "right")) for v in probe[:, 0]]


def test_reference_covers_inputs_and_the_models_outputs(artifact_with_reference: Path) -> None:
    spec = load_spec(artifact_with_reference)  # sha256 of every file, reference.json included
    assert [f.path for f in spec.files] == ["model.pt", drift.REFERENCE_FILE]
    ref = drift.read_reference(artifact_with_reference / drift.REFERENCE_FILE)
    assert ref.rows == 400
    (inp, out) = ref.tensors
    assert (inp.name, inp.side, inp.width, len(inp.starts)) == ("input", "input", 8, 8)
    assert (out.name, out.side, out.width, len(out.starts)) == ("output", "output", 3, 3)
    # the output bins are the model's answers on the reference data, binned
    data = np.load(artifact_with_reference.parent / "ref.npz")["input"]
    rt = create_runtime(spec, artifact_with_reference)
    rt.load()
    answers = rt.predict({"input": data})["output"]
    edges, ratios = drift.reference_bins(drift.group_means(answers, out.starts))
    assert np.allclose(out.edges, edges) and np.allclose(out.ratios, ratios)
    for t in ref.tensors:
        assert all(math.isclose(sum(r), 1.0) for r in t.ratios)


def test_compute_reference_rejects_a_model_answering_nan(tmp_path: Path) -> None:
    import torch

    from tests.conftest import write_torchscript_artifact

    class Log(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.log(x[:, :3])  # NaN for negative inputs

    art = write_torchscript_artifact(tmp_path / "art", Log(), name="logs")
    spec = read_spec(art)
    data = load_reference_data(_ref_data(tmp_path), spec)
    with pytest.raises(RegistryError, match="answered NaN or Inf in output 'output'"):
        compute_reference(art, spec, data, "0" * 64)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p.write_text("not numpy at all"), "not an .npz file"),
        (lambda p: p.write_bytes(b"PK\x03\x04 truncated zip"), "not an .npz file"),
        (lambda p: __import__("pickle").dump({"input": [1, 2]}, p.open("wb")), "never unpickled"),
        (lambda p: np.save(p.open("wb"), np.zeros((200, 8), np.float32)), "single .npy array"),
        (lambda p: np.savez(p.open("wb"), input=np.array([{"x": 1}] * 200, dtype=object)), "pickled objects"),
        (lambda p: np.savez(p.open("wb"), inputs=np.zeros((200, 8), np.float32)), "'inputs' is not an input"),
        (lambda p: np.savez(p.open("wb")), "no array 'input'"),
        (lambda p: np.savez(p.open("wb"), input=np.zeros((200, 8), np.float64)), r"astype\(np.float32\)"),
        (lambda p: np.savez(p.open("wb"), input=np.zeros((200, 5), np.float32)), r"shape \[200, 5\]"),
        (lambda p: np.savez(p.open("wb"), input=np.zeros((200,), np.float32)), r"shape \[200\]"),
        (lambda p: np.savez(p.open("wb"), input=np.zeros((99, 8), np.float32)), "99 rows; give at least 100"),
        (
            lambda p: np.savez(p.open("wb"), input=np.where(np.eye(200, 8) > 0, np.nan, 0).astype(np.float32)),
            r"NaN or Inf in 8 row\(s\) \(first: row 0\)",
        ),
    ],
)
def test_hostile_reference_data_is_a_one_line_error(tmp_path: Path, make: Any, message: str) -> None:
    art = make_torch_mlp_artifact(tmp_path / "art", name="m")
    bad = tmp_path / "bad.npz"
    make(bad)
    with pytest.raises(RegistryError, match=message) as info:
        load_reference_data(bad, read_spec(art))
    assert "\n" not in str(info.value) and "--reference-data" in str(info.value)


def test_missing_reference_file_is_named(tmp_path: Path) -> None:
    art = make_torch_mlp_artifact(tmp_path / "art", name="m")
    with pytest.raises(RegistryError, match=r"nope.npz: no such file"):
        load_reference_data(tmp_path / "nope.npz", read_spec(art))


# --- the observer in the server ------------------------------------------------------------------------


def _value(model: str, tensor: str, group: int, b: int, name: str = "dlstack_drift_bin_total") -> float | None:
    labels = {"model": model, "version": "1", "tensor": tensor, "group": str(group), "bin": str(b)}
    return REGISTRY.get_sample_value(name, labels)


def _server(artifact: Path, name: str) -> SimpleNamespace:
    spec = read_spec(artifact)
    return SimpleNamespace(spec=spec, name=name, version="1", observers=[])


def _settings(artifact: Path, sample: float, **env: str) -> ServerSettings:
    # No row cap unless a test sets one: these tests count every row they send.
    base = {"DLSTACK_ARTIFACT_DIR": str(artifact), "DLSTACK_DRIFT_SAMPLE": str(sample)}
    return ServerSettings.from_env({**base, "DLSTACK_DRIFT_MAX_ROWS_PER_S": "0", **env})


def _prediction(x: np.ndarray, y: np.ndarray, status: int = 200) -> Prediction:
    return Prediction("r1", "m", "1", {"input": x}, {"output": y}, status, 0.001, {})


def test_observer_counts_each_row_in_its_bin_and_exports_the_reference(artifact_with_reference: Path) -> None:
    server = _server(artifact_with_reference, "drift-unit")
    obs = drift.install(server, _settings(artifact_with_reference, 1.0))
    assert obs is not None and server.observers == [obs]
    ref = drift.read_reference(artifact_with_reference / drift.REFERENCE_FILE)
    inp = ref.tensors[0]
    # every bin exists from the start (a never-hit bin is a 0, not a missing series) ...
    assert _value("drift-unit", "input", 7, 9) == 0.0
    assert _value("drift-unit", "input", 3, 4, "dlstack_drift_reference_ratio") == inp.ratios[3][4]
    # ... and each row lands where np.searchsorted puts its group mean
    x = RNG.normal(loc=1.5, size=(64, 8)).astype(np.float32)
    y = RNG.normal(size=(64, 3)).astype(np.float32)
    obs.observe(_prediction(x, y))
    obs.flush()  # the worker's flush thread does this every FLUSH_S
    for g in range(8):
        want = np.bincount([np.searchsorted(inp.edges[g], v, "right") for v in x[:, g]], minlength=10)
        assert [_value("drift-unit", "input", g, b) for b in range(10)] == want.tolist()
    assert sum(_value("drift-unit", "output", g, b) or 0 for g in range(3) for b in range(10)) == 64 * 3


def test_observer_skips_failures_other_widths_and_nan_rows(artifact_with_reference: Path) -> None:
    server = _server(artifact_with_reference, "drift-skip")
    obs = drift.install(server, _settings(artifact_with_reference, 1.0))
    assert obs is not None

    def total() -> float:
        return sum(_value("drift-skip", "input", g, b) or 0 for g in range(8) for b in range(10))

    ok = np.zeros((4, 8), np.float32)
    obs.observe(_prediction(ok, np.zeros((4, 3), np.float32), status=400))
    obs.observe(Prediction("r", "m", "1", {"input": ok}, None, 200, 0.0, {}))
    obs.observe(_prediction(np.zeros((4, 5), np.float32), np.zeros((4, 3), np.float32)))  # not the reference width
    obs.flush()
    assert total() == 0
    x = ok.copy()
    x[1, 2] = np.nan  # row 1, group 2 only
    obs.observe(_prediction(x, np.zeros((4, 3), np.float32)))
    obs.flush()
    assert total() == 4 * 8 - 1


def test_sample_rate_picks_requests(artifact_with_reference: Path) -> None:
    ref = drift.read_reference(artifact_with_reference / drift.REFERENCE_FILE)
    draws = iter([0.05, 0.5, 0.09, 0.95])  # inference.notify draws once per answer for all observers
    obs = drift.DriftObserver(ref, "drift-sample", "1", 0.1)
    server = SimpleNamespace(name="drift-sample", version="1", observers=[obs])
    for i in range(4):
        x, y = np.zeros((1, 8), np.float32), np.zeros((1, 3), np.float32)
        call = SimpleNamespace(route="infer", request_id=str(i), inputs={"input": x}, outputs={"output": y},
                               elapsed_ns=1000, headers={})  # fmt: skip
        inference.notify(server, call, 200, lambda: next(draws))
    obs.flush()
    assert sum(_value("drift-sample", "input", 0, b) or 0 for b in range(10)) == 2


def test_the_row_cap_bins_at_most_its_rate_and_whole_requests(artifact_with_reference: Path) -> None:
    ref = drift.read_reference(artifact_with_reference / drift.REFERENCE_FILE)
    now = [100.0]
    obs = drift.DriftObserver(ref, "drift-cap", "1", 1.0, max_rows_per_s=10, clock=lambda: now[0])

    def send(requests: int, rows: int = 1) -> float:
        """Rows binned out of ``requests`` requests of ``rows`` rows, all at the clock's current time."""
        before = sum(_value("drift-cap", "input", 0, b) or 0 for b in range(10))
        for _ in range(requests):
            obs.observe(_prediction(np.zeros((rows, 8), np.float32), np.zeros((rows, 3), np.float32)))
        obs.flush()
        return sum(_value("drift-cap", "input", 0, b) or 0 for b in range(10)) - before

    assert send(30) == 10  # a full bucket: one second's rows
    assert send(5) == 0
    now[0] += 0.5
    assert send(30) == 5  # refilled at 10 rows/s
    now[0] += 60
    assert send(30) == 10  # an idle minute refills one second's rows, not sixty
    now[0] += 1
    assert send(1, rows=25) == 25  # larger than the bucket: binned whole (every row of a request counts) ...
    now[0] += 1
    assert send(3) == 0  # ... and paid back before the next: -15 + 10 tokens
    now[0] += 1
    assert send(30) == 5
    outputs = sum(_value("drift-cap", "output", g, b) or 0 for g in range(3) for b in range(10))
    assert outputs == (10 + 5 + 10 + 25 + 5) * 3  # a request's outputs are binned with its inputs, or not at all


def test_the_share_handed_over_follows_the_cap_and_comes_back_when_traffic_falls(
    artifact_with_reference: Path,
) -> None:
    """Answers handed over only to be refused by the bucket still cost the request's thread: the flush
    thread's ``adjust`` lowers the share notify hands over until the rows handed run at HEADROOM x the cap."""
    ref = drift.read_reference(artifact_with_reference / drift.REFERENCE_FILE)
    now = [0.0]
    obs = drift.DriftObserver(ref, "drift-adjust", "1", 0.5, max_rows_per_s=10, clock=lambda: now[0])
    server = SimpleNamespace(name="drift-adjust", version="1", observers=[obs])
    rng = np.random.default_rng(7)
    x, y = np.zeros((1, 8), np.float32), np.zeros((1, 3), np.float32)

    def second(answers: int) -> int:
        """``answers`` one-row answers through inference.notify over one second; the rows it was handed."""
        handed = obs._handed_rows
        for i in range(answers):
            call = SimpleNamespace(route="infer", request_id=str(i), inputs={"input": x}, outputs={"output": y},
                                   elapsed_ns=1000, headers={})  # fmt: skip
            inference.notify(server, call, 200, rng.random)
        now[0] += 1
        return obs._handed_rows - handed

    handed = second(1000)
    assert 400 <= handed <= 600  # the configured share, 0.5, until the first adjustment
    obs.adjust()
    assert obs.sample == pytest.approx(0.5 * drift.HEADROOM * 10 / handed)  # 12.5 of the ~500 rows a second
    for _ in range(3):
        handed = second(1000)
        obs.adjust()
    assert 3 <= handed <= 25 and 0.003 < obs.sample < 0.03  # ~12.5 rows/s handed of 1,000
    second(0)  # traffic stops
    obs.adjust()
    assert obs.sample == 0.5  # nothing handed for a second: back to the configured share
    handed = second(16)  # 16 answers/s: ~8 rows handed, under HEADROOM x the cap (12.5)
    obs.adjust()
    assert 4 <= handed <= 12 and obs.sample == 0.5  # never above the configured share


def test_the_server_splits_its_row_cap_over_its_workers(artifact_with_reference: Path) -> None:
    for env, per_worker in (
        ({"DLSTACK_WORKERS": "4", "DLSTACK_DRIFT_MAX_ROWS_PER_S": "20"}, 5.0),
        ({"DLSTACK_WORKERS": "1", "DLSTACK_DRIFT_MAX_ROWS_PER_S": "0"}, 0.0),
    ):
        server = _server(artifact_with_reference, "drift-split")
        obs = drift.install(server, _settings(artifact_with_reference, 0.5, **env))
        assert obs is not None and obs.max_rows_per_s == per_worker
    default = ServerSettings.from_env({"DLSTACK_ARTIFACT_DIR": str(artifact_with_reference), "DLSTACK_WORKERS": "2"})
    assert default.drift_max_rows_per_s == 20
    obs = drift.install(_server(artifact_with_reference, "drift-split"), default.model_copy(update={"drift_sample": 1}))
    assert obs is not None and obs.max_rows_per_s == 10


def test_binned_rows_reach_the_counters_without_an_explicit_flush(artifact_with_reference: Path) -> None:
    """Requests only add to pending counts; the observer's own thread moves them to the counters."""
    ref = drift.read_reference(artifact_with_reference / drift.REFERENCE_FILE)
    obs = drift.DriftObserver(ref, "drift-thread", "1", 1.0)

    def total() -> float:
        return sum(_value("drift-thread", "output", g, b) or 0 for g in range(3) for b in range(10))

    for _ in range(5):
        obs.observe(_prediction(np.zeros((2, 8), np.float32), np.ones((2, 3), np.float32)))
    assert total() == 0  # pending: no counter touched on the request's thread
    deadline = time.monotonic() + 30
    while total() < 5 * 2 * 3:
        assert time.monotonic() < deadline, f"flush thread moved {total()} of 30 counts in 30 s"
        time.sleep(0.05)
    assert total() == 30
    before = [_value("drift-thread", "output", 0, b) for b in range(10)]
    obs.observe(_prediction(np.zeros((1, 8), np.float32), np.full((1, 3), 1e9, np.float32)))  # the top bins
    obs.flush()
    assert total() == 33
    assert [_value("drift-thread", "output", 0, b) for b in range(10)] == [*before[:9], (before[9] or 0) + 1]


def test_nothing_is_installed_without_a_reference_or_a_sample_rate(
    tmp_path: Path, artifact_with_reference: Path
) -> None:
    plain = make_torch_mlp_artifact(tmp_path / "plain", name="plain")
    server = _server(plain, "drift-none")
    assert drift.install(server, _settings(plain, 1.0)) is None
    server = _server(artifact_with_reference, "drift-off")
    assert drift.install(server, _settings(artifact_with_reference, 0.0)) is None
    assert server.observers == []
    for model in ("drift-none", "drift-off"):
        assert _value(model, "input", 0, 0) is None
        assert _value(model, "input", 0, 0, "dlstack_drift_reference_ratio") is None


def test_with_reference_never_writes_the_source_and_replaces_an_old_reference(
    tmp_path: Path, artifact_with_reference: Path
) -> None:
    before = {p.name: p.read_bytes() for p in artifact_with_reference.iterdir()}
    again = with_reference(artifact_with_reference, _ref_data(tmp_path, rows=150), tmp_path / "again")
    assert {p.name: p.read_bytes() for p in artifact_with_reference.iterdir()} == before
    spec = load_spec(again)
    assert [f.path for f in spec.files] == ["model.pt", drift.REFERENCE_FILE]
    assert drift.read_reference(again / drift.REFERENCE_FILE).rows == 150


def test_a_bad_reference_is_logged_and_serving_goes_on(
    tmp_path: Path, artifact_with_reference: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import shutil

    art = tmp_path / "art"
    shutil.copytree(artifact_with_reference, art)
    (art / drift.REFERENCE_FILE).write_text('{"format": 1, "rows": 5, "data_sha256": "x", "tensors": []}')
    with pytest.raises(drift.ArtifactError, match=r"rows: Input should be greater than or equal to 100") as info:
        drift.read_reference(art / drift.REFERENCE_FILE)
    assert "\n" not in info.value.message and "--reference-data" in info.value.message
    server = _server(art, "drift-bad")
    assert drift.install(server, _settings(art, 1.0)) is None
    assert server.observers == []
    assert "drift metrics off" in caplog.text
