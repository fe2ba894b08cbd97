"""Cases the fuzzers (test_fuzz.py, test_fuzz_illegal.py) found failing, kept as explicit regression tests.

ILLEGAL: calls that must raise ValueError/TypeError/RuntimeError; test_fuzz_illegal.test_illegal_regressions runs
them in a child process.
CRASHES: legal calls that crashed the process; test_fuzz.test_crash_regressions runs each as `python -c code device`
in its own child, which must exit 0.

An entry with a `bug` is a known, still-open bug: its test is a strict xfail, so the fix makes it fail until the
`bug` line is deleted.
"""

import torch

import cnn_ext

fn = cnn_ext.functional
ops = torch.ops.cnn_ext


def _x(*shape, device="cpu"):
    return torch.randn(shape, device=device)


# Found when checks.h computed dilation * (k - 1) and in + 2 * padding in int64 without overflow checks: the extent
# wrapped, so impossible kernels were accepted (with dilation 2**63-1 and k=3, even an output larger than the input).

ILLEGAL = [
    dict(id="conv2d-dilation-2**62-kernel-5",
         call_text="fn.conv2d(x[1,1,6,6], w[1,1,5,5], dilation=(2**62, 1))",
         call=lambda d: fn.conv2d(_x(1, 1, 6, 6, device=d), _x(1, 1, 5, 5, device=d), dilation=(2**62, 1))),
    dict(id="conv2d-op-dilation-2**63-1-kernel-3",
         call_text="ops.conv2d(x[1,1,6,6], w[1,1,3,3], None, [1,1], [0,0], [2**63-1,1], 1)  # gives an 8x4 output",
         call=lambda d: ops.conv2d(_x(1, 1, 6, 6, device=d), _x(1, 1, 3, 3, device=d), None, [1, 1], [0, 0],
                                   [2**63 - 1, 1], 1)),
    dict(id="conv2d_backward_input-dilation-2**62",
         call_text="ops.conv2d_backward_input(go[1,1,6,6], w[1,1,5,5], [1,1,6,6], [1,1], [0,0], [2**62,2**62], 1)",
         call=lambda d: ops.conv2d_backward_input(_x(1, 1, 6, 6, device=d), _x(1, 1, 5, 5, device=d), [1, 1, 6, 6],
                                                  [1, 1], [0, 0], [2**62, 2**62], 1)),
    dict(id="conv2d_backward_weight-dilation-2**62",
         call_text="ops.conv2d_backward_weight(go[1,1,6,6], x[1,1,6,6], [1,1,5,5], [1,1], [0,0], [2**62,2**62], 1)",
         call=lambda d: ops.conv2d_backward_weight(_x(1, 1, 6, 6, device=d), _x(1, 1, 6, 6, device=d), [1, 1, 5, 5],
                                                   [1, 1], [0, 0], [2**62, 2**62], 1)),
    dict(id="max_pool2d-dilation-2**62-kernel-5",
         call_text="fn.max_pool2d(x[1,1,6,6], 5, stride=1, dilation=2**62)",
         call=lambda d: fn.max_pool2d(_x(1, 1, 6, 6, device=d), 5, 1, dilation=2**62)),
    dict(id="max_pool2d-dilation-2**63-1-kernel-3",
         call_text="fn.max_pool2d(x[1,1,6,6], 3, stride=1, dilation=2**63-1)  # gives an 8x8 output",
         call=lambda d: fn.max_pool2d(_x(1, 1, 6, 6, device=d), 3, 1, dilation=2**63 - 1)),
    dict(id="max_pool2d_backward-dilation-2**62",
         call_text="ops.max_pool2d_backward(go[1,1,6,6], zeros_long[1,1,6,6], [1,1,6,6], [5,5], [1,1], [0,0], "
                   "[2**62,2**62], False)",
         call=lambda d: ops.max_pool2d_backward(_x(1, 1, 6, 6, device=d),
                                                torch.zeros(1, 1, 6, 6, dtype=torch.long, device=d), [1, 1, 6, 6],
                                                [5, 5], [1, 1], [0, 0], [2**62, 2**62], False)),
    dict(id="conv2d-padding-2**63-1",
         call_text="fn.conv2d(x[1,1,6,6], w[1,1,3,3], padding=(0, 2**63-1))  # returns a 4x2 output of zeros",
         call=lambda d: fn.conv2d(_x(1, 1, 6, 6, device=d), _x(1, 1, 3, 3, device=d), padding=(0, 2**63 - 1)),
         # in + 2 * pad overflowed: 2*(2**63-1) wrapped to -2, so it ran as if padding were -1 (torch rejects it).
         ),
    dict(id="conv2d_backward_input-padding-2**63-1",
         call_text="ops.conv2d_backward_input(go[1,1,4,2], w[1,1,3,3], [1,1,6,6], [1,1], [0,2**63-1], [1,1], 1)",
         call=lambda d: ops.conv2d_backward_input(_x(1, 1, 4, 2, device=d), _x(1, 1, 3, 3, device=d), [1, 1, 6, 6],
                                                  [1, 1], [0, 2**63 - 1], [1, 1], 1)),
    # Just below the overflow: must keep raising.
    dict(id="conv2d-dilation-2**40-kernel-5",
         call_text="fn.conv2d(x[1,1,6,6], w[1,1,5,5], dilation=2**40)",
         call=lambda d: fn.conv2d(_x(1, 1, 6, 6, device=d), _x(1, 1, 5, 5, device=d), dilation=2**40)),
]


# Found in csrc/cpu/conv2d.cpp, wgrad's explicit (non-stride-1) path, since fixed: gather_col_t points `row` at in_h*W + w_off, which for a
# window lying wholly in the left padding is before the input row (far before it when the padding is large), and
# copy_run then reads a 64-byte block from there even when it copies nothing (n == 0): it only checks the block's end
# against the buffer's end, never its start. With padding 2**24 that address is unmapped: SIGSEGV. With small padding it
# is a silent heap over-read of up to 64 bytes before the input (e.g. x 1x1x1x1, stride 2, padding 2).
CRASHES = [
    dict(id="conv2d_backward_weight-stride-and-padding-2**24",
         code="""
import sys, torch, cnn_ext
device = sys.argv[1]
x = torch.randn(1, 1, 1, 1, dtype=torch.float64, device=device)
grad_output = torch.ones(1, 1, 3, 3, dtype=torch.float64, device=device)
big = 2**24
# Only the centre output's window (which starts at 0) sees the input: grad_weight = x.
gw = torch.ops.cnn_ext.conv2d_backward_weight(grad_output, x, [1, 1, 1, 1], [big, big], [big, big], [1, 1], 1)
assert torch.equal(gw, x), (gw, x)
"""),
    dict(id="conv2d-autograd-stride-and-padding-2**31",
         code="""
import sys, torch, cnn_ext
device = sys.argv[1]
x = torch.randn(1, 2, 6, 6, dtype=torch.float64, device=device, requires_grad=True)
w = torch.randn(3, 2, 5, 5, dtype=torch.float64, device=device, requires_grad=True)
out = cnn_ext.functional.conv2d(x, w, stride=2**31, padding=2**31)
out.sum().backward()
assert torch.allclose(w.grad, x[:, :, :5, :5].detach().sum(0).expand(3, 2, 5, 5))
"""),
]
