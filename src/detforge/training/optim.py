"""The optimizers behind ``optimizer=``, with the update rules of MXNet, SageMaker's engine.

``build_optimizer(params, hp)`` returns a torch optimizer that takes the same step as MXNet's optimizer
of that name with SageMaker's hyperparameters (``learning_rate``, ``momentum``, ``weight_decay``) and
MXNet's defaults for the rest. SageMaker documents ``momentum`` for ``sgd`` only and ``weight_decay`` for
``sgd`` and ``rmsprop`` only; the other optimizers ignore them, as SageMaker does.

==========  ===================================================================================
sgd         ``mom = momentum * mom + (g + wd * w); w -= lr * mom`` (torch ``SGD``; MXNet keeps
            ``-lr * ...`` in its momentum, the same step while ``lr`` is constant)
adam        MXNet ``Adam``: beta1 0.9, beta2 0.999, epsilon 1e-8, bias-corrected (torch ``Adam``);
            no weight decay
rmsprop     MXNet ``RMSProp`` (not centered): gamma1 0.9, epsilon 1e-8 *inside* the square root:
            ``g += wd * w; n = 0.9 * n + 0.1 * g^2; w -= lr * g / sqrt(n + 1e-8)`` (``MXNetRMSProp``;
            torch's ``RMSprop`` has alpha 0.99 and adds epsilon outside the root)
adamw       not SageMaker's: a detforge addition for the ``gfl`` recipe (torch ``AdamW``, decoupled weight
            decay ``weight_decay``, Adam's MXNet betas and epsilon)
adadelta    MXNet ``AdaDelta``: rho 0.9, epsilon 1e-5, and **no learning rate**:
            ``a_g = 0.9 a_g + 0.1 g^2; d = sqrt(a_d + 1e-5) / sqrt(a_g + 1e-5) * g;
            a_d = 0.9 a_d + 0.1 d^2; w -= d`` (torch ``Adadelta`` at lr 1, never scheduled:
            ``IGNORES_LEARNING_RATE``); no weight decay
==========  ===================================================================================

``lr_multiplier`` is the learning-rate factor of a step; ``build_scheduler(optimizer, hp, *,
steps_per_epoch, budget)`` steps it per optimizer step (torch ``LambdaLR`` over ``LRSchedule.factor``),
over the epochs the time budget plans now (``recipe.Budget.planned``).
"""

from __future__ import annotations

from detforge.training import recipe
from detforge.training.hyperparams import Hyperparameters

# MXNet's defaults (mxnet.optimizer, 1.x) for what SageMaker does not expose.
ADAM_BETAS = (0.9, 0.999)
ADAM_EPSILON = 1e-8
RMSPROP_GAMMA1 = 0.9
RMSPROP_EPSILON = 1e-8
ADADELTA_RHO = 0.9
ADADELTA_EPSILON = 1e-5
# Optimizers whose SageMaker hyperparameters include weight_decay / momentum.
USES_WEIGHT_DECAY = ("sgd", "rmsprop", "adamw")
USES_MOMENTUM = ("sgd",)
# MXNet's AdaDelta has no learning rate: learning_rate, warm-up and lr_scheduler_* do not apply.
IGNORES_LEARNING_RATE = ("adadelta",)


def ignored_hyperparameters(hp: Hyperparameters) -> list[str]:
    """Notes on the set hyperparameters that ``hp.optimizer`` ignores (as SageMaker does)."""
    notes = []
    if hp.optimizer not in USES_WEIGHT_DECAY and hp.weight_decay:
        notes.append(
            f"weight_decay={hp.weight_decay:g} is ignored: SageMaker applies it to sgd and rmsprop only"
        )
    if hp.optimizer in IGNORES_LEARNING_RATE:
        notes.append(
            f"learning_rate, warmup_epochs and lr_scheduler_* are ignored: MXNet's {hp.optimizer} "
            "has no learning rate"
        )
    return notes


