"""Third-party V2 clients against the real server: tritonclient.http and the kserve SDK's REST client."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from services.serving.artifact import load_spec
from services.serving.runtimes import create_runtime
from tests.conftest import make_torch_mlp_artifact
from tests.serving import ServerHandle, start_server

X = np.random.default_rng(5).standard_normal((3, 8)).astype(np.float32)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerHandle, np.ndarray]]:
    art: Path = make_torch_mlp_artifact(tmp_path_factory.mktemp("interop") / "mlp", version="2", seed=11)
    rt = create_runtime(load_spec(art), art, 1)
    rt.load()
    expected = rt.predict({"input": X})["output"]
    with start_server(art, workers=2) as srv:
        yield srv, expected


@pytest.mark.parametrize(("binary_in", "binary_out"), [(False, False), (True, True), (True, False), (False, True)])
def test_tritonclient_http(served: tuple[ServerHandle, np.ndarray], binary_in: bool, binary_out: bool) -> None:
    import tritonclient.http as th

    srv, expected = served
    client = th.InferenceServerClient(url=f"127.0.0.1:{srv.port}")
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("mlp") and client.is_model_ready("mlp", "2")
        assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
        meta = client.get_model_metadata("mlp", "2")
        assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 8]}]
        inp = th.InferInput("input", list(X.shape), "FP32")
        inp.set_data_from_numpy(X, binary_data=binary_in)
        out = th.InferRequestedOutput("output", binary_data=binary_out)
        result = client.infer("mlp", [inp], outputs=[out], request_id="tc-1")
        assert result.get_response()["id"] == "tc-1"
        np.testing.assert_allclose(result.as_numpy("output"), expected, atol=1e-5)
    finally:
        client.close()


def test_tritonclient_defaults(served: tuple[ServerHandle, np.ndarray]) -> None:
    """No outputs listed: tritonclient asks for binary_data_output and binary inputs by default."""
    import tritonclient.http as th

    srv, expected = served
    client = th.InferenceServerClient(url=f"127.0.0.1:{srv.port}")
    try:
        inp = th.InferInput("input", list(X.shape), "FP32")
        inp.set_data_from_numpy(X)
        result = client.infer("mlp", [inp])
        assert result.get_output("output")["parameters"]["binary_data_size"] == X.shape[0] * 3 * 4
        np.testing.assert_allclose(result.as_numpy("output"), expected, atol=1e-5)
        with pytest.raises(th.InferenceServerException, match="unknown model 'nope'"):
            client.infer("nope", [inp])
    finally:
        client.close()


@pytest.mark.parametrize("binary", [False, True])
def test_kserve_inference_rest_client(served: tuple[ServerHandle, np.ndarray], binary: bool) -> None:
    from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig
    from kserve.protocol.infer_type import RequestedOutput

    srv, expected = served

    async def run() -> np.ndarray:
        client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=30))
        try:
            assert await client.is_server_live(srv.url)
            assert await client.is_server_ready(srv.url)
            assert await client.is_model_ready(srv.url, "mlp")
            inp = InferInput("input", list(X.shape), "FP32")
            inp.set_data_from_numpy(X, binary_data=binary)
            req = InferRequest(
                "mlp",
                [inp],
                request_id="ks-1",
                request_outputs=[RequestedOutput("output", parameters={"binary_data": binary})],
            )
            resp = await client.infer(srv.url, req, model_name="mlp")
            assert resp.id == "ks-1" and resp.model_name == "mlp"
            return resp.outputs[0].as_numpy()  # type: ignore[no-any-return]
        finally:
            await client.close()

    got = asyncio.run(run())
    np.testing.assert_allclose(got, expected, atol=1e-5)
