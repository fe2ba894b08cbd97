"""One optimisation step on a batch: eagerly, or replayed as a CUDA graph (--cuda-graphs). Both return the batch's
(loss, number correct), left on the device."""

import torch
import torch.nn.functional as F

__all__ = ["EagerStep", "GraphedStep"]


class EagerStep:
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


class GraphedStep:
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
        self.eager = EagerStep(model, optimizer, label_smoothing)
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
