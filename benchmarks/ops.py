"""The op benchmarks: for each case, the same computation by cnn_ext's operator and by torch's, so each row
compares like with like (backward rows call torch's aten backward ops directly, not autograd)."""

import torch
import torch.nn.functional as F

from . import cases, timing
from .report import Row

ext = torch.ops.cnn_ext
aten = torch.ops.aten

# Our result must match torch's within allclose(rtol=tol, atol=tol·max|torch|): the absolute part scales with
# the output, since long fp32/bf16 reductions in a different order differ by that much without being wrong.
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 2e-2}


def conv_pairs(case, batch, dtype, device):
    """{op: (ours, torch[, reference])} zero-argument callables for the convolution `case`, on shared random
    inputs."""
    make = dict(dtype=dtype, device=device)
    x = torch.randn(batch, case.in_channels, case.size, case.size, **make)
    weight = torch.randn(case.out_channels, case.in_channels, case.kernel, case.kernel, **make)
    bias = torch.randn(case.out_channels, **make)
    grad_out = torch.randn(batch, case.out_channels, case.out_size, case.out_size, **make)
    stride, padding, dilation, groups = [case.stride] * 2, [case.padding] * 2, [1, 1], 1
    conv_args = (stride, padding, dilation, groups)

    def torch_backward(output_mask):
        return aten.convolution_backward(grad_out, x, weight, None, stride, padding, dilation, False, [0, 0],
                                         groups, output_mask)

    pairs = {
        "conv2d.fwd": (lambda: ext.conv2d(x, weight, bias, *conv_args),
                       lambda: F.conv2d(x, weight, bias, *conv_args)),
        "conv2d.bwd_input": (lambda: ext.conv2d_backward_input(grad_out, weight, x.shape, *conv_args),
                             lambda: torch_backward([True, False, False])[0]),
        "conv2d.bwd_weight": (lambda: ext.conv2d_backward_weight(grad_out, x, weight.shape, *conv_args),
                              lambda: torch_backward([False, True, False])[1]),
    }
    if x.is_cuda:
        # cuDNN's autotuned algorithms (FFT, Winograd) are not exact: on a GPU ours is checked against torch's
        # convolution of the same inputs in float64, rounded to the row's dtype.
        x64, w64, b64, dy64 = (t.double() for t in (x, weight, bias, grad_out))

        def exact_backward(output_mask):
            return aten.convolution_backward(dy64, x64, w64, None, stride, padding, dilation, False, [0, 0], groups,
                                             output_mask)

        exact = {"conv2d.fwd": lambda: F.conv2d(x64, w64, b64, *conv_args).to(dtype),
                 "conv2d.bwd_input": lambda: exact_backward([True, False, False])[0].to(dtype),
                 "conv2d.bwd_weight": lambda: exact_backward([False, True, False])[1].to(dtype)}
        pairs = {op: pair + (exact[op],) for op, pair in pairs.items()}
    return pairs


def _tie_free_pool_input(case, batch, dtype, device):
    """Random values, distinct within every pooling window so the argmax (the indices) is unique and ours must
    equal torch's: multiples of k² plus the position within the window, all exact in bf16 (|v| < 256, over 32)."""
    position = torch.arange(case.size) % case.kernel
    within_window = position[:, None] * case.kernel + position[None, :]
    coarse = torch.randint(-32, 32, (batch, case.channels, case.size, case.size))
    return ((coarse * case.kernel**2 + within_window) / 32).to(dtype=dtype, device=device)


def pool_pairs(case, batch, dtype, device):
    """{op: (ours, torch)} for the pooling `case`. Max pooling is compared with torch's max_pool2d_with_indices,
    since ours always returns the indices its backward needs; both backward ops get torch's indices."""
    x = _tie_free_pool_input(case, batch, dtype, device)
    grad_out = torch.randn(batch, case.channels, case.out_size, case.out_size, dtype=dtype, device=device)
    kernel = stride = [case.kernel] * 2
    padding, dilation, ceil_mode = [0, 0], [1, 1], False
    count_include_pad, divisor_override = True, None
    _, indices = aten.max_pool2d_with_indices(x, kernel, stride, padding, dilation, ceil_mode)
    avg_args = (kernel, stride, padding, ceil_mode, count_include_pad, divisor_override)
    return {
        "max_pool2d.fwd": (lambda: ext.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode),
                           lambda: aten.max_pool2d_with_indices(x, kernel, stride, padding, dilation, ceil_mode)),
        "max_pool2d.bwd": (lambda: ext.max_pool2d_backward(grad_out, indices, x.shape, kernel, stride, padding,
                                                           dilation, ceil_mode),
                           lambda: aten.max_pool2d_with_indices_backward(grad_out, x, kernel, stride, padding,
                                                                         dilation, ceil_mode, indices)),
        "avg_pool2d.fwd": (lambda: ext.avg_pool2d(x, *avg_args),
                           lambda: aten.avg_pool2d(x, *avg_args)),
        "avg_pool2d.bwd": (lambda: ext.avg_pool2d_backward(grad_out, x.shape, *avg_args),
                           lambda: aten.avg_pool2d_backward(grad_out, x, *avg_args)),
    }


