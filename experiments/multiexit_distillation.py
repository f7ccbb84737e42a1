"""Phuong & Lampert, "Distillation-Based Training for Multi-Exit Architectures" (ICCV 2019).

    python experiments/multiexit_distillation.py print_config
    python experiments/multiexit_distillation.py with quick                      # Fashion-MNIST, minutes on CPU
    python experiments/multiexit_distillation.py with quick distillation=False   # the CE baseline
    python experiments/multiexit_distillation.py                                 # the paper: CIFAR-100, 100 img/class

Defaults are the paper's CIFAR-100 recipe (reduced data: 100 train + 50 val images per class).
"""
from __future__ import annotations

from experiments.engine.hardware import resolve_device
from experiments.engine.pipeline import fit_and_record
from experiments.ingredients import data as data_ing
from experiments.ingredients import model as model_ing
from experiments.ingredients import optim as optim_ing
from experiments.ingredients import train as train_ing
from experiments.identity import TrackedExperiment
from experiments.tracking import run_cli
from experiments.validation import boolean, choice, merge_rules, number, optional, register_rules
from losses import ExitCrossEntropy, PhuongDistillationLoss
from losses.phuong import TEMPERATURE_MODES

NAME = "multiexit_distillation"

# drop_last: the reference drops the last incomplete batch (156 steps per epoch at 100 images per class).
data_ingredient = data_ing.data_ingredient(name="cifar100", n_per_class=150, val_size=5000, batch_size=64,
                                           drop_last=True)
model_ingredient = model_ing.model_ingredient("phuong_cifar")
optim_ingredient = optim_ing.optim_ingredient(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4,
                                              schedule="multistep", milestones=[150, 225], gamma=0.1)
train_ingredient = train_ing.train_ingredient(epochs=300)
ex = TrackedExperiment(NAME, ingredients=[data_ingredient, model_ingredient, optim_ingredient, train_ingredient])

# The quick recipes' 5-exit MSDNet (over the phuong_cifar knobs): 18.4 MMACs at 28x28, 0.29 M parameters.
QUICK_MSDNET = dict(n_blocks=5, base=2, step=2, n_channels=6, growth_rate=6, bn_factor=[2, 2, 2], head_width=32)


@ex.config
def config():
    distillation = True  # Phuong & Lampert's loss; False trains with the plain sum of exit cross-entropies
    c = 0.5  # weight C of the distillation term: (1-C) CE + C T^2 soft CE
    temperature = "adaptive"  # adaptive (raise T while the teacher is over-confident) or const
    initial_temperature = 1.0  # T at the start (const mode: the fixed T, 4.0 in the paper's ablation)
    max_prob = 0.5  # adaptive T: multiply T by t_mult when the teacher's mean max-probability exceeds this
    t_mult = 1.05  # adaptive T: growth factor per training batch
    global_scale = None  # loss scale g (None: 10 / number of exits, as released)
    locals()  # sacred reads these names; this line tells linters they are used


RULES = dict(
    distillation=boolean,
    c=number(min=0, max=1),
    temperature=choice(*TEMPERATURE_MODES),
    initial_temperature=number(min=0, min_open=True),
    max_prob=number(min=0, max=1, min_open=True, max_open=True),
    t_mult=number(min=1),
    global_scale=optional(number(min=0, min_open=True)),
)
register_rules(NAME, merge_rules(data_ing.RULES, model_ing.RULES, optim_ing.RULES, train_ing.RULES, RULES))


@ex.named_config
def cifar100_full():
    """CIFAR-100 with all training data: 45k train / 5k validation (450 + 50 per class)."""
    data = dict(name="cifar100", n_per_class=None, val_size=5000)
    locals()  # sacred reads these names; this line tells linters they are used


@ex.named_config
def const_temperature():
    """The paper's constant-temperature ablation (T = 4)."""
    temperature = "const"
    initial_temperature = 4.0
    locals()  # sacred reads these names; this line tells linters they are used


@ex.named_config
def released_schedule():
    """The released code stepped MultiStepLR at the start of each epoch: drops at 149 and 224."""
    optim = dict(milestones=[149, 224])
    locals()  # sacred reads these names; this line tells linters they are used


@ex.named_config
def quick():
    """Fashion-MNIST in minutes on 2 CPU cores: 500 images/class (450 train + 50 val), 5-exit MSDNet, bf16, 6 epochs."""
    data = dict(name="fashion_mnist", n_per_class=500, val_size=500, batch_size=64, eval_batch_size=500)
    model = dict(msdnet=QUICK_MSDNET)
    optim = dict(lr=0.1, schedule="cosine")
    train = dict(epochs=6, amp="bf16")
    locals()  # sacred reads these names; this line tells linters they are used


@ex.named_config
def quick_reduced():
    """Phuong's reduced-data regime on Fashion-MNIST: 100 train + 50 val images per class, 30 epochs (~2 min/run)."""
    data = dict(name="fashion_mnist", n_per_class=150, val_size=500, batch_size=64, eval_batch_size=500)
    model = dict(msdnet=QUICK_MSDNET)
    optim = dict(lr=0.1, schedule="cosine")
    train = dict(epochs=30, amp="bf16")
    locals()  # sacred reads these names; this line tells linters they are used


@ex.named_config
def fast():
    """Seconds, for tests: tiny synthetic data, a 3-exit two-scale MSDNet, two epochs."""
    data = data_ing.FAST
    model = dict(msdnet=model_ing.FAST_MSDNET)
    optim = optim_ing.FAST
    train = train_ing.FAST
    locals()  # sacred reads these names; this line tells linters they are used


@ex.main
def main(_run, _seed, data, model, optim, train, distillation, c, temperature, initial_temperature, max_prob,
         t_mult, global_scale) -> dict:
    """Train one multi-exit network with distillation (or the CE baseline) and record its exits."""
    device = resolve_device(train["device"])
    bundle = data_ing.build(data, device, _seed)
    net = model_ing.build(model, bundle.num_classes, bundle.in_channels, bundle.image_size)
    if distillation:
        loss = PhuongDistillationLoss(net.num_exits, c=c, max_prob=max_prob, t_mult=t_mult, temperature=temperature,
                                      initial_temperature=initial_temperature, global_scale=global_scale)
    else:
        loss = ExitCrossEntropy()
    meta = {"model": model, "data": data, "num_classes": bundle.num_classes, "in_channels": bundle.in_channels,
            "image_size": bundle.image_size}
    return fit_and_record(_run, NAME, net, loss, bundle, optim, train, device,
                          variant="distillation" if distillation else "ce", meta=meta)


if __name__ == "__main__":
    run_cli(ex)
