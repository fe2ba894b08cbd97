"""Small CUDA parity cases for compute-sanitizer (memcheck, racecheck): every cnn_ext CUDA kernel runs at least once
(forward and backward, GEMM and direct convolution paths, split-K, pooling) in float32 and float16, and is compared
with PyTorch's CPU float64 result. Exits non-zero on any mismatch.

    compute-sanitizer --tool memcheck python scripts/sanitizer_case.py
    python scripts/sanitizer_case.py --large    # 64-bit index path (tensors over 2^29 elements); not for sanitizers
"""

import argparse
import sys

import torch
import torch.nn.functional as F

import cnn_ext  # noqa: F401  (loads the extension and registers the ops)

ops = torch.ops.cnn_ext
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2}
failures = []


def check(name, got, ref):
    """got (a CUDA tensor) against ref, relative to ref's largest magnitude; compared on the GPU in float64."""
    got = got.detach().double()
    ref = ref.detach().to(got.device, torch.float64)
    if got.shape != ref.shape:
        failures.append(f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}")
        return
    if ref.numel() == 0:
        return
    scale = max(1.0, ref.abs().max().item())
    tol = TOLERANCE.get(torch.float16 if name.endswith("float16") else torch.float32)
    err = (got - ref).abs().max().item()
    if not err <= tol * scale:  # also catches NaN
        failures.append(f"{name}: max error {err:.3g} > {tol * scale:.3g}")


