"""One training run, in the order it happens: settings (recipes), data, the model with its optimizer and schedule
(restored from a checkpoint when resuming), then per epoch: train, evaluate, record (checkpoint, JSON log); at
the end the plot.

The data sit on the training device as one normalised tensor; each epoch slices batches from a permutation drawn
from a seeded generator whose state is checkpointed with the model, the optimizer and torch's RNG, so a resumed
run ends exactly where an uninterrupted one does. Under DDP every rank runs this with its rank and the world size:
each trains on its strided shard of the shared permutation, losses and accuracies are averaged over the ranks,
evaluation is sharded and summed, and rank 0 alone writes files.
"""

import hashlib
import json
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from .. import functional
from .checkpoints import load_checkpoint, restore, save_checkpoint, snapshot
from .data import DataError, load_mnist, write_atomically
from .models import build_model
from .recipes import describe, make_optimizer, make_scheduler, resolve_settings
from .steps import EagerStep, GraphedStep
from .summary import format_summary, summarize

try:
    from tqdm import tqdm
except ImportError:  # tqdm is a dependency, but a machine given torch alone (a GPU box, offline) still trains
    import contextlib

    class tqdm(contextlib.nullcontext):  # noqa: N801 - a silent stand-in for tqdm's progress bar
        def __init__(self, *args, **kwargs):
            super().__init__(self)

        def update(self, n):
            pass

        def set_postfix(self, **kwargs):
            pass

__all__ = ["Training", "evaluate", "run", "steps_per_epoch", "train_epoch"]

EVAL_BATCH = 1000


@dataclass
class Training:
    """What a run trains: the model, `net` (the model or its DistributedDataParallel wrapper, what the step runs),
    the optimizer and lr schedule, the batch order's generator, the metrics so far, and the step."""
    model: torch.nn.Module
    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    per_batch: bool  # the scheduler steps after every batch (one-cycle), else after every epoch
    generator: torch.Generator
    capturable_on: torch.device | None  # the device, when the step is a CUDA graph
    history: dict
    step: object = None  # EagerStep or GraphedStep


def run(parser, args, device, rank=0, world_size=1):
    """The run `args` asks for; returns the last epoch's metrics, or None when a resumed run had nothing left."""
    checkpoint = load_checkpoint(args.checkpoint) if args.resume else None
    settings = resolve_settings(parser, args, checkpoint, world_size)
    done = checkpoint["epoch"] if checkpoint else 0
    if done >= args.epochs:
        print(f"{args.checkpoint} already holds {done} epochs (--epochs {args.epochs}); nothing to do")
        return None

    check_backend(args.backend, device)
    data = load_data(args, settings, device, rank, world_size)
    training = set_up(settings, args, device, data, checkpoint, rank, world_size)
    if checkpoint:
        print(f"Resuming {args.checkpoint} after epoch {done} with its settings: {settings}")
    print(f"Model {settings['model']} ({type(training.model).__name__}), backend {args.backend}, device {device}; "
          + describe(settings)
          + (f"; {world_size} processes (DDP, {dist.get_backend()}), batch {settings['batch_size']} each"
             if world_size > 1 else "")
          + ("; CUDA graphs" if args.cuda_graphs else ""))
    print(format_summary(summarize(training.model, device=device),
                         sum(p.numel() for p in training.model.parameters())))

    metrics = None
    for epoch in range(done, args.epochs):
        metrics = train_and_evaluate(training, data, settings["batch_size"], epoch, args.epochs, rank, world_size)
        record(training, settings, args, data, device, epoch + 1, rank, world_size)
    if args.plot and rank == 0:
        from .visualize import write_training_curves  # matplotlib, only when asked for

        write_training_curves(args.plot, training.history)
        print(f"Wrote {args.plot}")
    return metrics


def check_backend(backend, device):
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


def load_data(args, settings, device, rank=0, world_size=1):
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