def norm_pairs(case, batch, dtype, device):
    """{op: (ours, torch)} for the batch-norm `case` in training mode, against aten's native_batch_norm (and its
    backward, given the statistics it saved), alone, followed by a ReLU, and by the ReLU and a 2x2 max-pooling."""
    x = torch.randn(batch, case.channels, case.size, case.size, dtype=dtype, device=device) * 2 + 1
    weight = torch.rand(case.channels, dtype=dtype, device=device) + 0.5
    bias = torch.randn(case.channels, dtype=dtype, device=device)
    grad_out = torch.randn_like(x)
    eps = 1e-5
    _, mean, var = ext.batch_norm(x, weight, bias, None, None, True, eps)
    _, save_mean, save_invstd = aten.native_batch_norm(x, weight, bias, None, None, True, 0.1, eps)
    mask = [True, True, True]
    kept = ext.batch_norm_relu(x, weight, bias, None, None, True, eps)[3]
    relu_out = aten.native_batch_norm(x, weight, bias, None, None, True, 0.1, eps)[0].relu_()

    def torch_relu_backward():
        grad = aten.threshold_backward(grad_out, relu_out, 0)
        return aten.native_batch_norm_backward(grad, x, weight, None, None, save_mean, save_invstd, True, eps, mask)[0]

    pool = ([2, 2], [2, 2], [0, 0], [1, 1], False)
    pooled, _, _, winners = ext.batch_norm_relu_max_pool2d(x, weight, bias, None, None, True, eps, *pool)
    torch_winners = aten.max_pool2d_with_indices(relu_out, *pool)[1]
    grad_pooled = torch.randn_like(pooled)

    def torch_pool_forward():
        out = aten.native_batch_norm(x, weight, bias, None, None, True, 0.1, eps)[0].relu_()
        return aten.max_pool2d_with_indices(out, *pool)[0]

    def torch_pool_backward():
        grad = aten.max_pool2d_with_indices_backward(grad_pooled, relu_out, *pool, torch_winners)
        grad = aten.threshold_backward(grad, relu_out, 0)
        return aten.native_batch_norm_backward(grad, x, weight, None, None, save_mean, save_invstd, True, eps, mask)[0]

    return {
        "batch_norm.fwd": (lambda: ext.batch_norm(x, weight, bias, None, None, True, eps)[0],
                           lambda: aten.native_batch_norm(x, weight, bias, None, None, True, 0.1, eps)[0]),
        "batch_norm.bwd": (lambda: ext.batch_norm_backward(grad_out, x, weight, mean, var, True, eps, mask)[0],
                           lambda: aten.native_batch_norm_backward(grad_out, x, weight, None, None, save_mean,
                                                                   save_invstd, True, eps, mask)[0]),
        "batch_norm_relu.fwd": (lambda: ext.batch_norm_relu(x, weight, bias, None, None, True, eps)[0],
                                lambda: aten.native_batch_norm(x, weight, bias, None, None, True, 0.1, eps)[0].relu_()),
        "batch_norm_relu.bwd": (lambda: ext.batch_norm_backward(grad_out, x, weight, mean, var, True, eps, mask,
                                                                kept)[0],
                                torch_relu_backward),
        "batch_norm_relu_pool.fwd": (
            lambda: ext.batch_norm_relu_max_pool2d(x, weight, bias, None, None, True, eps, *pool)[0],
            torch_pool_forward),
        "batch_norm_relu_pool.bwd": (
            lambda: ext.batch_norm_relu_max_pool2d_backward(grad_pooled, pooled, winners, x, weight, mean, var, True,
                                                            eps, mask)[0],
            torch_pool_backward),
    }