def conv_case(dtype, n, c, h, w, k, r, s, stride, padding, dilation, groups, bias=True):
    name = f"conv2d n{n} c{c} {h}x{w} k{k} {r}x{s} s{stride} p{padding} d{dilation} g{groups} {dtype}"
    x = torch.randn(n, c, h, w, dtype=dtype)
    weight = torch.randn(k, c // groups, r, s, dtype=dtype)
    b = torch.randn(k, dtype=dtype) if bias else None
    args = (list(stride), list(padding), list(dilation), groups)
    dev = lambda t: None if t is None else t.cuda()  # noqa: E731

    x64, w64 = x.double().requires_grad_(), weight.double().requires_grad_()
    b64 = b.double().requires_grad_() if bias else None
    ref = F.conv2d(x64, w64, b64, stride, padding, dilation, groups)
    grad_out = torch.randn(ref.shape, dtype=dtype)
    ref_grads = torch.autograd.grad(ref, [x64, w64] + ([b64] if bias else []), grad_out.double())

    check(f"{name} forward {dtype}", ops.conv2d(dev(x), dev(weight), dev(b), *args), ref)
    check(f"{name} input grad {dtype}",
          ops.conv2d_backward_input(dev(grad_out), dev(weight), list(x.shape), *args), ref_grads[0])
    check(f"{name} weight grad {dtype}",
          ops.conv2d_backward_weight(dev(grad_out), dev(x), list(weight.shape), *args), ref_grads[1])
    if bias:
        check(f"{name} bias grad {dtype}", ops.conv2d_backward_bias(dev(grad_out)), ref_grads[2])


def max_pool_case(dtype, shape, kernel, stride, padding, dilation, ceil_mode):
    name = f"max_pool2d {shape} k{kernel} s{stride} p{padding} d{dilation} ceil{ceil_mode} {dtype}"
    x = torch.randn(shape, dtype=dtype)
    x64 = x.double().requires_grad_()
    ref, ref_indices = F.max_pool2d(x64, kernel, stride, padding, dilation, ceil_mode, return_indices=True)
    grad_out = torch.randn(ref.shape, dtype=dtype)
    (ref_grad,) = torch.autograd.grad(ref, x64, grad_out.double())
    out, indices = ops.max_pool2d(x.cuda(), list(kernel), list(stride), list(padding), list(dilation), ceil_mode)
    check(f"{name} forward {dtype}", out, ref)
    if not torch.equal(indices.cpu(), ref_indices):
        failures.append(f"{name}: indices differ")
    grad = ops.max_pool2d_backward(grad_out.cuda(), indices, list(shape), list(kernel), list(stride), list(padding),
                                   list(dilation), ceil_mode)
    check(f"{name} backward {dtype}", grad, ref_grad)


def avg_pool_case(dtype, shape, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override):
    name = (f"avg_pool2d {shape} k{kernel} s{stride} p{padding} ceil{ceil_mode} cip{count_include_pad} "
            f"div{divisor_override} {dtype}")
    x = torch.randn(shape, dtype=dtype)
    x64 = x.double().requires_grad_()
    ref = F.avg_pool2d(x64, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override)
    grad_out = torch.randn(ref.shape, dtype=dtype)
    (ref_grad,) = torch.autograd.grad(ref, x64, grad_out.double())
    args = (list(kernel), list(stride), list(padding), ceil_mode, count_include_pad, divisor_override)
    check(f"{name} forward {dtype}", ops.avg_pool2d(x.cuda(), *args), ref)
    check(f"{name} backward {dtype}", ops.avg_pool2d_backward(grad_out.cuda(), list(shape), *args), ref_grad)


def small_cases():
    for dtype in (torch.float32, torch.float16):
        conv_case(dtype, 2, 4, 7, 9, 8, 3, 3, (1, 1), (1, 1), (1, 1), 1)        # implicit GEMM, tile overhang
        conv_case(dtype, 2, 6, 8, 7, 70, 3, 2, (2, 1), (1, 0), (1, 2), 2)       # grouped, strided, dilated; 2 N tiles
        conv_case(dtype, 4, 8, 12, 12, 8, 3, 3, (1, 1), (1, 1), (1, 1), 1)      # wgrad K = 576: split-K
        conv_case(dtype, 2, 4, 6, 6, 8, 3, 3, (2, 2), (1, 1), (1, 1), 4, bias=False)  # depthwise, multiplier 2
        max_pool_case(dtype, (2, 3, 9, 10), (3, 3), (2, 2), (1, 1), (1, 1), True)
        max_pool_case(dtype, (1, 2, 11, 7), (3, 2), (2, 1), (1, 0), (2, 3), False)
        avg_pool_case(dtype, (2, 3, 9, 10), (3, 3), (2, 2), (1, 1), True, False, None)
        avg_pool_case(dtype, (2, 3, 8, 8), (2, 3), (3, 2), (1, 1), False, True, 5)


def large_cases():
    """Tensors above the 32-bit fast path's limit (2^29 elements), checked against PyTorch's own CUDA kernels."""
    torch.manual_seed(1)
    x = torch.randn(1, 4, 8192, 16400, device="cuda", dtype=torch.float16)  # 537M elements
    out, indices = ops.max_pool2d(x, [3, 3], [2, 2], [1, 1], [1, 1], False)
    ref, ref_indices = F.max_pool2d(x, 3, 2, 1, return_indices=True)
    if not (torch.equal(out, ref) and torch.equal(indices, ref_indices)):
        failures.append("large max_pool2d differs from torch")
    check("large avg_pool2d float16", ops.avg_pool2d(x, [2, 2], [2, 2], [0, 0], False, True, None),
          F.avg_pool2d(x, 2, 2))
    del out, indices, ref, ref_indices
    weight = torch.randn(8, 4, 3, 3, device="cuda", dtype=torch.float16) / 6
    got = ops.conv2d(x, weight, None, [1, 1], [1, 1], [1, 1], 1)
    # A few output rows across the tensor (the last lies beyond 2^31 elements), each against a 3-row slab.
    height = x.shape[2]
    for row in (0, 4000, height - 1):
        slab = F.pad(x[:, :, max(row - 1, 0):row + 2].double(), (0, 0, int(row == 0), int(row == height - 1)))
        ref_row = F.conv2d(slab, weight.double(), None, 1, (0, 1))[:, :, 0]
        check(f"large conv2d row {row} float16", got[:, :, row], ref_row)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--large", action="store_true", help="run the 64-bit index cases instead")
    opts = parser.parse_args()
    if not torch.cuda.is_available():
        print("sanitizer_case: no CUDA device", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    large_cases() if opts.large else small_cases()
    torch.cuda.synchronize()
    for failure in failures:
        print("MISMATCH", failure, file=sys.stderr)
    print(f"sanitizer_case: {'large' if opts.large else 'small'} cases, {len(failures)} mismatches")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
