"""IMTA: Li et al., "Improved Techniques for Training Adaptive Deep Networks" (ICCV 2019).

Two stages of one experiment:

    python experiments/imta.py with stage=ge quick                      # 1: MSDNet + Gradient Equilibrium
    python experiments/imta.py with stage=imta quick ge_run=<run id>   # 2: ISC + One-for-all KD, frozen stage 1
    python experiments/imta.py with stage=ge quick ge_scope=off        # the plain MSDNet baseline

Defaults are the CIFAR-100 budgeted recipe (5-exit MSDNet, 45k/5k split, 300 epochs).
"""
from __future__ import annotations

from experiments.engine.hardware import resolve_device
from experiments.engine.pipeline import fit_and_record
from experiments.ingredients import data as data_ing
from experiments.ingredients import model as model_ing
from experiments.ingredients import optim as optim_ing
from experiments.ingredients import train as train_ing
from experiments.identity import TrackedExperiment
from experiments.references import load_parent, stores_of
from experiments.tracking import run_cli
from experiments.validation import boolean, choice, merge_rules, number, register_rules
from losses import KL_REDUCTIONS, ExitCrossEntropy, OneForAllLoss
from models import build_imta
from models.imta import FROZEN_BN_MODES

NAME = "imta"
STAGES = ("ge", "imta")
GE_VARIANTS = {"off": "", "coarsest": "+ge", "all": "+ge_all"}

data_ingredient = data_ing.data_ingredient(name="cifar100", val_size=5000, batch_size=64)
model_ingredient = model_ing.model_ingredient("cifar_budgeted")
optim_ingredient = optim_ing.optim_ingredient(lr=0.1, momentum=0.9, nesterov=False, weight_decay=1e-4,
                                              schedule="multistep", milestones=[0.5, 0.75], gamma=0.1)
train_ingredient = train_ing.train_ingredient(epochs=300)
ex = TrackedExperiment(NAME, ingredients=[data_ingredient, model_ingredient, optim_ingredient, train_ingredient])


@ex.config
def config():
    stage = None  # ge (stage 1: train with Gradient Equilibrium) or imta (stage 2: ISC + OFA on a frozen stage 1)
    ge_scope = "coarsest"  # stage ge: coarsest (released code), all (every scale's onward path), off (plain MSDNet)
    ge_run = None  # stage imta: run id or snapshot path of a finished stage=ge run
    gamma = 0.9  # OFA: weight of the distillation term of every early exit
    temperature = 3.0  # OFA: distillation temperature T
    kl_reduction = "mean"  # OFA: mean (released code, the paper's numbers: KL / batch x classes) or batchmean
    isc_detach = False  # stop gradients through ISC links (paper wording); False as released
    frozen_bn = "eval"  # stage imta: frozen BatchNorm on running statistics; 'train' as released
    locals()  # sacred reads these names; this line tells linters they are used


RULES = dict(
    stage=choice(*STAGES),
    ge_scope=choice(*GE_VARIANTS),
    ge_run=train_ing.SNAPSHOT_REF,
    gamma=number(min=0, max=1),
    temperature=number(min=0, min_open=True),
    kl_reduction=choice(*KL_REDUCTIONS),
    isc_detach=boolean,
    frozen_bn=choice(*FROZEN_BN_MODES),
)
register_rules(NAME, merge_rules(data_ing.RULES, model_ing.RULES, optim_ing.RULES, train_ing.RULES, RULES))


@ex.named_config
def cifar100_anytime():
    """7-exit MSDNet for anytime prediction, 45k train / 5k validation that selects the checkpoint."""
    model = dict(arch="msdnet", msdnet=model_ing.msdnet_knobs("cifar_anytime"))
    data = dict(name="cifar100", val_size=5000)
    locals()  # sacred reads these names; this line tells linters they are used


@ex.named_config
def cifar100_anytime_reference():
    """The reference anytime regime: 7-exit MSDNet on all 50k training images, no validation, last epoch kept."""
    model = dict(arch="msdnet", msdnet=model_ing.msdnet_knobs("cifar_anytime"))
    data = dict(name="cifar100", val_size=0)
    train = dict(select="last")
    locals()  # sacred reads these names; this line tells linters they are used


@ex.named_config
def cifar100_budgeted():
    """5-exit MSDNet for budgeted batch classification, 45k train / 5k validation (the default)."""
    model = dict(arch="msdnet", msdnet=model_ing.msdnet_knobs("cifar_budgeted"))
    data = dict(name="cifar100", val_size=5000)
    locals()  # sacred reads these names; this line tells linters they are used


