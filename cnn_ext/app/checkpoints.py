"""Checkpoints: everything a run needs to continue exactly where it stopped (model, optimizer, schedule, the batch
order's generator, torch's RNGs - every rank's under DDP - the history and the settings), written atomically after
every epoch, so an interrupted write never leaves a half-written file."""

import io

import torch

from .data import write_atomically
from .recipes import place_optimizer_state

__all__ = ["CHECKPOINT_FORMAT", "load_checkpoint", "restore", "save_checkpoint", "snapshot"]

CHECKPOINT_FORMAT = "cnn_ext.train/1"


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


def snapshot(training, epoch, settings, device, rank_rng=None):
    """The checkpoint of a run (a loop.Training) after `epoch` epochs; rank_rng: every rank's (CPU, CUDA) RNG
    states under DDP, so that a resumed run's dropout continues exactly on each of them."""
    state = {
        "format": CHECKPOINT_FORMAT,
        "epoch": epoch,
        "settings": settings,
        "model": training.model.state_dict(),
        "optimizer": training.optimizer.state_dict(),
        "scheduler": training.scheduler.state_dict(),
        "generator": training.generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if device.type == "cuda" else [],
        "history": training.history,
    }
    if rank_rng is not None:
        state["rank_rng"] = rank_rng
    return state


def save_checkpoint(path, state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_atomically(path, buffer.getvalue())


def restore(training, checkpoint, device, rank=0, world_size=1):
    """Puts a checkpoint's state into a freshly built run (a loop.Training, before its step is made): weights,
    optimizer and schedule, the batch order's generator, this rank's RNGs and the history."""
    training.model.load_state_dict(checkpoint["model"])
    training.optimizer.load_state_dict(checkpoint["optimizer"])
    place_optimizer_state(training.optimizer, training.capturable_on)
    training.scheduler.load_state_dict(checkpoint["scheduler"])
    training.generator.set_state(checkpoint["generator"])
    torch_rng, cuda_rng = checkpoint["torch_rng"], checkpoint["cuda_rng"]
    if world_size > 1:
        torch_rng, cuda_rng = checkpoint["rank_rng"][rank]
    torch.set_rng_state(torch_rng)
    if device.type == "cuda" and cuda_rng:
        if world_size > 1:
            torch.cuda.set_rng_state(cuda_rng, device)
        else:
            torch.cuda.set_rng_state_all(cuda_rng)
    training.history = checkpoint["history"]
