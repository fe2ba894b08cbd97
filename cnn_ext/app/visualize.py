"""Pictures of what a trained model learned: `python -m cnn_ext.visualize --checkpoint PATH --out DIR`, and of how
it learned: the training curves of `python -m cnn_ext.train --plot PATH`.

The command writes filters.png (the first convolution's kernels) and one feature_maps_<layer>.png per convolution
(its output channels for a few test digits). Figures are rendered with matplotlib's Agg backend, so no display is
needed.
"""

import argparse
import io
import os

import torch
from matplotlib.figure import Figure  # a bare Figure renders with Agg, never touching a GUI or pyplot state

from .checkpoints import load_checkpoint
from .data import DataError, ensure_mnist, normalize, read_split, write_atomically
from .models import BACKENDS, build_model

__all__ = ["main", "write_training_curves"]

MAX_CHANNELS = 16  # columns per feature-map figure; deeper layers show their first 16 channels


def _save_png(fig, path):
    """Renders `fig` and writes it atomically: an interrupted run never leaves a truncated PNG."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    write_atomically(path, buffer.getvalue())


def _parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m cnn_ext.visualize",
                                description="Draw a trained model's first-layer filters and its convolutions' "
                                            "feature maps for a few test digits.")
    p.add_argument("--checkpoint", metavar="PATH", required=True, help="a checkpoint written by cnn_ext.train")
    p.add_argument("--out", metavar="DIR", required=True, help="folder for the PNGs (created if missing)")
    p.add_argument("--digits", type=int, default=4, help="how many test digits to show (default: 4)")
    p.add_argument("--backend", choices=BACKENDS, default="ext", help="layers to run the model on (default: ext)")
    p.add_argument("--data-dir", default="./data", help="MNIST in torchvision's layout (default: ./data)")
    args = p.parse_args(argv)
    if not 1 <= args.digits <= 32:
        p.error(f"--digits must be between 1 and 32, got {args.digits}")
    if not os.path.isfile(args.checkpoint):
        p.error(f"--checkpoint {args.checkpoint} does not exist")
    return args


def _conv_outputs(model, images):
    """{layer name: output} of every Conv2d for `images`, in execution order, and the model's predictions."""
    outputs, hooks = {}, []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Conv2d):
            hooks.append(module.register_forward_hook(
                lambda module, inputs, output, name=name: outputs.__setitem__(name, output)))
    try:
        with torch.no_grad():
            predictions = model(images).argmax(1)
    finally:
        for h in hooks:
            h.remove()
    return outputs, predictions


def _draw_filters(weight, title, path):
    """One panel per output channel (input channels side by side), on one colour scale centred on zero so the
    panels compare: red excites, blue inhibits."""
    k_out, k_in = weight.shape[:2]
    cols = min(k_out, 8)
    rows = -(-k_out // cols)
    limit = weight.abs().max().item()
    fig = Figure(figsize=(1.3 * cols * k_in, 1.4 * rows + 0.6), layout="constrained")
    fig.suptitle(title)
    axes = fig.subplots(rows, cols * k_in, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for o in range(k_out):
        for i in range(k_in):
            ax = axes[o // cols, (o % cols) * k_in + i]
            image = ax.imshow(weight[o, i].numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit)
            ax.set_title(f"{o}" if k_in == 1 else f"{o}/{i}", fontsize=8)
    fig.colorbar(image, ax=axes, shrink=0.8)
    _save_png(fig, path)


def _draw_feature_maps(name, maps, raw_images, labels, predictions, path):
    """A row per digit: the digit, then its first MAX_CHANNELS channels (each scaled to its own range, since
    what matters is where a channel responds, not how strongly compared with the others)."""
    n, channels = maps.shape[:2]
    shown = min(channels, MAX_CHANNELS)
    fig = Figure(figsize=(1.1 * (shown + 1), 1.2 * n + 0.6), layout="constrained")
    fig.suptitle(f"{name}: {shown} of {channels} channels, {tuple(maps.shape[2:])} each")
    axes = fig.subplots(n, shown + 1, squeeze=False)
    for row in range(n):
        axes[row, 0].imshow(raw_images[row].numpy(), cmap="gray")
        axes[row, 0].set_title(f"{labels[row]} (pred {predictions[row]})", fontsize=8)
        for c in range(shown):
            axes[row, c + 1].imshow(maps[row, c].numpy(), cmap="viridis")
            if row == 0:
                axes[row, c + 1].set_title(f"ch {c}", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    _save_png(fig, path)


def write_training_curves(path, history):
    """A PNG of a run's history (loop.Training.history): training loss/accuracy per batch (smoothed) and test
    loss/accuracy per epoch, against epochs; written atomically."""
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
    _save_png(fig, path)


def main(argv=None):
    """Run the CLI; returns the paths written."""
    args = _parse_args(argv)
    checkpoint = load_checkpoint(args.checkpoint)
    model = build_model(checkpoint["settings"]["model"], args.backend)
    model.load_state_dict(checkpoint["model"])
    model.eval()
    try:
        ensure_mnist(args.data_dir)
        raw_images, labels = read_split(args.data_dir, "test")
    except DataError as e:
        raise SystemExit(f"error: {e}") from None
    raw_images, labels = raw_images[:args.digits], labels[:args.digits].tolist()

    outputs, predictions = _conv_outputs(model, normalize(raw_images))
    os.makedirs(args.out, exist_ok=True)
    first_name, first = next((n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d))
    paths = [os.path.join(args.out, "filters.png")]
    _draw_filters(first.weight.detach(), f"{first_name}: {first.out_channels} learned "
                  f"{first.kernel_size[0]}x{first.kernel_size[1]} filters", paths[0])
    for name, maps in outputs.items():
        paths.append(os.path.join(args.out, f"feature_maps_{name.replace('.', '_')}.png"))
        _draw_feature_maps(name, maps, raw_images, labels, predictions.tolist(), paths[-1])
    for path in paths:
        print(f"Wrote {path}")
    return paths


if __name__ == "__main__":
    main()
