"""CUDA cases for compute-sanitizer (memcheck, racecheck) and the 64-bit index check. Every cnn_ext CUDA kernel runs
at least once - the implicit GEMM in each direction with and without split-K (and with each block tile), the direct
kernels, the bias gradient, pooling forward and backward (whose backward also checks its indices), the fused conv +
max-pool + ReLU with its weights in shared and in global memory, and its backward - in float32, float16 and
bfloat16, each compared with PyTorch's float64 result on the CPU. Exits non-zero on any mismatch.

    compute-sanitizer --tool memcheck python scripts/sanitizer_case.py
    compute-sanitizer --tool racecheck python scripts/sanitizer_case.py --racecheck   # fewer, smaller cases
    python scripts/sanitizer_case.py --large    # a tensor of more than 2^31 elements; not for the sanitizers
    python scripts/sanitizer_case.py --emulated [--large-shape 1,2,40,41]   # on the CPU emulator (CI checks the
                                                                             # script itself this way)
"""

import argparse
import os
import sys

import torch
import torch.nn.functional as F

import cnn_ext  # noqa: F401  (loads the extension and registers the ops)

ops = torch.ops.cnn_ext
DEVICE = "cuda"  # or "cpu" with --emulated
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}
failures = []


def check(name, got, ref, dtype):
    """got (a device tensor) against ref, relative to ref's largest magnitude, in float64."""
    got = got.detach().double().cpu()
    ref = ref.detach().double().cpu()
    if got.shape != ref.shape:
        failures.append(f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}")
        return
    if ref.numel() == 0:
        return
    scale = max(1.0, ref.abs().max().item())
    err = (got - ref).abs().max().item()
    if not err <= TOLERANCE[dtype] * scale:  # also catches NaN
        failures.append(f"{name}: max error {err:.3g} > {TOLERANCE[dtype] * scale:.3g}")


def inputs(dtype, *shapes):
    """Rounded to dtype on the CPU (the reference's inputs), and their copies on the device."""
    cpu = [torch.randn(shape).to(dtype) for shape in shapes]
    return cpu, [t.to(DEVICE) for t in cpu]


