"""cnn_ext.nn modules, cnn_ext.convert and torch.compile."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

import cnn_ext
from _support import DEVICES
from cnn_ext.app.models import build_model


def _pairs():
    """(torch.nn layer, the cnn_ext.nn layer built with the same arguments)."""
    conv_args = dict(in_channels=4, out_channels=6, kernel_size=(3, 2), stride=2, padding=1, dilation=(1, 2),
                     groups=2, bias=True)
    return [
        (torch.nn.Conv2d(**conv_args), cnn_ext.nn.Conv2d(**conv_args)),
        (torch.nn.Conv2d(4, 6, 3, padding="same", bias=False), cnn_ext.nn.Conv2d(4, 6, 3, padding="same",
                                                                                 bias=False)),
        (torch.nn.Conv2d(4, 6, 3, padding=2, padding_mode="reflect"),
         cnn_ext.nn.Conv2d(4, 6, 3, padding=2, padding_mode="reflect")),
        (torch.nn.Conv2d(4, 6, 3, padding=1, padding_mode="circular"),
         cnn_ext.nn.Conv2d(4, 6, 3, padding=1, padding_mode="circular")),
        (torch.nn.MaxPool2d(3, 2, 1, ceil_mode=True), cnn_ext.nn.MaxPool2d(3, 2, 1, ceil_mode=True)),
        (torch.nn.MaxPool2d(2, return_indices=True), cnn_ext.nn.MaxPool2d(2, return_indices=True)),
        (torch.nn.AvgPool2d(3, 2, 1, count_include_pad=False), cnn_ext.nn.AvgPool2d(3, 2, 1, count_include_pad=False)),
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("index", range(7))
def test_module_matches_torch_and_state_dicts_interchange(index, device):
    theirs, ours = (m.to(device, torch.float64) for m in _pairs()[index])
    # Same parameter names and shapes; a state_dict loads both ways.
    assert {k: v.shape for k, v in theirs.state_dict().items()} == {k: v.shape for k, v in ours.state_dict().items()}
    ours.load_state_dict(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())
    assert repr(ours) == repr(theirs)
    x = torch.randn(2, 4, 9, 10, dtype=torch.float64, device=device)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-10, atol=1e-10)


def test_initialisation_matches_torch():
    torch.manual_seed(0)
    theirs = torch.nn.Conv2d(3, 8, 5)
    torch.manual_seed(0)
    ours = cnn_ext.nn.Conv2d(3, 8, 5)
    assert torch.equal(theirs.weight, ours.weight) and torch.equal(theirs.bias, ours.bias)


def test_convert_resnet18_keeps_logits():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        expected = model(x)
    weight_before = model.conv1.weight
    assert cnn_ext.convert(model) is model
    assert type(model.conv1) is cnn_ext.nn.Conv2d and type(model.maxpool) is cnn_ext.nn.MaxPool2d
    assert model.conv1.weight is weight_before  # parameters are kept, not copied
    n_converted = sum(type(m) in (cnn_ext.nn.Conv2d, cnn_ext.nn.MaxPool2d) for m in model.modules())
    assert n_converted == 21  # 20 convolutions + the stem max-pool
    with torch.no_grad():
        got = model(x)
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)


def test_convert_leaves_what_it_cannot_run_and_says_so():
    class MyConv(torch.nn.Conv2d):
        pass

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), MyConv(2, 2, 3), torch.nn.LazyConv2d(2, 3),
                                torch.nn.AvgPool2d(2), cnn_ext.nn.MaxPool2d(2),
                                torch.nn.Conv2d(2, 2, 3, dtype=torch.complex64))
    with pytest.warns(UserWarning, match=r"1 \(MyConv\).*\n.*2 \(LazyConv2d\).*\n.*5 \(Conv2d\): its dtype "
                                         r"torch.complex64 is not supported"):
        cnn_ext.convert(model)
    assert [type(m) for m in model] == [cnn_ext.nn.Conv2d, MyConv, torch.nn.LazyConv2d, cnn_ext.nn.AvgPool2d,
                                         cnn_ext.nn.MaxPool2d, torch.nn.Conv2d]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cnn_ext.convert(torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3)))  # nothing left over: no warning


class _TorchStyleNet(torch.nn.Module):
    """Conv -> pool -> ReLU three ways a user writes it: torch.nn.functional calls, modules, and ReLU before the
    pooling (the same function), plus one conv whose output is used twice (not fusable)."""

    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(1, 4, 3)
        self.c2 = torch.nn.Conv2d(4, 6, 3, padding=1)
        self.pool = torch.nn.MaxPool2d(2, ceil_mode=True)
        self.relu = torch.nn.ReLU()
        self.c3 = torch.nn.Conv2d(6, 6, 3, padding=1)
        self.c4 = torch.nn.Conv2d(6, 8, 1)
        self.d1 = torch.nn.Linear(8 * 2 * 2, 3)

    def forward(self, x):
        x = F.relu(F.max_pool2d(self.c1(x), kernel_size=2))  # functional, pool then ReLU
        x = self.pool(self.relu(self.c2(x)))  # modules, ReLU then pool
        y = self.c3(x)
        x = torch.relu(F.max_pool2d(y + y, 2))  # y used twice: c3 stays a convolution
        x = self.c4(x).relu()
        return self.d1(torch.flatten(x, 1))


def _fused_calls(model):
    return sum(1 for n in model.graph.nodes if n.op == "call_function" and "conv_pool_relu" in n.target.__name__)


def test_convert_fuses_conv_pool_relu_through_fx():
    torch.manual_seed(0)
    model = _TorchStyleNet().double()
    reference = copy.deepcopy(model)
    keys, c1_weight = list(model.state_dict()), model.c1.weight
    fused = cnn_ext.convert(model)
    assert isinstance(fused, torch.fx.GraphModule) and _fused_calls(fused) == 2
    assert list(fused.state_dict()) == keys and fused.c1.weight is c1_weight  # same keys, shared parameters
    assert fused.training == model.training
    x = torch.randn(3, 1, 19, 19, dtype=torch.float64)
    out, ref = fused(x), reference(x)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    grads = torch.autograd.grad(out.square().sum(), list(fused.parameters()))
    ref_grads = torch.autograd.grad(ref.square().sum(), list(reference.parameters()))
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    with cnn_ext.cpu_dispatch.recording() as calls:
        fused(x)
    assert sum(d == "fused_forward" for d, _, _ in calls) == 2


def test_convert_fused_model_honours_forward_hooks():
    torch.manual_seed(0)
    fused = cnn_ext.convert(_TorchStyleNet())
    x = torch.randn(2, 1, 19, 19)
    expected = fused(x)
    seen = []
    handle = fused.c2.register_forward_hook(lambda module, inputs, output: seen.append(output.shape))
    torch.testing.assert_close(fused(x), expected)
    assert seen == [torch.Size([2, 6, 8, 8])]  # the conv ran as a module, so its hook saw its output
    handle.remove()
    fused(x)
    assert len(seen) == 1


def test_convert_keeps_what_must_not_fuse():
    """No fusion: pooling with indices, a non-zero padding mode, a conv whose output is also used elsewhere."""

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Conv2d(1, 2, 3)
            self.b = torch.nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect")
            self.c = torch.nn.Conv2d(2, 2, 1)

        def forward(self, x):
            x, _ = F.max_pool2d(self.a(x), 2, return_indices=True)
            x = F.relu(F.max_pool2d(self.b(x.relu()), 2))
            y = self.c(x)
            return F.relu(F.max_pool2d(y, 1)) + y

    model = Net()
    assert cnn_ext.convert(model) is model  # nothing fused: the model itself, its layers converted
    assert type(model.a) is cnn_ext.nn.Conv2d


def test_convert_untraceable_model_runs_unfused_and_says_why():
    class Branchy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c = torch.nn.Conv2d(1, 2, 3)

        def forward(self, x):
            y = F.relu(F.max_pool2d(self.c(x), 2))
            return y if y.sum() > 0 else -y  # data-dependent control flow

    model = Branchy()
    with pytest.warns(UserWarning, match="torch.fx cannot trace Branchy .*so its layers run unfused"):
        assert cnn_ext.convert(model) is model
    assert type(model.c) is cnn_ext.nn.Conv2d
    assert cnn_ext.convert(_TorchStyleNet(), fuse=False).__class__ is _TorchStyleNet


def test_convert_our_own_models_traces_without_warnings():
    """Models that already call cnn_ext's fused operator (the trainer's) trace: cnn_ext.functional's functions are
    leaves of the trace."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in ("seed", "fast", "deep"):
            model = build_model(name, backend="torch")
            assert cnn_ext.convert(model) is model


def _small_cnn():
    return torch.nn.Sequential(
        cnn_ext.nn.Conv2d(1, 4, 3, padding=1), cnn_ext.nn.MaxPool2d(2), torch.nn.ReLU(),
        cnn_ext.nn.Conv2d(4, 8, 3, stride=2, padding="valid", groups=2), cnn_ext.nn.AvgPool2d(2, ceil_mode=True),
        torch.nn.Flatten(), torch.nn.LazyLinear(10))


def test_torch_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    model = _small_cnn()
    x = torch.randn(4, 1, 16, 16)
    model(x)  # materialise the lazy layer
    eager_out = model(x)
    eager_grads = torch.autograd.grad(eager_out.sum(), list(model.parameters()))
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x)
    grads = torch.autograd.grad(out.sum(), list(model.parameters()))
    torch.testing.assert_close(out, eager_out)
    for got, want in zip(grads, eager_grads):
        torch.testing.assert_close(got, want)
