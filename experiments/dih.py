"""DIH: Asadian & Salehi-Abari, "Distilling Knowledge via Intermediate Classifiers".

Stages of one experiment, chained by run reference (uid, run id or snapshot path):

    python experiments/dih.py with stage=teacher quick                        # A: CE training of the teacher
    python experiments/dih.py with stage=heads quick teacher_run=<uid>        # B: heads on the frozen teacher
    python experiments/dih.py with stage=student quick teacher_run=<uid> heads_run=<uid> method=dih   # C
    python experiments/dih.py with stage=hint fitnets_hint quick teacher_run=<uid>   # FitNets' hint phase, then
    python experiments/dih.py with stage=student quick method=fitnets teacher_run=<uid> hint_run=<uid>

    python experiments/dih.py with stage=student quick method=kd student_arch=resnet14 teacher_run=<uid>  # TAKD's
    python experiments/dih.py with stage=student quick method=takd teacher_run=<uid> assistant_run=<uid>  # assistant

    python experiments/dih.py with stage=heads heads=tofd quick teacher_run=<uid>     # TOFD's teacher branches
    python experiments/dih.py with stage=student quick method=tofd teacher_run=<uid> heads_run=<uid>

Stage C trains the student (``student_arch``) with ``method``: ce, kd, dih, at, fitnets, takd, mhkd, crd or
tofd. Defaults are the paper's
CIFAR-100 recipe (ResNet-110 teacher, 200 epochs, batch 64, SGD 0.1 Nesterov, wd 5e-4, x0.2 at 60/120/180),
with 5k training images held out for validation: the released code selected checkpoints on the test set.
"""
from __future__ import annotations

from experiments.engine import distributed
from experiments.engine.hardware import resolve_device
from experiments.engine.pipeline import fit_and_record
from experiments.identity import TrackedExperiment
from experiments.ingredients import data as data_ing
from experiments.ingredients import model as model_ing
from experiments.ingredients import optim as optim_ing
from experiments.ingredients import train as train_ing
from experiments.references import ResolvedRun, RunReferenceError, load_parent, stores_of
from experiments.tracking import run_cli
from experiments.validation import choice, merge_rules, number, register_rules
from losses.exits import final_exit_only
from losses import (COHORT_REDUCTIONS, AttentionTransferLoss, CohortDistillation, ExitCrossEntropy, FitNetsHintLoss,
                    CRDLoss, MHKDLoss, MultiExitLoss, TOFDLoss)
from models.dih import HEAD_KINDS, IntermediateHeads
from models.distill import StudentWithTeacher

NAME = "dih"
STAGES = ("teacher", "heads", "hint", "student")
METHODS = ("ce", "kd", "dih", "at", "fitnets", "takd", "mhkd", "crd", "tofd")

data_ingredient = data_ing.data_ingredient(name="cifar100", val_size=5000, batch_size=64)
model_ingredient = model_ing.model_ingredient(arch="resnet110")
optim_ingredient = optim_ing.optim_ingredient(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4,
                                              schedule="multistep", milestones=[60, 120, 180], gamma=0.2)
train_ingredient = train_ing.train_ingredient(epochs=200)
ex = TrackedExperiment(NAME, ingredients=[data_ingredient, model_ingredient, optim_ingredient, train_ingredient])


@ex.config
def config():
    stage = None  # teacher (A: CE), heads (B: DIH's heads on the frozen teacher), student (C), hint (FitNets' 1st)
    heads = "linear"  # stage heads: linear (DIH's, one Linear per stage) or tofd (TOFD's task-oriented branches)
    teacher_run = None  # stages heads and student: uid, run id or snapshot path of a finished stage=teacher run
    heads_run = None  # stage student, methods dih / tofd: a finished stage=heads run of it, heads=linear / tofd
    hint_run = None  # stage student, method fitnets: a finished stage=hint run (FitNets' first phase) of it
    assistant_run = None  # stage student, method takd: a finished stage=student method=kd run of it (the assistant)
    student_arch = "resnet8"  # stage student: the student's architecture (its family's model.* knobs apply)
    method = "dih"  # stage student: ce, kd (teacher's final exit), dih (heads + final exit), at, fitnets, takd, mhkd,
    # crd, tofd
    alpha = 0.1  # weight of every KD term's KL (its CE gets 1 - alpha)
    kd_temperature = 5.0  # KD temperature tau
    cohort_reduction = "mean"  # dih: mean of the k+1 KD terms (KD's scale) or sum (released: CE counted k+1 times)
    locals()  # sacred reads these names; this line tells linters they are used


RULES = dict(stage=choice(*STAGES), heads=choice(*HEAD_KINDS), teacher_run=train_ing.SNAPSHOT_REF,
             heads_run=train_ing.SNAPSHOT_REF,
             hint_run=train_ing.SNAPSHOT_REF, assistant_run=train_ing.SNAPSHOT_REF,
             student_arch=model_ing.architecture, method=choice(*METHODS), alpha=number(min=0, max=1),
             kd_temperature=number(min=0, min_open=True), cohort_reduction=choice(*COHORT_REDUCTIONS))
