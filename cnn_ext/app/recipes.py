"""What a run trains with: each model's recipe, the settings a run fixes (from the options, the recipe, or a resumed
run's checkpoint), and the optimizer and learning-rate schedule built from them."""

import torch

__all__ = ["OPTIMIZERS", "RECIPES", "RUN_SETTINGS", "SCHEDULES", "SETTING_DEFAULTS", "describe", "make_optimizer",
           "make_scheduler", "place_optimizer_state", "resolve_settings"]

# Each model's optimiser settings, used for any of them not given on the command line. The seed's are the
# notebook's. The fast model's and the deep model's were chosen by their first epoch's test accuracy on 2 CPU
# cores (cnn_ext.app.models: FastMNIST and DeepMNIST say what else was tried).
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


def resolve_settings(parser, args, checkpoint, world_size=1):
    """The run's settings: a resumed run's come from its checkpoint (options given again must agree with it);
    a new run's from the options, falling back to the model's recipe and the seed's defaults. A distributed run's
    also hold its number of processes (it decides the shards), which a resumed run must keep. Conflicts are usage
    errors (parser.error)."""
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


def describe(settings):
    """The recipe in one line: 'sgd lr 0.01 momentum 0.5, batch 128, seed 0'."""
    return (f"{settings['optimizer']} lr {settings['lr']}"
            + (f" momentum {settings['momentum']}" if settings["optimizer"] == "sgd" else "")
            + (f" betas {tuple(settings['betas'])}" if settings["betas"] else "")
            + (f" decay x{settings['lr_decay']}/epoch" if settings["lr_decay"] != 1 else "")
            + (f" one-cycle over {settings['cycle_epochs']} epoch(s)" if settings["schedule"] == "onecycle" else "")
            + (f", label smoothing {settings['label_smoothing']}" if settings["label_smoothing"] else "")
            + f", batch {settings['batch_size']}, seed {settings['seed']}")


def make_optimizer(settings, params, capturable_on=None):
    """The run's optimizer. capturable_on (for CUDA graphs: the device) keeps Adam's step counts and its learning
    rate on the device, so that a captured step reads the lr each scheduler step writes there (a Python float would
    be frozen into the graph). SGD has no such option and needs none for a constant lr (its step never reads a value
    back to the host); resolve_settings refuses it a per-batch schedule under graphs."""
    if settings["optimizer"] == "sgd":
        return torch.optim.SGD(params, lr=settings["lr"], momentum=settings["momentum"])
    optimizer = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[settings["optimizer"]]
    extra = {"betas": tuple(settings["betas"])} if settings["betas"] else {}
    if capturable_on is not None:
        return optimizer(params, lr=torch.tensor(settings["lr"], device=capturable_on), capturable=True, **extra)
    # fused: one kernel for all parameters instead of about ten small ops per tensor (a seventh of the fast model's
    # CPU step).
    return optimizer(params, lr=settings["lr"], fused=True, **extra)


def place_optimizer_state(optimizer, capturable_on=None):
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


def make_scheduler(settings, optimizer, steps_per_epoch):
    """The run's lr schedule (SCHEDULES): one-cycle steps after every batch, the epoch decay after every epoch."""
    if settings["schedule"] == "onecycle":
        # No momentum cycling: Adam's betas are Python floats, which a captured step would freeze.
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=settings["lr"], cycle_momentum=False,
                                                   total_steps=settings["cycle_epochs"] * steps_per_epoch)
    return torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=settings["lr_decay"])
