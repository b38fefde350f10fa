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
    return ops.assign(average, average * factor + weight * (1 - factor))


class WeightAverage:
    """average <- d * average + (1 - d) * weights after every optimizer step, over every
    parameter of the network (batch-norm statistics too, as timm's ModelEmaV2 does), with
    d = min(decay, n / (n + 1)) at the n-th update (from 0): the plain mean of every step's
    weights until 1 / (1 - decay) steps, an exponential average after, so the initial weights
    never linger and a short run averages as long a window as a long one. `network()` is a
    second network of the same architecture holding the average, to validate, save and
    explain like any model."""

    def __init__(self, net: nn.Cell, twin: nn.Cell, decay: float) -> None:
        self.decay = float(decay)
        self.weights = ParameterTuple(net.get_parameters())
        self.average = self.weights.clone(prefix=PREFIX, init="same")
        self.twin = twin
        hyper_map = ops.HyperMap()

        @ms.jit
        def update(factor):
            return hyper_map(ops.partial(_blend, factor), self.average, self.weights)

        self._update = update

    def factor(self, updates: int) -> float:
        return min(self.decay, updates / (updates + 1))

    def update(self, updates: int) -> None:
        """Fold in the weights after the optimizer's `updates`-th step (counted from 0)."""
        self._update(ms.Tensor(self.factor(updates), ms.float32))

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