def set_up(settings, args, device, data, checkpoint=None, rank=0, world_size=1):
    """The model (same initial weights on every rank), optimizer, schedule and batch-order generator, restored from
    the checkpoint when resuming, and the training step (eager, DDP-wrapped, or a CUDA graph)."""
    torch.manual_seed(settings["seed"])  # the same initial weights on every rank
    model = build_model(settings["model"], args.backend).to(device)
    capturable_on = device if args.cuda_graphs else None
    optimizer = make_optimizer(settings, model.parameters(), capturable_on)
    scheduler = make_scheduler(settings, optimizer,
                               steps_per_epoch(len(data.train_labels), settings["batch_size"], world_size))
    generator = torch.Generator().manual_seed(settings["seed"])  # CPU-side: batch order is device-independent
    if world_size > 1:
        torch.manual_seed(settings["seed"] + rank)  # dropout: each rank its own stream
    training = Training(model=model, net=model, optimizer=optimizer, scheduler=scheduler,
                        per_batch=settings["schedule"] == "onecycle", generator=generator,
                        capturable_on=capturable_on, history={"epochs": [], "steps": []})
    if checkpoint:
        restore(training, checkpoint, device, rank, world_size)
    if world_size > 1:
        training.net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.cuda_graphs:
        training.step = GraphedStep(training.net, optimizer, settings["batch_size"], data.train_images,
                                    data.train_labels, settings["label_smoothing"])
    else:
        training.step = EagerStep(training.net, optimizer, settings["label_smoothing"])
    return training


def steps_per_epoch(n_train, batch_size, world_size=1):
    """Batches in each epoch of train_epoch (per rank)."""
    return -(-(n_train // world_size) // batch_size)


def train_and_evaluate(training, data, batch_size, epoch, epochs, rank=0, world_size=1):
    """Epoch number `epoch` (from 0): trains it, steps the schedule, evaluates on the test set, prints a line and
    appends its metrics (returned) and per-batch losses and accuracies to the history."""
    epoch_start = time.perf_counter()
    lr = float(training.optimizer.param_groups[0]["lr"])
    losses, accuracies, images_per_s = train_epoch(
        training.net, training.step, data.train_images, data.train_labels, batch_size, training.generator,
        desc=f"epoch {epoch + 1}/{epochs}", rank=rank, world_size=world_size,
        after_batch=training.scheduler.step if training.per_batch else None)
    if not training.per_batch:
        training.scheduler.step()
    if world_size > 1:
        # DDP keeps parameters equal; buffers (batch-norm statistics) are rank 0's from each forward, then
        # updated locally: make them rank 0's, so evaluation and checkpoints see one model.
        for buffer in training.model.buffers():
            dist.broadcast(buffer, src=0)
    test_loss, correct = evaluate(training.model, data.test_images, data.test_labels, rank, world_size)
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
    training.history["epochs"].append(metrics)
    training.history["steps"] += [{"epoch": epoch + (i + 1) / len(losses), "loss": loss, "accuracy": acc}
                                  for i, (loss, acc) in enumerate(zip(losses, accuracies))]
    print(f"epoch {epoch + 1}/{epochs}: test loss {test_loss:.4f}, accuracy {metrics['test_accuracy']:.2f}% "
          f"({correct}/{n_test}), {metrics['time_s']:.1f} s ({images_per_s:,.0f} img/s training)")
    return metrics


def train_epoch(model, step, images, labels, batch_size, generator, desc, rank=0, world_size=1, after_batch=None):
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


def evaluate(model, images, labels, rank=0, world_size=1):
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


def record(training, settings, args, data, device, epochs_done, rank=0, world_size=1):
    """After an epoch: under DDP, checks that the ranks' models agree and gathers their RNG states (every rank
    takes part); then rank 0 writes the checkpoint and the JSON log, each atomically."""
    rank_digests = rank_rng = None
    if world_size > 1:
        rank_digests = [None] * world_size
        dist.all_gather_object(rank_digests, state_digest(training.model))
        if len(set(rank_digests)) != 1:
            print(f"warning: the ranks' models differ after epoch {epochs_done}: {rank_digests}")
        if args.checkpoint:  # every rank's RNG, so a resumed run's dropout continues exactly
            rank_rng = [None] * world_size
            dist.all_gather_object(rank_rng, (torch.get_rng_state(), torch.cuda.get_rng_state(device)
                                              if device.type == "cuda" else []))
    if rank != 0:
        return
    if args.checkpoint:
        save_checkpoint(args.checkpoint, snapshot(training, epochs_done, settings, device, rank_rng))
    if args.log_json:
        log = {"settings": settings, "backend": args.backend, "device": str(device), "data": data.source,
               "cuda_graphs": args.cuda_graphs, **training.history}
        if rank_digests is not None:
            log["rank_state_sha256"] = rank_digests  # the ranks' final models: all equal
        write_atomically(args.log_json, json.dumps(log, indent=1).encode())


def state_digest(model):
    """SHA-256 of a model's state_dict (names, dtypes, shapes and values): equal on every rank of a correct run."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
