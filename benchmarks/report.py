"""Results: one Row per measurement, the machine description, and their rendering as a table, JSON and a chart."""

import json
import os
import platform
import statistics
from dataclasses import asdict, dataclass, field

import torch

import cnn_ext


@dataclass
class Row:
    section: str  # "conv", "pool", "norm", "train" or "models"
    case: str  # a shape name from cases.py, e.g. "resnet.3x3_64"
    op: str  # e.g. "conv2d.bwd_input"
    dtype: str
    batch: int
    shape: str  # the problem, readable
    work: float | None  # FLOPs (unit "GFLOP/s") or bytes (unit "GB/s") per call; None for the train step
    unit: str | None
    peak: float | None  # the machine's peak in FLOP/s or byte/s, where known
    target: float  # largest passing time ratio ours / torch
    check: str  # "ok", or why our result is missing or differs from torch's
    max_err: float | None  # max |ours - torch| / max |torch|
    torch_samples: list[float]  # seconds per call, one per repetition
    ours_samples: list[float] = field(default_factory=list)  # empty where ours could not run
    kernels: dict | None = None  # GPU kernels one call launches, {"ours": n, "torch": m} (the train step on CUDA)
    ours_one_thread_samples: list[float] = field(default_factory=list)  # ours on one CPU thread (--thread-scaling)

    @property
    def ours_s(self):
        """Median seconds per call."""
        return statistics.median(self.ours_samples) if self.ours_samples else None

    @property
    def torch_s(self):
        return statistics.median(self.torch_samples)

    @property
    def spread(self):
        """The noisier side's interquartile range over its median: how far to trust the ratio."""

        def iqr_over_median(samples):
            q1, median, q3 = statistics.quantiles(samples, n=4, method="inclusive")
            return (q3 - q1) / median

        return max((iqr_over_median(s) for s in (self.ours_samples, self.torch_samples) if len(s) >= 2),
                   default=None)

    @property
    def thread_speedup(self):
        """Ours on one thread / ours on all of them (medians), where measured."""
        if not self.ours_one_thread_samples or not self.ours_s:
            return None
        return statistics.median(self.ours_one_thread_samples) / self.ours_s

    @property
    def ratio(self):
        return self.ours_s / self.torch_s if self.ours_s and self.torch_s else None

    @property
    def passed(self):
        """The speed target counts only for a correct result."""
        return self.check == "ok" and self.ratio is not None and self.ratio <= self.target

    def rate(self, seconds):
        """GFLOP/s or GB/s."""
        return self.work / seconds / 1e9 if self.work and seconds else None

    def pct_peak(self, seconds):
        return 100 * self.work / seconds / self.peak if self.work and seconds and self.peak else None

    def to_dict(self):
        return {**asdict(self), "ours_s": self.ours_s, "torch_s": self.torch_s, "spread": self.spread,
                "ratio": self.ratio, "passed": self.passed, "thread_speedup": self.thread_speedup,
                "ours_rate": self.rate(self.ours_s), "torch_rate": self.rate(self.torch_s),
                "ours_pct_peak": self.pct_peak(self.ours_s), "torch_pct_peak": self.pct_peak(self.torch_s)}


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(device):
    info = {
        "cpu": _cpu_model(),
        "cpu_isa": torch.backends.cpu.get_cpu_capability(),  # torch's (ATEN_CPU_CAPABILITY)
        "cnn_ext_cpu_isa": cnn_ext.cpu_capability(),  # ours: the same, unless the CPU lacks it
        "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "(default)"),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if device == "cuda":
        info.update(
            gpu=torch.cuda.get_device_name(),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
            matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
            cudnn_benchmark=torch.backends.cudnn.benchmark,
            cnn_ext_cuda_tile=os.environ.get("CNN_EXT_CUDA_TILE") or "64x64",  # our implicit GEMM's block tile
        )
    return info


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


_COLUMNS = (  # header, width, cell
    ("case", 19, lambda r: r.case),
    ("op", 20, lambda r: r.op),
    ("dtype", 8, lambda r: r.dtype),
    ("N", 4, lambda r: str(r.batch)),
    ("ours ms", 9, lambda r: _fmt(r.ours_s and r.ours_s * 1e3, ".3f")),
    ("torch ms", 9, lambda r: _fmt(r.torch_s and r.torch_s * 1e3, ".3f")),
    ("ours", 8, lambda r: _fmt(r.rate(r.ours_s), ".1f")),
    ("torch", 8, lambda r: _fmt(r.rate(r.torch_s), ".1f")),
    ("unit", 7, lambda r: r.unit or ""),
    ("ours%pk", 7, lambda r: _fmt(r.pct_peak(r.ours_s), ".1f")),
    ("torch%pk", 8, lambda r: _fmt(r.pct_peak(r.torch_s), ".1f")),
    ("±iqr", 5, lambda r: _fmt(r.spread and 100 * r.spread, ".0f") + "%"),
    ("thr×", 5, lambda r: _fmt(r.thread_speedup, ".2f")),
    ("ratio", 6, lambda r: _fmt(r.ratio, ".2f")),
    ("target", 6, lambda r: f"≤{r.target:.2f}"),
    ("speed", 5, lambda r: "PASS" if r.passed else "FAIL"),
    ("check", 0, lambda r: r.check),
)


def format_table(rows):
    lines = ["  ".join(h.ljust(w) if i < 3 else h.rjust(w) for i, (h, w, _) in enumerate(_COLUMNS)).rstrip()]
    for r in rows:
        cells = [cell(r) for _, _, cell in _COLUMNS]
        lines.append("  ".join(c.ljust(w) if i < 3 else c.rjust(w)
                               for i, (c, (_, w, _)) in enumerate(zip(cells, _COLUMNS))).rstrip())
    return "\n".join(lines)


def write_json(path, machine, config, rows):
    with open(path, "w") as f:
        json.dump({"machine": machine, "config": config, "rows": [r.to_dict() for r in rows]}, f, indent=2)


def write_plot(path, title, rows):
    """Bars from 1 to each row's time ratio ours / torch on a log axis (left of 1: ours is faster), coloured by
    verdict, with each row's target as a black tick."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter, LogLocator

    timed = [r for r in rows if r.ratio is not None]
    colours = {"meets target": "tab:green", "misses target": "tab:red", "wrong result": "tab:grey"}
    verdicts = ["wrong result" if r.check != "ok" else "meets target" if r.passed else "misses target" for r in timed]
    fig, ax = plt.subplots(figsize=(9, 1.5 + 0.28 * max(len(timed), 1)))
    y = range(len(timed))
    ax.barh(y, [r.ratio - 1 for r in timed], left=1, color=[colours[v] for v in verdicts])
    ax.scatter([r.target for r in timed], y, marker="|", s=200, color="black", zorder=3)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(list(y), [f"{r.case} {r.op} {r.dtype}" for r in timed], fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1, 2, 5)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    ax.set_xlabel("time ratio ours / torch (log; < 1: ours faster)   | = target")
    ax.set_title(title, fontsize=9)
    ax.legend(handles=[Patch(color=c, label=v) for v, c in colours.items()], loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