register_rules(NAME, merge_rules(data_ing.RULES, model_ing.RULES, optim_ing.RULES, train_ing.RULES, RULES))


@ex.named_config
def crd_recipe():
    """The 240-epoch recipe of the released code's later defaults (CRD's): lr 0.05, batch 128, x0.1 at 150/180/210."""
    data = dict(batch_size=128)
    optim = dict(lr=0.05, milestones=[150, 180, 210], gamma=0.1)
    train = dict(epochs=240)
    locals()  # sacred reads these names; this line tells linters they are used


@ex.named_config
def fitnets_hint():
    """FitNets' hint phase as released: 40 epochs at lr 0.1 (its 60/120/180 x0.2 milestones fall after them)."""
    optim = dict(lr=0.1)
    train = dict(epochs=40)
    locals()  # sacred reads these names; this line tells linters they are used


@ex.named_config
def released_selection():
    """The released code's checkpoint choice: the epoch with the lowest test loss (recorded; results optimistic)."""
    train = dict(select="lowest_test_loss")
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
    model = model_ing.FAST_RESNET
    optim = optim_ing.FAST
    train = train_ing.FAST
    locals()  # sacred reads these names; this line tells linters they are used


def load_teacher(config: dict, stores) -> tuple[ResolvedRun, dict]:
    return load_parent(config["teacher_run"], "teacher_run", NAME, "teacher", config["train"]["snapshot_root"], stores)


HEADS_OF = {"dih": "linear", "tofd": "tofd"}  # the heads each cohort method distils from


def heads_kind(snapshot: dict) -> str:
    """Which heads a heads run trained (runs from before TOFD's branches hold DIH's)."""
    return snapshot["meta"].get("heads", "linear")


def load_child(config: dict, key: str, stage: str, teacher: ResolvedRun, stores) -> tuple[ResolvedRun, dict]:
    """The ``stage`` run named by ``config[key]`` (heads, hint), refused unless it was trained on ``teacher``."""
    child, snapshot = load_parent(config[key], key, NAME, stage, config["train"]["snapshot_root"], stores)
    trained_on = snapshot["meta"].get("parent", {}).get("uid")
    if trained_on != teacher.uid:
        raise RunReferenceError(f"{key} {child.uid} holds {stage} of teacher {trained_on}, not of teacher_run "
                                f"{teacher.uid}")
    if key == "heads_run" and heads_kind(snapshot) != HEADS_OF[config["method"]]:
        raise RunReferenceError(f"heads_run {child.uid} holds heads={heads_kind(snapshot)}; method={config['method']} "
                                f"needs a stage=heads heads={HEADS_OF[config['method']]} run of the teacher")
    if key == "assistant_run" and snapshot["meta"].get("method") != "kd":
        raise RunReferenceError(f"assistant_run {child.uid} was trained with method={snapshot['meta'].get('method')}; "
                                "TAKD's assistant is a student trained by KD (stage=student method=kd)")
    return child, snapshot


# What a student stage needs beyond the teacher: (config key, stage of the run it names), per method.
NEEDS = {"dih": ("heads_run", "heads"), "tofd": ("heads_run", "heads"), "fitnets": ("hint_run", "hint"),
         "takd": ("assistant_run", "student")}


@ex.derive_config
def later_stages_train_on_the_teachers_split(config: dict, stores) -> dict:
    """Stages after the teacher use its data split (heads: its network too); the record says so."""
    if config["stage"] not in ("heads", "hint", "student"):
        return {}
    parent, snapshot = load_teacher(config, stores)
    if config["stage"] == "student" and config["method"] in NEEDS:
        load_child(config, *NEEDS[config["method"]], parent, stores)
    meta = snapshot["meta"]
    model = meta["model"] if config["stage"] == "heads" else {**config["model"], "arch": config["student_arch"]}
    return {"data": data_ing.inherit_split(config["data"], meta["data"], parent.snapshot.parent / "split.npz"),
            "model": model}


def crd_objective(net: StudentWithTeacher, bundle) -> CRDLoss:
    """CRD with its memory bank over the training images (in-memory datasets: their loader names each batch)."""
    loader = bundle.train
    if distributed.world_size() > 1:
        raise ValueError("method=crd keeps a memory bank of every training image, updated by each batch: it does "
                         "not run under torchrun (each rank would update its own); train it in one process")
    if not hasattr(loader, "batch_indices"):
        raise ValueError("method=crd needs an in-memory dataset (its loader names the images of each batch)")
    shape = bundle.input_shape()
    return CRDLoss(net.taps, lambda: loader.batch_indices, num_data=len(loader.images),
                   student_dim=net.student.probe(shape)[2][-1].shape[1],
                   teacher_dim=net.teacher.probe(shape)[2][-1].shape[1],
                   pool=loader.indices, labels=loader.labels)