def mxnet_rmsprop():
    """The ``MXNetRMSProp`` class (torch imported on first use)."""
    import torch

    class MXNetRMSProp(torch.optim.Optimizer):
        """MXNet's non-centered RMSProp: ``g += wd * w; n = gamma1 * n + (1 - gamma1) * g^2;
        w -= lr * g / sqrt(n + epsilon)``."""

        def __init__(
            self,
            params,
            *,
            lr: float,
            gamma1: float = RMSPROP_GAMMA1,
            epsilon: float = RMSPROP_EPSILON,
            weight_decay: float = 0.0,
        ) -> None:
            super().__init__(
                params, {"lr": lr, "gamma1": gamma1, "epsilon": epsilon, "weight_decay": weight_decay}
            )

        @torch.no_grad()
        def step(self, closure=None):
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    grad = p.grad
                    if group["weight_decay"]:
                        grad = grad.add(p, alpha=group["weight_decay"])
                    state = self.state[p]
                    if not state:
                        state["n"] = torch.zeros_like(p)
                    n = state["n"]
                    n.mul_(group["gamma1"]).addcmul_(grad, grad, value=1.0 - group["gamma1"])
                    p.addcdiv_(grad, n.add(group["epsilon"]).sqrt_(), value=-group["lr"])
            return loss

    return MXNetRMSProp


def build_optimizer(params, hp: Hyperparameters):
    """The optimizer named by ``hp.optimizer`` with MXNet's update rule (see the module docstring)."""
    import torch

    if hp.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=hp.learning_rate, momentum=hp.momentum, weight_decay=hp.weight_decay
        )
    if hp.optimizer == "adam":
        return torch.optim.Adam(params, lr=hp.learning_rate, betas=ADAM_BETAS, eps=ADAM_EPSILON)
    if hp.optimizer == "adamw":
        return torch.optim.AdamW(
            params, lr=hp.learning_rate, betas=ADAM_BETAS, eps=ADAM_EPSILON, weight_decay=hp.weight_decay
        )
    if hp.optimizer == "rmsprop":
        return mxnet_rmsprop()(params, lr=hp.learning_rate, weight_decay=hp.weight_decay)
    if hp.optimizer == "adadelta":
        return torch.optim.Adadelta(params, lr=1.0, rho=ADADELTA_RHO, eps=ADADELTA_EPSILON)
    raise ValueError(f"unknown optimizer {hp.optimizer!r}")


def lr_multiplier(
    step: int, *, steps_per_epoch: int, hp: Hyperparameters, epochs: int | None = None
) -> float:
    """Learning-rate factor at optimizer step ``step`` (0-based): linear warm-up, then x factor per lr step
    (``lr_schedule=step``) or a cosine over ``epochs`` (default ``hp.epochs``; ``lr_schedule=cosine``);
    1 for an optimizer without a learning rate (MXNet's adadelta)."""
    if hp.optimizer in IGNORES_LEARNING_RATE:
        return 1.0
    return recipe.lr_factor(
        step,
        steps_per_epoch=steps_per_epoch,
        epochs=epochs or hp.epochs,
        warmup_epochs=hp.warmup_epochs,
        schedule=hp.lr_schedule,
        steps=hp.lr_scheduler_step,
        step_factor=hp.lr_scheduler_factor,
        min_factor=hp.lr_min_factor,
    )


class LRSchedule:
    """The factor of each optimizer step: ``lr_multiplier`` over ``budget.planned`` epochs, read at every
    step, so a budget that shortens the run bends the cosine with it."""

    def __init__(self, hp: Hyperparameters, *, steps_per_epoch: int, budget: recipe.Budget) -> None:
        self.hp, self.steps_per_epoch, self.budget = hp, steps_per_epoch, budget

    def factor(self, step: int) -> float:
        """The learning-rate factor at optimizer step ``step`` (0-based)."""
        return lr_multiplier(
            step, steps_per_epoch=self.steps_per_epoch, hp=self.hp, epochs=self.budget.planned
        )


def build_scheduler(optimizer, hp: Hyperparameters, *, steps_per_epoch: int, budget: recipe.Budget):
    """torch ``LambdaLR`` stepping ``LRSchedule`` per optimizer step (its state: the step count only)."""
    import torch

    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, LRSchedule(hp, steps_per_epoch=steps_per_epoch, budget=budget).factor
    )
