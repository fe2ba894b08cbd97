"""The MNIST models on cnn_ext's operators under torch.compile(fullgraph=True) and torch.export.export: one graph, no
breaks, and the same results as eager (forward; for compile also the gradients). The operators' Meta kernels and
registered autograd are what make this work. Small batches, to stay fast on CPU."""

import pytest
import torch
import torch.nn.functional as F

from cnn_ext.app.models import build_model

EXT_CPU = all(torch._C._dispatch_has_kernel_for_dispatch_key(f"cnn_ext::{op}", "CPU")
              for op in ("conv2d", "max_pool2d", "avg_pool2d"))
pytestmark = pytest.mark.skipif(not EXT_CPU, reason="cnn_ext was built without CPU kernels")

MODELS = ["seed", "deep"]
TOL = {"rtol": 1e-4, "atol": 1e-5}


def _model_and_batch(name, batch=4):
    """A model on the ext backend, in eval mode for the deep one (dropout would make two runs differ; batch norm
    then uses its running statistics, which training has changed from their initial values), and a batch."""
    torch.manual_seed(0)
    model = build_model(name, backend="ext")
    if name == "deep":
        with torch.no_grad():  # one training-mode pass, so the running statistics are not the trivial 0/1
            model.train()(torch.randn(8, 1, 28, 28))
        model.eval()
    x = torch.randn(batch, 1, 28, 28)
    y = torch.randint(0, 10, (batch,))
    return model, x, y


def _ext_ops(graph_module):
    return {str(node.target) for node in graph_module.graph.nodes
            if node.op == "call_function" and "cnn_ext" in str(node.target)}


@pytest.mark.parametrize("name", MODELS)
def test_compile_fullgraph_matches_eager_forward_and_gradients(name):
    torch._dynamo.reset()
    model, x, y = _model_and_batch(name)
    params = [p for p in model.parameters() if p.requires_grad]
    x_eager = x.clone().requires_grad_()
    eager_loss = F.cross_entropy(model(x_eager), y)
    eager_grads = torch.autograd.grad(eager_loss, params + [x_eager])

    compiled = torch.compile(model, fullgraph=True)
    x_compiled = x.clone().requires_grad_()
    logits = compiled(x_compiled)
    torch.testing.assert_close(logits, model(x), **TOL)
    loss = F.cross_entropy(logits, y)
    torch.testing.assert_close(loss, eager_loss, **TOL)
    grads = torch.autograd.grad(loss, params + [x_compiled])
    for got, want in zip(grads, eager_grads):
        torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("name", MODELS)
def test_export_matches_eager(name):
    model, x, _ = _model_and_batch(name)
    exported = torch.export.export(model, (x,))
    ops = _ext_ops(exported.graph_module)
    assert any("conv2d" in op for op in ops), ops  # the custom operators are in the graph, not decomposed away
    torch.testing.assert_close(exported.module()(x), model(x), **TOL)
    # Another batch (same size: export specialises it) through the same program.
    other = torch.randn_like(x)
    torch.testing.assert_close(exported.module()(other), model(other), **TOL)


def test_export_with_dynamic_batch():
    """The Meta kernels compute output sizes on symbolic shapes, so the batch size can be left dynamic."""
    model, x, _ = _model_and_batch("seed")
    batch = torch.export.Dim("batch", min=2, max=1024)
    exported = torch.export.export(model, (x,), dynamic_shapes={"x": {0: batch}})
    for n in (2, 7):
        other = torch.randn(n, 1, 28, 28)
        torch.testing.assert_close(exported.module()(other), model(other), **TOL)