def student_objective(method: str, net: StudentWithTeacher, alpha: float, kd_temperature: float,
                      cohort_reduction: str, input_shape: tuple[int, ...]) -> MultiExitLoss:
    """The student's loss: on its final exit (DIH's student has no heads; MHKD's heads live in its loss);
    FitNets' second phase and TAKD are KD."""
    if method == "ce":
        return final_exit_only(net.num_exits)
    if method == "at":
        return AttentionTransferLoss(net.taps)  # RepDistiller's AT: CE + 1000 x attention distance, every stage
    if method == "tofd":
        student = net.student.probe(input_shape)
        return TOFDLoss(net.taps, [tuple(f.shape[1:]) for f in student[1]], student[2][-1].shape[1],
                        [e.shape[1] for e in net.teacher.probe(input_shape)[2]], num_classes=net.num_classes,
                        temperature=kd_temperature)
    if method == "mhkd":
        channels = [[shape[0] for shape in stage_shapes(n, input_shape)] for n in (net.student, net.teacher)]
        return MHKDLoss(net.taps, *channels, num_classes=net.num_classes, alpha=alpha, temperature=kd_temperature)
    return CohortDistillation(net.taps, alpha, kd_temperature, cohort="all" if method == "dih" else "final",
                              reduction=cohort_reduction)


def stage_shapes(net, input_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """(C, H, W) of what every stage hands its exit: where feature-based methods read."""
    return [tuple(f.shape[1:]) for f in net.probe(input_shape)[1]]


def hint_objective(net: StudentWithTeacher, input_shape: tuple[int, ...]) -> FitNetsHintLoss:
    """FitNets' first phase: regress the student's first-stage output onto the teacher's (MSE)."""
    return FitNetsHintLoss(net.taps, stage_shapes(net.student, input_shape)[0],
                           stage_shapes(net.teacher, input_shape)[0])


def student_weights(snapshot: dict) -> dict:
    """The student's part of a hint or student run's weights (it trained next to its teacher)."""
    return {k[len("student."):]: v for k, v in snapshot["model"].items() if k.startswith("student.")}


@ex.main
def main(_run, _seed, stage, heads, method, alpha, kd_temperature, cohort_reduction, data, model, optim, train) -> dict:
    """Teacher: CE; heads: DIH's heads on the frozen teacher; hint: FitNets' first phase; student: distil."""
    device = resolve_device(train["device"])
    bundle = data_ing.build(data, device, _seed)  # later stages: the teacher's split (derived config)
    net = model_ing.build(model, bundle.num_classes, bundle.in_channels, bundle.image_size)
    meta = {"stage": stage, "model": model, "data": data}
    if stage == "teacher":
        return fit_and_record(_run, NAME, net, final_exit_only(net.num_exits), bundle, optim, train, device,
                              variant=model["arch"], meta=meta)
    stores = stores_of(_run.observers)
    parent, snapshot = load_teacher(_run.config, stores)
    meta["parent"] = _run.info["parent"] = parent.record()
    teacher = model_ing.build(snapshot["meta"]["model"], bundle.num_classes, bundle.in_channels, bundle.image_size)
    teacher.load_state_dict(snapshot["model"])
    pair = f"{snapshot['meta']['model']['arch']} -> {model['arch']}"
    if stage == "heads":
        net = IntermediateHeads(teacher, bundle.input_shape(), kind=heads)
        loss = ExitCrossEntropy(weights=[1.0] * (net.num_exits - 1) + [0.0])  # the frozen final exit: no term
        variant, meta["heads"] = f"{model['arch']}+heads" if heads == "linear" else f"{model['arch']}+tofd heads", heads
    elif stage == "hint":
        net = StudentWithTeacher(net, teacher)
        loss, variant = hint_objective(net, bundle.input_shape()), f"hint: {pair}"
    else:
        if method in NEEDS:
            key, needed = NEEDS[method]
            child, child_snapshot = load_child(_run.config, key, needed, parent, stores)
            _run.info[key.removesuffix("_run")] = child.record()
            if method in HEADS_OF:  # the cohort: the teacher with its trained heads
                teacher = IntermediateHeads(teacher, bundle.input_shape(), kind=heads_kind(child_snapshot))
                teacher.load_state_dict(child_snapshot["model"])
            elif method == "takd":  # the assistant, a KD-trained student of the teacher, teaches the student
                assistant = child_snapshot["meta"]["model"]
                teacher = model_ing.build(assistant, bundle.num_classes, bundle.in_channels, bundle.image_size)
                teacher.load_state_dict(student_weights(child_snapshot))
                pair = f"{pair.split(' -> ')[0]} -> {assistant['arch']} -> {model['arch']}"
            else:  # FitNets' second phase starts from the hint phase's student
                net.load_state_dict(student_weights(child_snapshot))
        meta["method"] = method
        net = StudentWithTeacher(net, teacher)
        loss = (crd_objective(net, bundle) if method == "crd" else
                student_objective(method, net, alpha, kd_temperature, cohort_reduction, bundle.input_shape()))
        variant = f"{method}: {pair}"
    return fit_and_record(_run, NAME, net.to(device), loss, bundle, optim, train, device, variant=variant, meta=meta)


if __name__ == "__main__":
    run_cli(ex)
