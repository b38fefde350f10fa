"""The optimisation step: optimizer, mixed precision and loss scaling, and the compiled
train step the loop runs (xray.bench and xray.doctor time this same step)."""
from __future__ import annotations

import os
import tempfile
from typing import Optional

import mindspore as ms
import numpy as np
from mindspore import nn
from omegaconf import DictConfig

from xray.distributed import Group, grad_reducer, mean_over_ranks
from xray.errors import XrayError
from xray.model import dropout_masks
from xray.registry import create_loss, create_model


def build_optimizer(net: nn.Cell, cfg: DictConfig, lr: np.ndarray) -> nn.Momentum:
    """nn.Momentum with weight decay on weights only (biases are not decayed)."""
    params = net.trainable_params()
    weights = [p for p in params if p.name.endswith("weight")]
    others = [p for p in params if not p.name.endswith("weight")]
    groups = [{"params": weights, "weight_decay": cfg.optim.weight_decay},
              {"params": others, "weight_decay": 0.0},
              {"order_params": params}]
    # float(): a sweep value like momentum=0 arrives as an int, which nn.Momentum rejects
    return nn.Momentum(groups, learning_rate=ms.Tensor(lr), momentum=float(cfg.momentum),
                       use_nesterov=cfg.optim.nesterov)



def mixed_precision(net: nn.Cell, level: str) -> nn.Cell:
    """The network the training step runs: `net` itself for O0, else MindSpore's auto mixed
    precision of it (same Parameter objects, so the optimizer, the checkpoints and the
    evaluation keep using `net`)."""
    if level == "O0":
        return net
    # O1 rewrites the network's source into ./rewritten_network/ and imports it from there
    # (MindSpore's jit reads it again later): keep that out of the user's folder
    here = os.getcwd()
    os.chdir(tempfile.mkdtemp(prefix="xray-amp-"))
    try:
        return ms.amp.auto_mixed_precision(net, level)
    finally:
        os.chdir(here)


def loss_scaler(level: str) -> Optional[ms.amp.DynamicLossScaler]:
    """Dynamic loss scaling for fp16 training (halved after an overflow, doubled after 1000
    clean steps), None in fp32."""
    if level == "O0":
        return None
    return ms.amp.DynamicLossScaler(scale_value=2.0 ** 16, scale_factor=2, scale_window=1000)


def current_scale(scaler: Optional[ms.amp.DynamicLossScaler]) -> float:
    return float(scaler.scale_value.asnumpy()) if scaler is not None else 0.0


def build_training(cfg: DictConfig, image_size: int, class_counts: list[int], lr: np.ndarray,
                   group: Group = Group()):
    """(net, loss_fn, optimizer, scaler, step): the network and the step the training loop runs,
    from the config (train.amp included); xray.bench and xray.doctor time this same step."""
    net = create_model(cfg.model, image_size, len(class_counts))
    loss_fn = create_loss(cfg.loss, len(class_counts), class_counts)
    optimizer = build_optimizer(net, cfg, lr)
    scaler = loss_scaler(cfg.train.amp)
    step = make_step(cfg, mixed_precision(net, cfg.train.amp), loss_fn, optimizer, scaler, group)
    return net, loss_fn, optimizer, scaler, step


def make_step(cfg: DictConfig, net: nn.Cell, loss_fn: nn.Cell, optimizer: nn.Cell,
              scaler: Optional[ms.amp.DynamicLossScaler] = None, group: Group = Group()):
    """step(x, y, global_step) -> loss: one optimizer step, with the step's dropout masks.
    With a loss scaler (mixed precision), a step whose gradients overflow is skipped and the
    scale lowered.

    Data-parallel: x, y are this rank's part of the global batch; the gradients (and the loss
    returned) are averaged over the ranks, so that a step equals a one-rank step on the global
    batch, and the dropout masks are this rank's rows of the global batch's masks."""
    reduce_grads = grad_reducer(optimizer.parameters, group)
    mean_loss = mean_over_ranks(group)
    if scaler is None:
        def forward(x, y, mask1, mask2):
            return loss_fn(net(x, mask1, mask2), y)

        grad_fn = ms.value_and_grad(forward, None, optimizer.parameters)

        def train_step(x, y, mask1, mask2):
            loss, grads = grad_fn(x, y, mask1, mask2)
            optimizer(reduce_grads(grads))
            return mean_loss(loss)
    else:
        def scaled_forward(x, y, mask1, mask2):
            loss = loss_fn(net(x, mask1, mask2).astype(ms.float32), y)
            return scaler.scale(loss), loss

        grad_fn = ms.value_and_grad(scaled_forward, None, optimizer.parameters, has_aux=True)

        def train_step(x, y, mask1, mask2):
            (_, loss), grads = grad_fn(x, y, mask1, mask2)
            grads = reduce_grads(grads)  # (an overflow on one rank is one on all)
            finite = ms.amp.all_finite(grads)
            if finite:
                optimizer(scaler.unscale(grads))
            scaler.adjust(finite)
            return mean_loss(loss)

    if cfg.mode == "graph":
        train_step = ms.jit(train_step)
    compiled = []

    def step(x, y, global_step: int):
        rows = group.slice(x.shape[0] * group.size)
        masks = [m[rows] for m in dropout_masks(float(cfg.model.dropout), x.shape[0] * group.size,
                                                 cfg.seed, global_step)]
        if compiled or scaler is None:
            return train_step(x, y, *(ms.Tensor(m) for m in masks))
        try:  # the first mixed-precision step tells whether this device runs the level
            loss = train_step(x, y, *(ms.Tensor(m) for m in masks))
        except (RuntimeError, TypeError, ValueError) as e:
            raise XrayError(f"train.amp={cfg.train.amp} does not run on {cfg.device_target} here "
                            f"({str(e).strip().splitlines()[0][:160]}); use train.amp=O0") from None
        compiled.append(True)
        return loss

    return step



def release_compiled() -> None:
    """Free the compiled steps of trainings that have ended, and the networks and optimizers
    they hold, for the next training in this process (a Hydra multirun's members, the tests).
    MindSpore 2.10 keeps every jit function in an lru_cache of its argument info
    (mindspore.graph.api._get_func_args_info_cached), so each closure's network and optimizer
    live on, and its graph executor holds their parameters: 0.4-0.7 GB per AlexNet training,
    until the process ends. Both are let go here (measured: flat memory over 4 trainings)."""
    import gc

    from mindspore.graph import api

    cached = getattr(api, "_get_func_args_info_cached", None)
    if cached is not None and hasattr(cached, "cache_clear"):
        cached.cache_clear()
    gc.collect()
    ms.ms_memory_recycle()
    gc.collect()
