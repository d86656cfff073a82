import numpy as np
import pytest
import torch
from conftest import random_mlp

from eandc import MLP, StudentBatch
from eandc.mlp import Layout, forward
from eandc.storage import CorruptFileError, save_arrays


class LoopStudent(torch.nn.Module):
    """The oracle: one independent nn.Module per student."""

    def __init__(self, net: MLP):
        super().__init__()
        self.layers = torch.nn.ModuleList()
        for w, b in zip(net.weights, net.biases):
            layer = torch.nn.Linear(w.shape[1], w.shape[0], dtype=torch.float64)
            layer.weight.data.copy_(w)
            layer.bias.data.copy_(b)
            self.layers.append(layer)
        self.act = net.activation

    def forward(self, x):
        for layer in self.layers[:-1]:
            x = self.act(layer(x))
        return self.layers[-1](x)


@pytest.mark.parametrize("activation", ["g", "tanh", "relu", "sigmoid"])
def test_batch_matches_loop_of_modules_outputs_and_gradients(activation):
    nets = [random_mlp([3, 5, 4, 2], activation, seed=s) for s in range(4)]
    batch = StudentBatch.from_networks(nets)
    X = torch.randn(50, 3, dtype=torch.float64)
    y = torch.randn(50, 2, dtype=torch.float64)
    theta = batch.theta.clone().requires_grad_(True)
    out = forward(theta, batch.layout, batch.activation, X)
    loss = (out - y).square().mean(dim=(1, 2)).sum()
    (grad,) = torch.autograd.grad(loss, theta)
    for i, net in enumerate(nets):
        module = LoopStudent(net)
        ref = module(X)
        torch.testing.assert_close(out[i], ref, rtol=1e-13, atol=1e-13)
        (ref - y).square().mean().backward()
        ref_grad = torch.cat([torch.cat([layer.weight.grad.flatten(), layer.bias.grad])
                              for layer in module.layers])
        torch.testing.assert_close(grad[i], ref_grad, rtol=1e-12, atol=1e-13)


def test_call_numpy_and_tensor_and_to_torch():
    net = random_mlp([2, 4, 1], "tanh", skip=True)
    X = np.random.default_rng(0).normal(size=(20, 2))
    y_np = net(X)
    assert isinstance(y_np, np.ndarray) and y_np.shape == (20, 1)
    y_t = net(torch.from_numpy(X))
    assert isinstance(y_t, torch.Tensor)
    module = net.to_torch()
    assert isinstance(module, torch.nn.Module)
    torch.testing.assert_close(module(torch.from_numpy(X)), y_t, rtol=1e-14, atol=1e-14)
    assert net.widths == [4] and net.d_in == 2 and net.d_out == 1
    with pytest.raises(ValueError, match=r"shape \(n, 2\)"):
        net(np.zeros((5, 3)))


def test_save_load_roundtrip(tmp_path):
    net = random_mlp([3, 6, 5, 2], "softplus", skip=True)
    path = net.save(tmp_path / "net.npz")
    loaded = MLP.load(path)
    assert loaded.widths == [6, 5] and loaded.activation.name == "softplus"
    assert torch.equal(loaded.theta, net.theta)
    assert b"pickle" not in path.read_bytes()


def test_load_rejects_corrupted_truncated_and_foreign_files(tmp_path):
    net = random_mlp([2, 3, 1], "g")
    path = net.save(tmp_path / "net.npz")
    data = bytearray(path.read_bytes())
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFileError):
        MLP.load(truncated)
    # a flipped byte inside the archive: the zip CRC or our checksum catches it
    with np.load(path) as arrays:
        raw = arrays["weight0"].tobytes()
        entries = {name: arrays[name] for name in arrays.files}
    pos = bytes(data).find(raw)
    assert pos > 0
    data[pos + 3] ^= 0xFF
    flipped = tmp_path / "flipped.npz"
    flipped.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError):
        MLP.load(flipped)
    # a well-formed archive whose weights no longer match the recorded checksum
    entries["weight0"] = entries["weight0"] + 1e-9
    altered = tmp_path / "altered.npz"
    np.savez(altered, **entries)
    with pytest.raises(CorruptFileError, match="checksum"):
        MLP.load(altered)
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, a=np.zeros(3))
    with pytest.raises(CorruptFileError, match="not an eandc"):
        MLP.load(foreign)
    other = save_arrays(tmp_path / "other.npz", {"x": np.zeros(2)}, {"format": "something/1"})
    with pytest.raises(CorruptFileError, match="not an eandc network"):
        MLP.load(other)
    with pytest.raises(FileNotFoundError):
        MLP.load(tmp_path / "missing.npz")


def test_inconsistent_widths_are_refused():
    with pytest.raises(ValueError, match="inconsistent widths"):
        MLP([np.zeros((4, 2)), np.zeros((1, 3))], [np.zeros(4), np.zeros(1)], "g")
    with pytest.raises(ValueError, match="one bias per weight"):
        MLP([np.zeros((4, 2))], [], "g")
    with pytest.raises(ValueError, match="unknown activation"):
        MLP([np.zeros((1, 2))], [np.zeros(1)], "nope")


def test_layout_flatten_unflatten_roundtrip():
    layout = Layout(3, (4, 5), 2, skip=True)
    theta = torch.randn(7, layout.size, dtype=torch.float64)
    assert torch.equal(layout.flatten(*layout.unflatten(theta)), theta)
    assert layout.size == 3 * 4 + 4 + 4 * 5 + 5 + 5 * 2 + 2 + 3 * 2
