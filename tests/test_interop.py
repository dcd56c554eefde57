"""An injected model is an ordinary nn.Module: it compiles, exports, trains under DDP, changes
dtype, device and memory format, copies and pickles."""

import copy
import io
import socket

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import se_inject


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    original = se_inject.load_model("resnet18").eval()
    # "post": timm zero-initialises each block's last BN, so a unit on the branch would see zeros
    injected = se_inject.inject(original, position="post", init="paper", input_size=64).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = injected(x)
    return injected, x, expected


def test_torch_compile(pair):
    injected, x, expected = pair
    compiled = torch.compile(copy.deepcopy(injected), backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), expected)


def test_torch_compile_inductor(pair):
    injected, x, expected = pair
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(copy.deepcopy(injected))(x), expected, rtol=1e-4, atol=1e-4)


def test_torch_export(pair):
    injected, x, expected = pair
    program = torch.export.export(injected, (x,))
    torch.testing.assert_close(program.module()(x), expected)
    assert any("se_1_1" in name for name in program.state_dict)


def test_onnx_export_runs_in_onnxruntime(pair, tmp_path):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    injected, x, expected = pair
    path = tmp_path / "model.onnx"
    torch.onnx.export(injected, (x,), str(path), dynamo=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(got), expected, rtol=1e-4, atol=1e-4)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_distributed_data_parallel_trains(pair):
    injected, x, _ = pair
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        model = DistributedDataParallel(copy.deepcopy(injected).train())
        before = model.module.layer1[0].se_1_1.fc2.weight.detach().clone()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        loss = F.cross_entropy(model(x), torch.tensor([1, 2]))
        loss.backward()
        optimizer.step()
        assert not torch.equal(model.module.layer1[0].se_1_1.fc2.weight, before)
    finally:
        dist.destroy_process_group()


def test_channels_last(pair):
    injected, x, expected = pair
    model = copy.deepcopy(injected).to(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(model(x.to(memory_format=torch.channels_last)), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float16, 5e-3), (torch.bfloat16, 5e-2)])
def test_half_precision(pair, dtype, tolerance):
    injected, x, expected = pair
    model = copy.deepcopy(injected).to(dtype)
    with torch.no_grad():
        got = model(x.to(dtype))
    assert got.dtype == dtype
    assert (got.float() - expected).abs().max() < tolerance * expected.abs().max()


def test_to_device_after_injection_moves_the_units(pair):
    injected, x, expected = pair
    model = copy.deepcopy(injected).to("meta")
    assert model.layer4[1].se_4_2.fc1.weight.is_meta
    assert model.to_empty(device="cpu").layer4[1].se_4_2.fc1.weight.device.type == "cpu"


def test_deepcopy_and_pickle(pair):
    injected, x, expected = pair
    buffer = io.BytesIO()
    torch.save(injected, buffer)
    buffer.seek(0)
    unpickled = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        assert torch.equal(copy.deepcopy(injected)(x), expected)
        assert torch.equal(unpickled(x), expected)
    assert type(unpickled) is type(injected)