def conv_case(dtype, n, c, h, w, k, r, s, stride, padding, dilation, groups):
    name = f"conv2d n{n} c{c} {h}x{w} k{k} {r}x{s} s{stride} p{padding} d{dilation} g{groups} {dtype}"
    (x, weight, b), (dx, dweight, db) = inputs(dtype, (n, c, h, w), (k, c // groups, r, s), (k,))
    args = (list(stride), list(padding), list(dilation), groups)
    x64, w64, b64 = (t.double().requires_grad_() for t in (x, weight, b))
    ref = F.conv2d(x64, w64, b64, stride, padding, dilation, groups)
    grad_out = torch.randn(ref.shape).to(dtype)
    ref_grads = torch.autograd.grad(ref, [x64, w64, b64], grad_out.double())
    check(f"{name} forward", ops.conv2d(dx, dweight, db, *args), ref, dtype)
    dgrad_out = grad_out.to(DEVICE)
    check(f"{name} input grad", ops.conv2d_backward_input(dgrad_out, dweight, list(x.shape), *args), ref_grads[0],
          dtype)
    check(f"{name} weight grad", ops.conv2d_backward_weight(dgrad_out, dx, list(weight.shape), *args), ref_grads[1],
          dtype)
    check(f"{name} bias grad", ops.conv2d_backward_bias(dgrad_out), ref_grads[2], dtype)


def pool_case(dtype, shape, kernel, stride, padding, dilation, ceil_mode):
    name = f"pool {shape} k{kernel} s{stride} p{padding} d{dilation} ceil{ceil_mode} {dtype}"
    (x,), (dx,) = inputs(dtype, shape)
    x64 = x.double().requires_grad_()
    ref, ref_indices = F.max_pool2d(x64, kernel, stride, padding, dilation, ceil_mode, return_indices=True)
    grad_out = torch.randn(ref.shape).to(dtype)
    (ref_grad,) = torch.autograd.grad(ref, x64, grad_out.double())
    out, indices = ops.max_pool2d(dx, list(kernel), list(stride), list(padding), list(dilation), ceil_mode)
    check(f"max_{name} forward", out, ref, dtype)
    if not torch.equal(indices.cpu(), ref_indices):
        failures.append(f"max_{name}: indices differ")
    grad = ops.max_pool2d_backward(grad_out.to(DEVICE), indices, list(shape), list(kernel), list(stride), list(padding),
                                   list(dilation), ceil_mode)
    check(f"max_{name} backward", grad, ref_grad, dtype)
    avg_args = (list(kernel), list(stride), list(padding), ceil_mode, False, None)
    x64 = x.double().requires_grad_()
    ref = F.avg_pool2d(x64, kernel, stride, padding, ceil_mode, False)
    grad_out = torch.randn(ref.shape).to(dtype)
    (ref_grad,) = torch.autograd.grad(ref, x64, grad_out.double())
    check(f"avg_{name} forward", ops.avg_pool2d(dx, *avg_args), ref, dtype)
    check(f"avg_{name} backward", ops.avg_pool2d_backward(grad_out.to(DEVICE), list(shape), *avg_args), ref_grad,
          dtype)


def fused_case(dtype, n, c, k, hw, r):
    name = f"conv2d_maxpool_relu n{n} c{c} k{k} {hw}x{hw} {r}x{r} {dtype}"
    (x, weight, b), (dx, dweight, db) = inputs(dtype, (n, c, hw, hw), (k, c, r, r), (k,))
    conv, pool = ([1, 1], [1, 1], [1, 1], 1), ([2, 2], [2, 2], [0, 0], [1, 1], True)
    x64, w64, b64 = (t.double().requires_grad_() for t in (x, weight, b))
    ref = torch.relu(F.max_pool2d(F.conv2d(x64, w64, b64, padding=1), 2, ceil_mode=True))
    out, indices = ops.conv2d_maxpool_relu(dx, dweight, db, *conv, *pool)
    check(f"{name} forward", out, ref, dtype)
    grad_out = torch.randn(ref.shape).to(dtype)
    ref_grads = torch.autograd.grad(ref, [x64, w64, b64], grad_out.double())
    grads = ops.conv2d_maxpool_relu_backward(grad_out.to(DEVICE), out, indices, dx, dweight, *conv, *pool,
                                             [True, True, True])
    for what, got, want in zip(("input", "weight", "bias"), grads, ref_grads):
        check(f"{name} {what} grad", got, want, dtype)


def gemm_tile_cases(dtype):
    """The implicit GEMM in each direction with each block tile (CNN_EXT_CUDA_TILE, read at every launch): overhang
    in M and N, split K, and a grouped input gradient by GEMM."""
    before = os.environ.get("CNN_EXT_CUDA_TILE")
    try:
        for tile in ("128x64", "128x128"):
            os.environ["CNN_EXT_CUDA_TILE"] = tile
            conv_case(dtype, 3, 67, 9, 7, 45, 3, 3, (1, 1), (1, 1), (1, 1), 1)
            conv_case(dtype, 1, 32, 6, 6, 32, 3, 3, (1, 1), (1, 1), (1, 1), 1)
            conv_case(dtype, 2, 36, 8, 7, 70, 3, 2, (2, 1), (1, 0), (1, 2), 2)
    finally:
        if before is None:
            os.environ.pop("CNN_EXT_CUDA_TILE", None)
        else:
            os.environ["CNN_EXT_CUDA_TILE"] = before


def small_cases(racecheck):
    dtypes = (torch.float32, torch.bfloat16) if racecheck else (torch.float32, torch.float16, torch.bfloat16)
    for dtype in dtypes:
        gemm_tile_cases(dtype)
        conv_case(dtype, 2, 4, 7, 9, 8, 3, 3, (1, 1), (1, 1), (1, 1), 1)      # implicit GEMM, overhang; direct dgrad
        conv_case(dtype, 1, 32, 6, 6, 32, 3, 3, (1, 1), (1, 1), (1, 1), 1)    # fprop and dgrad split K (288)
        conv_case(dtype, 4, 4, 12, 12, 8, 3, 3, (1, 1), (1, 1), (1, 1), 1)    # wgrad splits K (N·P·Q = 576)
        conv_case(dtype, 2, 4, 6, 6, 8, 3, 3, (2, 2), (1, 1), (1, 1), 4)      # depthwise, multiplier 2: direct kernels
        pool_case(dtype, (2, 3, 9, 10), (3, 3), (2, 2), (1, 1), (1, 1), True)
        fused_case(dtype, 2, 4, 6, 8, 3)                                      # weights in shared memory
        if not racecheck:
            conv_case(dtype, 2, 6, 8, 7, 70, 3, 2, (2, 1), (1, 0), (1, 2), 2)  # grouped, strided, dilated; 2 N tiles
            conv_case(dtype, 2, 36, 8, 7, 70, 3, 2, (2, 1), (1, 0), (1, 2), 2)  # the same, GEMM dgrad (18 per group)
            pool_case(dtype, (1, 2, 11, 7), (3, 2), (2, 1), (1, 0), (2, 3), False)
            fused_case(dtype, 1, 460, 3, 4, 3)                                 # C·R·S = 4140: weights in global memory


LARGE_SHAPE = (1, 2, 32768, 32769)


def large_cases(shape):
    """A float16 input of `shape`, by default 2 × 32768 × 32769 > 2^31 elements (the 64-bit index path, whose
    offsets exceed int32), through max/avg pooling and a convolution, checked against PyTorch's own kernels and, for
    a few rows across the tensor (the last beyond 2^31 elements), against a float64 convolution on the CPU."""
    torch.manual_seed(1)
    x = torch.randn(shape, device=DEVICE, dtype=torch.float16)
    out, indices = ops.max_pool2d(x, [3, 3], [2, 2], [1, 1], [1, 1], False)
    ref, ref_indices = F.max_pool2d(x, 3, 2, 1, return_indices=True)
    if not (torch.equal(out, ref) and torch.equal(indices, ref_indices)):
        failures.append("large max_pool2d differs from torch")
    grad = ops.max_pool2d_backward(torch.ones_like(out), indices, list(x.shape), [3, 3], [2, 2], [1, 1], [1, 1],
                                   False)
    if grad.sum(dtype=torch.float64).item() != out.numel():
        failures.append("large max_pool2d backward lost gradient")
    del out, indices, ref, ref_indices, grad
    check("large avg_pool2d", ops.avg_pool2d(x, [2, 2], [2, 2], [0, 0], False, True, None), F.avg_pool2d(x, 2, 2),
          torch.float16)
    weight = torch.randn(2, shape[1], 3, 3, device=DEVICE, dtype=torch.float16) / 4
    got = ops.conv2d(x, weight, None, [1, 1], [1, 1], [1, 1], 1)
    height = x.shape[2]
    for row in (0, height // 2, height - 1):  # each against a 3-row slab
        slab = F.pad(x[:, :, max(row - 1, 0):row + 2].double(), (0, 0, int(row == 0), int(row == height - 1)))
        ref_row = F.conv2d(slab.cpu(), weight.double().cpu(), None, 1, (0, 1))[:, :, 0]
        check(f"large conv2d row {row}", got[:, :, row], ref_row, torch.float16)


def main():
    global DEVICE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--large", action="store_true", help="run the >2^31-element case instead")
    parser.add_argument("--racecheck", action="store_true", help="fewer, smaller cases (racecheck is slow)")
    parser.add_argument("--emulated", action="store_true",
                        help="run on the CPU through the CUDA emulator (64-bit indices forced with --large)")
    parser.add_argument("--large-shape", default=",".join(map(str, LARGE_SHAPE)),
                        help="N,C,H,W of --large's input (default %(default)s)")
    opts = parser.parse_args()
    if opts.emulated:
        DEVICE = "cpu"
        cnn_ext.cuda_emulation.enable(force_int64_indices=opts.large)
    elif not torch.cuda.is_available():
        print("sanitizer_case: no CUDA device", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    if opts.large:
        shape = tuple(int(v) for v in opts.large_shape.split(","))
        print(f"sanitizer_case: large input {shape}, {torch.Size(shape).numel()} elements")
        large_cases(shape)
    else:
        small_cases(opts.racecheck)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    for failure in failures:
        print("MISMATCH", failure, file=sys.stderr)
    print(f"sanitizer_case: {'large' if opts.large else 'small'} cases, {len(failures)} mismatches")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