def dropout_pairs(case, batch, dtype, device):
    """{op: (ours, torch, reference)} for the dropout `case`: ours and torch's draw different masks, so ours is
    checked against torch's formula (x * kept * scale, as native_dropout computes it) with the mask ours drew."""
    x = torch.randn(batch, case.features, dtype=dtype, device=device)
    grad_out = torch.randn_like(x)
    seed = 2024
    kept = ext.dropout(x, case.p, seed)[1]
    scale = 1.0 / (1.0 - case.p)
    return {
        "dropout.fwd": (lambda: ext.dropout(x, case.p, seed)[0], lambda: aten.native_dropout(x, case.p, True)[0],
                        lambda: x * kept * scale),
        "dropout.bwd": (lambda: ext.dropout_backward(grad_out, kept, case.p),
                        lambda: aten.native_dropout_backward(grad_out, kept, scale),
                        lambda: grad_out * kept * scale),
    }


def compare(ours, ref, tol):
    """("ok" or what differs, max |ours - ref| / max |ref| over the floating-point outputs). Integer outputs
    (max-pool indices) must be equal."""
    ours = ours if isinstance(ours, (tuple, list)) else (ours,)
    ref = ref if isinstance(ref, (tuple, list)) else (ref,)
    if len(ours) != len(ref):
        return f"MISMATCH: {len(ours)} outputs, torch has {len(ref)}", None
    max_err = None
    for i, (o, r) in enumerate(zip(ours, ref)):
        if o.shape != r.shape or o.dtype != r.dtype:
            return f"MISMATCH: output {i} is {o.dtype}{tuple(o.shape)}, torch's {r.dtype}{tuple(r.shape)}", max_err
        if not r.is_floating_point():
            if not torch.equal(o, r):
                return f"MISMATCH: output {i}: {(o != r).sum().item()} of {r.numel()} indices differ", max_err
            continue
        o, r = o.double(), r.double()
        scale = r.abs().max().clamp_min(torch.finfo(torch.float32).tiny)
        err = ((o - r).abs().max() / scale).item()
        max_err = err if max_err is None else max(max_err, err)
        if not torch.allclose(o, r, rtol=tol, atol=tol * scale.item()):
            return f"MISMATCH: output {i}: max rel err {err:.1e} > {tol:.0e}", max_err
    return "ok", max_err


def validate(ours_fn, torch_fn, dtype):
    """Run both once and compare: (check, max_err, whether ours can be timed)."""
    reference = torch_fn()
    try:
        result = ours_fn()
    except Exception as e:  # a missing kernel or an unsupported dtype: say so in the row, keep benchmarking
        message = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return f"ERROR {type(e).__name__}: {message[:80]}", None, False
    check, max_err = compare(result, reference, TOLERANCE[dtype])
    return check, max_err, True


def run(sections, device, dtypes, device_name, settings, time_pair, log):
    """Rows for the "conv", "pool" and "norm" sections: each op validated, then timed interleaved with torch's."""
    make_pairs = {"conv": conv_pairs, "pool": pool_pairs, "norm": norm_pairs}
    norm_cases = cases.NORM_CASES if device == "cpu" else ()
    # A family without a batch size on this device (the deep family on CUDA) has no rows there.
    selected = [case for case in cases.CONV_CASES + cases.POOL_CASES + norm_cases
                if case.section in sections and case.family in settings.batches]
    rows = []
    with torch.no_grad():
        for dtype in dtypes:
            dtype_name = str(dtype).removeprefix("torch.")
            for case in selected:
                batch = settings.batches[case.family]
                make = dropout_pairs if isinstance(case, cases.DropoutCase) else make_pairs[case.section]
                pairs = make(case, batch, dtype, device)
                for op in case.ops:
                    ours_fn, torch_fn, *reference = pairs[op]  # a reference to check ours against, if not torch's
                    check, max_err, runnable = validate(ours_fn, reference[0] if reference else torch_fn, dtype)
                    samples = time_pair({"ours": ours_fn, "torch": torch_fn} if runnable else {"torch": torch_fn})
                    row = Row(section=case.section, case=case.name, op=op, dtype=dtype_name, batch=batch,
                              shape=case.describe(batch), work=case.work(op, batch, dtype.itemsize),
                              unit=case.unit,
                              peak=cases.peak_rate(device, device_name, dtype_name, case.unit,
                                                   settings.cpu_peak_flops),
                              target=cases.target_ratio(device, case.family, case.section, op, case.name),
                              check=check, max_err=max_err, torch_samples=samples["torch"],
                              ours_samples=samples.get("ours", []),
                              ours_one_thread_samples=samples.get("ours" + timing.ONE_THREAD, []))
                    log(row)
                    rows.append(row)
    return rows
