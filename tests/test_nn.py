"""cnn_ext.nn modules, cnn_ext.convert and torch.compile."""

import warnings

import pytest
import torch

import cnn_ext
from _support import DEVICES


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
