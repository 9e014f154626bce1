"""Each optimizer takes MXNet's step (SageMaker's engine): one update of a known weight with a known
gradient, against the update rule computed by hand; adadelta ignores learning_rate and the schedule,
weight_decay applies to sgd and rmsprop only."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from detforge.training.hyperparams import parse_hyperparameters  # noqa: E402
from detforge.training.optim import build_optimizer, ignored_hyperparameters  # noqa: E402
from detforge.training.train import lr_multiplier  # noqa: E402

W = [1.0, -2.0]
G = [0.5, 0.001]


def one_step(optimizer: str, steps: int = 1, **hyperparameters) -> list[float]:
    hp = parse_hyperparameters({"num_classes": 1, "optimizer": optimizer, **hyperparameters})
    weight = torch.nn.Parameter(torch.tensor(W, dtype=torch.float64))
    opt = build_optimizer([weight], hp)
    for _ in range(steps):
        weight.grad = torch.tensor(G, dtype=torch.float64)
        opt.step()
    return weight.detach().tolist()


def test_sgd_momentum_and_weight_decay():
    lr, wd, mom = 0.1, 0.01, 0.9
    # step 1: m = g + wd*w; step 2: m = 0.9 m + (g + wd*w1); w -= lr*m
    w1 = [w - lr * (g + wd * w) for w, g in zip(W, G, strict=True)]
    m1 = [g + wd * w for w, g in zip(W, G, strict=True)]
    w2 = [w - lr * (mom * m + g + wd * w) for w, m, g in zip(w1, m1, G, strict=True)]
    assert one_step("sgd", learning_rate=lr, weight_decay=wd, momentum=mom) == pytest.approx(w1, abs=1e-12)
    assert one_step("sgd", 2, learning_rate=lr, weight_decay=wd, momentum=mom) == pytest.approx(w2, abs=1e-12)


def test_adam_first_step_and_no_weight_decay():
    # bias-corrected first step: m = 0.1 g / 0.1 = g, v = 0.001 g^2 / 0.001 = g^2: w -= lr * g / (|g| + 1e-8)
    lr = 0.01
    expected = [w - lr * g / (abs(g) + 1e-8) for w, g in zip(W, G, strict=True)]
    assert one_step("adam", learning_rate=lr, weight_decay=0.5) == pytest.approx(expected, abs=1e-12)
    assert one_step("adam", learning_rate=lr, weight_decay=0.0) == pytest.approx(expected, abs=1e-12)


def test_rmsprop_is_mxnets():
    lr, wd = 0.01, 0.1
    expected = []
    for w, g in zip(W, G, strict=True):
        g = g + wd * w
        n = 0.1 * g * g  # gamma1 0.9
        expected.append(w - lr * g / math.sqrt(n + 1e-8))  # epsilon inside the root
    assert one_step("rmsprop", learning_rate=lr, weight_decay=wd) == pytest.approx(expected, abs=1e-12)
    # [1 - 0.01*0.6/sqrt(0.036+1e-8), -2 - 0.01*(-0.199)/sqrt(0.0039601+1e-8)]
    assert expected == pytest.approx([0.9683772, -1.9683774], abs=1e-6)


def test_adadelta_ignores_the_learning_rate_and_weight_decay():
    expected = []
    for w, g in zip(W, G, strict=True):
        acc_g = 0.1 * g * g  # rho 0.9
        delta = math.sqrt(0.0 + 1e-5) / math.sqrt(acc_g + 1e-5) * g  # epsilon 1e-5
        expected.append(w - delta)
    assert one_step("adadelta", learning_rate=0.001) == pytest.approx(expected, abs=1e-12)
    assert one_step("adadelta", learning_rate=0.5, weight_decay=0.1) == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(
        [1 - 0.5 * math.sqrt(1e-5 / (0.025 + 1e-5)), -2 - 0.001 * math.sqrt(1e-5 / (1e-7 + 1e-5))], abs=1e-12
    )
    hp = parse_hyperparameters(
        {
            "num_classes": 1,
            "optimizer": "adadelta",
            "warmup_epochs": "1",
            "lr_scheduler_step": "1",
            "learning_rate": "0.001",
        }
    )
    assert [lr_multiplier(s, steps_per_epoch=4, hp=hp) for s in (0, 3, 8)] == [1.0, 1.0, 1.0]
    assert ignored_hyperparameters(hp) == [
        "weight_decay=0.0005 is ignored: SageMaker applies it to sgd and rmsprop only",
        "learning_rate, warmup_epochs and lr_scheduler_* are ignored: MXNet's adadelta has no learning rate",
    ]
    sgd = parse_hyperparameters({"num_classes": 1, "optimizer": "sgd"})
    assert ignored_hyperparameters(sgd) == []
    # detforge's adamw (not SageMaker's) decays weights, decoupled
    adamw = parse_hyperparameters({"num_classes": 1, "optimizer": "adamw", "weight_decay": "0.05"})
    assert ignored_hyperparameters(adamw) == []
