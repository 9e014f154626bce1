"""The small-data training recipe's moving parts, used by ``train`` for every detector.

- ``ModelEMA``: an exponential moving average of the weights (and BatchNorm statistics), updated after
  every optimizer step with decay ``min(ema_decay, (1 + n) / (10 + n))`` after ``n`` updates (the ramp of
  TensorFlow's ``ExponentialMovingAverage``, so short runs are not dominated by the random start). With
  ``ema_decay > 0`` the averaged model is the one validated and saved.
- ``lr_factor``: warm-up, then SageMaker's steps (``lr_schedule=step``) or a cosine from 1 to
  ``lr_min_factor`` over the planned epochs (``lr_schedule=cosine``).
- ``MultiScaleLoader``: wraps a training loader; each batch is resized to ``image_shape x s`` with ``s``
  drawn from ``[1 - multiscale, 1 + multiscale]`` and rounded to a multiple of 32 (the detector's largest
  stride), boxes scaled with it; the draw depends only on ``(seed, epoch, step)``.
- ``plan_epochs``: how many epochs fit in ``max_train_minutes`` given the mean epoch time so far;
  ``Budget``: that plan as the object a run keeps (``planned`` epochs, ``seconds`` spent), re-planned
  after every epoch; the learning-rate schedule (``optim.LRSchedule``) and mosaic's switch-off read
  ``budget.planned``.

Not here: mosaic (``mosaic``), the loop (``engine``/``train``).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass


class ModelEMA:
    """``ema = ModelEMA(model, decay)``; ``ema.update(model)`` after each step; ``ema.module`` to evaluate."""

    def __init__(self, model, decay: float, *, updates: int = 0) -> None:
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = float(decay)
        self.updates = int(updates)

    def current_decay(self) -> float:
        """The decay the next update uses."""
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    def update(self, model) -> None:
        """Move the average towards ``model``'s weights and buffers."""
        import torch

        d = self.current_decay()
        self.updates += 1
        with torch.no_grad():
            live = model.state_dict()
            for name, value in self.module.state_dict().items():
                if value.dtype.is_floating_point:
                    value.mul_(d).add_(live[name].detach().to(value.dtype), alpha=1 - d)
                else:
                    value.copy_(live[name])

    def state_dict(self) -> dict:
        """Averaged weights and the update count (for the resume state)."""
        return {"model": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["model"])
        self.updates = int(state["updates"])


def lr_factor(
    step: int,
    *,
    steps_per_epoch: int,
    epochs: float,
    warmup_epochs: float,
    schedule: str,
    steps: tuple[int, ...] = (),
    step_factor: float = 0.1,
    min_factor: float = 0.01,
) -> float:
    """Learning-rate factor at optimizer step ``step`` (0-based) of a run planned for ``epochs``."""
    epoch = step / max(steps_per_epoch, 1)
    if schedule == "cosine":
        progress = min(1.0, epoch / max(epochs, 1e-9))
        factor = min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * progress))
    else:
        factor = step_factor ** sum(1 for s in steps if epoch >= s)
    warmup_steps = warmup_epochs * steps_per_epoch
    if warmup_steps > 0 and step < warmup_steps:
        factor *= (step + 1) / warmup_steps
    return factor


def plan_epochs(*, epochs: int, done: int, seconds_so_far: float, budget_minutes: float) -> int:
    """Epochs to run in all: ``epochs``, or fewer when the mean epoch so far says the budget ends sooner
    (the nearest whole number of epochs: a run ends within half an epoch of its budget)."""
    if budget_minutes <= 0 or done < 1:
        return epochs
    per_epoch = seconds_so_far / done
    return max(done, min(epochs, int(budget_minutes * 60 / max(per_epoch, 1e-9) + 0.5)))


@dataclass
class Budget:
    """``max_train_minutes`` (``minutes``; 0: none) as a plan: ``planned`` of ``epochs`` epochs, re-planned
    from the mean epoch time (validation included) after each epoch; ``seconds`` trained so far."""

    epochs: int
    minutes: float = 0.0
    seconds: float = 0.0
    planned: int = 0  # 0: all ``epochs``

    def __post_init__(self) -> None:
        self.planned = self.planned or self.epochs

    @property
    def limited(self) -> bool:
        """True when a time budget is set."""
        return self.minutes > 0

    def _plan(self, done: int, seconds: float) -> int:
        return plan_epochs(epochs=self.epochs, done=done, seconds_so_far=seconds, budget_minutes=self.minutes)

    def is_last(self, epoch: int, *, seconds_into_it: float) -> bool:
        """Whether ``epoch`` is the last the plan has room for, ``seconds_into_it`` seconds into it."""
        if epoch >= min(self.planned, self.epochs):
            return True
        return self.limited and self._plan(epoch, self.seconds + seconds_into_it) <= epoch

    def finish_epoch(self, epoch: int, seconds: float) -> None:
        """Count ``epoch``'s ``seconds`` and re-plan."""
        self.seconds += seconds
        if self.limited:
            self.planned = self._plan(epoch, self.seconds)

    def spent(self, epoch: int) -> bool:
        """Whether the budget ends the run after ``epoch`` (before its ``epochs``)."""
        return epoch >= self.planned and self.planned < self.epochs

    def state_dict(self) -> dict:
        """The plan for the resume state."""
        return {"epochs": self.planned, "seconds": self.seconds}

    def load_state_dict(self, state: dict, *, done: int) -> None:
        """Continue after ``done`` epochs; the plan is made afresh (``--set epochs=N`` may change it)."""
        self.seconds = float(state.get("seconds", 0.0))
        self.planned = self._plan(done, self.seconds)


def multiscale_size(image_size: int, multiscale: float, *, seed: int, epoch: int, step: int) -> int:
    """The batch size in pixels for one step (a multiple of 32, at least 32)."""
    import torch

    low = max(32, math.ceil(image_size * (1 - multiscale) / 32) * 32)
    high = max(low, math.floor(image_size * (1 + multiscale) / 32) * 32)
    choices = list(range(low, high + 1, 32))
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch * 10_007 + step) % (2**63))
    return choices[int(torch.randint(len(choices), (1,), generator=g))]


class MultiScaleLoader:
    """A loader whose batches are resized together to a random multiple of 32 (see the module docstring)."""

    def __init__(self, loader, *, image_size: int, multiscale: float, seed: int) -> None:
        self.loader, self.image_size, self.multiscale, self.seed = loader, image_size, multiscale, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        import torch.nn.functional as F

        for step, (images, targets, indices) in enumerate(self.loader):
            size = multiscale_size(
                self.image_size, self.multiscale, seed=self.seed, epoch=self.epoch, step=step
            )
            resized, scaled = [], []
            for image, target in zip(images, targets, strict=True):
                height, width = image.shape[-2:]
                resized.append(
                    F.interpolate(image[None], size=(size, size), mode="bilinear", align_corners=False)[0]
                )
                factor = image.new_tensor([size / width, size / height] * 2)
                scaled.append({**target, "boxes": target["boxes"] * factor})
            yield resized, scaled, indices
