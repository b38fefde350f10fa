"""An exponential moving average (EMA) of the weights over the training steps (train.ema_decay):
an ensemble's smoothing from one training. It is the model the run validates, keeps as
best.ckpt and evaluates; the raw weights go on training and are what last.ckpt resumes from,
beside the average."""
from __future__ import annotations

import mindspore as ms
from mindspore import ParameterTuple, nn, ops

PREFIX = "ema"  # its parameters in last.ckpt: ema.<the network's parameter name>

_blend = ops.MultitypeFuncGraph("blend")


@_blend.register("Tensor", "Tensor", "Tensor")
def _blend_one(factor, average, weight):
    return ops.assign_add(average, (weight - average) * (1 - factor))


class WeightAverage:
    """average <- d * average + (1 - d) * weights after every `every`-th optimizer step, over
    every parameter of the network (batch-norm statistics too, as timm's ModelEmaV2 does), with
    d = min(decay ** every, n / (n + 1)) with n = step // every: the plain mean of the
    weights seen until the window of 1 / (1 - decay) steps fills, an exponential average after,
    so the initial weights never linger and a short run averages as long a window as a long
    one. (An update reads and writes every parameter: 0.3 s for this AlexNet on 2 CPU cores,
    half a training step, hence `every`.) `network()` is a second network of the same
    architecture holding the average, to validate, save and explain like any model."""

    def __init__(self, net: nn.Cell, twin: nn.Cell, decay: float, every: int = 1) -> None:
        self.decay, self.every = float(decay), int(every)
        self.weights = ParameterTuple(net.get_parameters())
        self.average = self.weights.clone(prefix=PREFIX, init="same")
        self.twin = twin
        hyper_map = ops.HyperMap()

        @ms.jit
        def update(factor):
            return hyper_map(ops.partial(_blend, factor), self.average, self.weights)

        self._update = update

    def factor(self, updates: int) -> float:
        """d with n = `updates` (step // every)."""
        return min(self.decay ** self.every, updates / (updates + 1))

    def update(self, step: int) -> None:
        """After the optimizer's `step`-th step (counted from 0): fold in the weights on every
        `every`-th step, and on the first (so that a run shorter than `every` steps has one)."""
        if step == 0 or (step + 1) % self.every == 0:
            self._update(ms.Tensor(self.factor(step // self.every), ms.float32))

    def parameters(self) -> dict:
        """name -> Parameter of the average, as last.ckpt holds them (ema.<name>)."""
        return {p.name: p for p in self.average}

    def restore(self, saved: dict) -> list[str]:
        """Load the average from a last.ckpt's parameters; returns the names it lacks."""
        missing = [p.name for p in self.average if p.name not in saved]
        for p in self.average:
            if p.name in saved:
                p.set_data(ms.Tensor(saved[p.name].asnumpy()))
        return missing

    def network(self) -> nn.Cell:
        """The twin network, holding the average now (its parameters keep the network's names,
        so best.ckpt loads like any other)."""
        twins = {p.name: p for p in self.twin.get_parameters()}
        for p in self.average:
            twins[p.name[len(PREFIX) + 1:]].set_data(ms.Tensor(p.asnumpy()))
        return self.twin
