"""DIH: Asadian & Salehi-Abari, "Distilling Knowledge via Intermediate Classifiers".

Stages of one experiment, chained by run reference (uid, run id or snapshot path):

    python experiments/dih.py with stage=teacher quick                        # A: CE training of the teacher
    python experiments/dih.py with stage=heads quick teacher_run=<uid>        # B: heads on the frozen teacher

Stage C (the student, with DIH and the KD-family baselines) is not built yet. Defaults are the paper's
CIFAR-100 recipe (ResNet-110 teacher, 200 epochs, batch 64, SGD 0.1 Nesterov, wd 5e-4, x0.2 at 60/120/180),
with 5k training images held out for validation: the released code selected checkpoints on the test set.
"""
from __future__ import annotations

from experiments.engine.hardware import resolve_device
from experiments.engine.pipeline import fit_and_record
from experiments.identity import TrackedExperiment
from experiments.ingredients import data as data_ing
from experiments.ingredients import model as model_ing
from experiments.ingredients import optim as optim_ing
from experiments.ingredients import train as train_ing
from experiments.references import load_parent, stores_of
from experiments.tracking import run_cli
from experiments.validation import choice, merge_rules, register_rules
from losses import ExitCrossEntropy
from models.dih import IntermediateHeads

NAME = "dih"
STAGES = ("teacher", "heads")

data_ingredient = data_ing.data_ingredient(name="cifar100", val_size=5000, batch_size=64)
model_ingredient = model_ing.model_ingredient(arch="resnet110")
optim_ingredient = optim_ing.optim_ingredient(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4,
                                              schedule="multistep", milestones=[60, 120, 180], gamma=0.2)
train_ingredient = train_ing.train_ingredient(epochs=200)
ex = TrackedExperiment(NAME, ingredients=[data_ingredient, model_ingredient, optim_ingredient, train_ingredient])


@ex.config
def config():
    stage = None  # teacher (A: CE on the teacher's final exit) or heads (B: DIH's heads on the frozen teacher)
    teacher_run = None  # stage heads: uid, run id or snapshot path of a finished stage=teacher run
    locals()  # sacred reads these names; this line tells linters they are used


RULES = dict(stage=choice(*STAGES), teacher_run=train_ing.SNAPSHOT_REF)
register_rules(NAME, merge_rules(data_ing.RULES, model_ing.RULES, optim_ing.RULES, train_ing.RULES, RULES))


@ex.named_config
def crd_recipe():
    """The 240-epoch recipe of the released code's later defaults (CRD's): lr 0.05, batch 128, x0.1 at 150/180/210."""
    data = dict(batch_size=128)
    optim = dict(lr=0.05, milestones=[150, 180, 210], gamma=0.1)
    train = dict(epochs=240)
    locals()  # sacred reads these names; this line tells linters they are used


@ex.named_config
def quick():
    """Fashion-MNIST in minutes on 2 CPU cores: a ResNet-20 teacher, 450 + 50 images per class, 8 epochs."""
    data = dict(name="fashion_mnist", n_per_class=500, val_size=500, batch_size=64, eval_batch_size=500)
    model = dict(arch="resnet20")
    optim = dict(schedule="cosine")
    train = dict(epochs=8, amp="bf16")
    locals()  # sacred reads these names; this line tells linters they are used


@ex.named_config
def fast():
    """Seconds, for tests: tiny synthetic data, a ResNet-8 of width 4, two epochs."""
    data = data_ing.FAST
    model = dict(arch="resnet8", resnet=dict(width=4))
    optim = dict(lr=0.05, schedule="cosine")
    train = train_ing.FAST
    locals()  # sacred reads these names; this line tells linters they are used


@ex.derive_config
def heads_train_on_their_teacher(config: dict, stores) -> dict:
    """Stage heads trains on the teacher's data split and network: the record says so."""
    if config["stage"] != "heads":
        return {}
    parent, snapshot = load_parent(config["teacher_run"], "teacher_run", NAME, "teacher",
                                   config["train"]["snapshot_root"], stores)
    meta = snapshot["meta"]
    return {"data": data_ing.inherit_split(config["data"], meta["data"], parent.snapshot.parent / "split.npz"),
            "model": meta["model"]}


def final_exit_only(num_exits: int) -> ExitCrossEntropy:
    """The teacher's objective: CE on its final exit (its earlier pooled exits get no gradient)."""
    return ExitCrossEntropy(weights=[0.0] * (num_exits - 1) + [1.0])


@ex.main
def main(_run, _seed, stage, teacher_run, data, model, optim, train) -> dict:
    """Stage teacher trains the teacher with CE; stage heads trains DIH's heads on it, frozen."""
    device = resolve_device(train["device"])
    bundle = data_ing.build(data, device, _seed)
    net = model_ing.build(model, bundle.num_classes, bundle.in_channels, bundle.image_size)
    if stage == "teacher":
        loss, variant, meta = final_exit_only(net.num_exits), model["arch"], {"stage": "teacher"}
    else:
        parent, snapshot = load_parent(teacher_run, "teacher_run", NAME, "teacher", train["snapshot_root"],
                                       stores_of(_run.observers))
        net.load_state_dict(snapshot["model"])
        net = IntermediateHeads(net, bundle.input_shape())
        loss = ExitCrossEntropy(weights=[1.0] * (net.num_exits - 1) + [0.0])  # the frozen final exit: no term
        variant, meta = f"{model['arch']}+heads", {"stage": "heads", "parent": parent.record()}
        _run.info["parent"] = parent.record()
    meta.update(model=model, data=data)
    return fit_and_record(_run, NAME, net.to(device), loss, bundle, optim, train, device, variant=variant, meta=meta)


if __name__ == "__main__":
    run_cli(ex)