@ex.named_config
def imagenet_step4():
    """The released ImageNet scripts: 5 blocks of 4 layers, 50k held out, 90 epochs, lr x0.1 every 30, T=1, gamma=0.1"""
    model = dict(arch="msdnet", msdnet=model_ing.msdnet_knobs("imagenet_step4"))
    data = dict(name="imagenet", val_size=50000, class_balanced=True, batch_size=256, eval_batch_size=256, workers=8)
    optim = dict(milestones=[30, 60])
    train = dict(epochs=90)
    temperature = 1.0
    gamma = 0.1
    locals()  # sacred reads these names; this line tells linters they are used


@ex.named_config
def released():
    """Stage 2 as the released code runs it: KLDivLoss 'mean' reduction, frozen BatchNorm in train mode."""
    kl_reduction = "mean"
    frozen_bn = "train"
    locals()  # sacred reads these names; this line tells linters they are used


@ex.named_config
def quick():
    """Fashion-MNIST in minutes on 2 CPU cores: 300 images/class, a 4-exit MSDNet, bf16, 6 epochs per stage."""
    data = dict(name="fashion_mnist", n_per_class=300, val_size=500, batch_size=64, eval_batch_size=500)
    model = dict(arch="msdnet", msdnet=dict(model_ing.msdnet_knobs("cifar_anytime"), n_blocks=4, base=2, step=2,
                                            n_channels=8, growth_rate=6, head_width=32))
    optim = dict(schedule="cosine")
    train = dict(epochs=6, amp="bf16")
    locals()  # sacred reads these names; this line tells linters they are used


@ex.named_config
def fast():
    """Seconds, for tests: tiny synthetic data, a 3-exit two-scale MSDNet, two epochs."""
    data = data_ing.FAST
    model = dict(arch="msdnet", msdnet=dict(model_ing.msdnet_knobs("cifar_anytime"), **model_ing.FAST_MSDNET))
    optim = optim_ing.FAST
    train = train_ing.FAST
    locals()  # sacred reads these names; this line tells linters they are used


@ex.derive_config
def stage2_runs_on_its_parent(config: dict, stores) -> dict:
    """Stage imta trains on stage 1's data split and network: the record says so, not the CLI's defaults."""
    if config["stage"] != "imta":
        return {}
    parent, snapshot = load_parent(config["ge_run"], "ge_run", NAME, "ge", config["train"]["snapshot_root"], stores)
    meta = snapshot["meta"]
    return {"data": data_ing.inherit_split(config["data"], meta["data"], parent.snapshot.parent / "split.npz"),
            "model": meta["model"]}


@ex.main
def main(_run, _seed, stage, ge_scope, ge_run, gamma, temperature, kl_reduction, isc_detach, frozen_bn,
         data, model, optim, train) -> dict:
    """Stage ge trains MSDNet (+GE); stage imta trains ISC classifiers with OFA on the frozen result."""
    device = resolve_device(train["device"])
    if stage == "ge":
        bundle = data_ing.build(data, device, _seed)
        net = model_ing.build(model, bundle.num_classes, bundle.in_channels, bundle.image_size, ge_scope=ge_scope)
        loss = ExitCrossEntropy()
        variant = model["arch"] + GE_VARIANTS[ge_scope]
        meta = {"stage": "ge", "model": model, "data": data}
    else:
        parent, snapshot = load_parent(ge_run, "ge_run", NAME, "ge", train["snapshot_root"], stores_of(_run.observers))
        bundle = data_ing.build(data, device, _seed)  # stage 1's split and network (stage2_runs_on_its_parent)
        base = model_ing.build(model, bundle.num_classes, bundle.in_channels, bundle.image_size)
        base.load_state_dict(snapshot["model"])
        net = build_imta(base, bundle.input_shape(), isc_detach=isc_detach, frozen_bn=frozen_bn)
        loss = OneForAllLoss(lambda: net.teacher_logits, gamma=gamma, temperature=temperature,
                             kl_reduction=kl_reduction)
        variant = snapshot["meta"]["variant"] + "+isc+ofa"
        meta = {"stage": "imta", "parent": parent.record(), "model": model, "data": data}
        _run.info["parent"] = parent.record()
    return fit_and_record(_run, NAME, net.to(device), loss, bundle, optim, train, device, variant=variant, meta=meta)


if __name__ == "__main__":
    run_cli(ex)
