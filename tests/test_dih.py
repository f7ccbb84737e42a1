"""DIH stages A (teacher) and B (intermediate heads): head placement and sizes (the spec's Table 1 and head
table), the frozen teacher, the teacher -> heads chain by uid, and the references a heads run refuses."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import run_fast
from experiments import dih
from experiments.references import RunReferenceError
from models import count_exit_costs, create_model
from models.dih import IntermediateHeads


@pytest.mark.parametrize("arch, sizes", [
    # DIH spec, section 1.2: one head per stage on the flattened post-ReLU output, 32x32 inputs
    ("resnet8", [16 * 32 * 32, 32 * 16 * 16, 64 * 8 * 8]),
    ("resnet110", [16384, 8192, 4096]),
])
def test_one_flattened_linear_head_per_teacher_stage(arch, sizes):
    teacher = create_model(arch, num_classes=100)
    net = IntermediateHeads(teacher, (3, 32, 32))
    assert [h.classifier.in_features for h in net.heads] == sizes
    assert all(isinstance(h.features, torch.nn.Flatten) for h in net.heads)  # no pooling, no conv, no BN
    assert net.num_exits == len(sizes) + 1  # the cohort: k heads and the teacher's final exit
    # heads only: (size + 1) x 100 parameters each (ResNet-110: 1.64 M, 0.82 M, 0.41 M in the spec's table)
    assert sum(p.numel() for p in net.parameters() if p.requires_grad) == sum((n + 1) * 100 for n in sizes)


def test_the_cohort_ends_with_the_teachers_own_exit_and_staged_equals_forward():
    torch.manual_seed(0)
    teacher = create_model("resnet8", num_classes=5, width=4)
    net = IntermediateHeads(teacher, (3, 16, 16)).train()  # the teacher stays in eval mode regardless
    assert not teacher.training
    x = torch.randn(3, 3, 16, 16)
    outputs = net(x)
    torch.testing.assert_close(outputs[-1], teacher(x)[-1])
    state = net.init_state(x)
    for k in range(net.num_exits):
        state, logits = net.run_stage(k, state)
        torch.testing.assert_close(logits, outputs[k])
    macs = count_exit_costs(net, (3, 16, 16)).macs
    assert all(a < b for a, b in zip(macs, macs[1:]))


def run(tmp_path: Path, **updates):
    return run_fast(dih, tmp_path, **{"seed": 3, "train": {"latency_batch": 0}, **updates})


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("dih")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        teacher = run(root, stage="teacher", data={"split_seed": 5})
        heads = run(root, stage="heads", teacher_run=teacher.info["uid"])
    finally:
        torch.set_num_threads(threads)
    return root, teacher, heads


def test_heads_train_on_the_frozen_teacher_and_leave_it_bit_identical(chain):
    root, teacher, heads = chain
    assert teacher.status == heads.status == "COMPLETED"
    assert (teacher.info["variant"], heads.info["variant"]) == ("resnet8", "resnet8+heads")
    before = torch.load(Path(teacher.info["snapshot_dir"]) / "final.pt", weights_only=True)["model"]
    after = torch.load(Path(heads.info["snapshot_dir"]) / "final.pt", weights_only=True)["model"]
    frozen = {k[len("teacher."):]: v for k, v in after.items() if k.startswith("teacher.")}
    assert frozen.keys() == before.keys()
    assert all(torch.equal(before[k], frozen[k]) for k in before)  # BN running statistics included
    trained = [k for k in after if k.startswith("heads.")]
    assert len(trained) == 6  # three Linear heads: weight and bias each


def test_heads_run_records_its_teacher_and_what_it_ran_on(chain):
    root, teacher, heads = chain
    assert heads.info["parent"]["uid"] == teacher.info["uid"]
    config = json.loads((root / "runs" / heads.info["uid"] / "config.json").read_text())
    assert config["data"]["split_seed"] == 5  # the teacher's split, not this command's default
    assert config["data"]["split_file"] == str(Path(teacher.info["snapshot_dir"]) / "split.npz")
    record = json.loads((root / "runs" / heads.info["uid"] / "info.json").read_text())["exits"]
    assert "test_acc_exit4" in record  # 3 heads + the teacher's final exit
    assert record["test_acc_exit4"] == pytest.approx(teacher.info["exits"]["test_acc_exit3"])


def test_a_heads_run_needs_a_finished_teacher_run(chain, tmp_path):
    root, teacher, heads = chain
    with pytest.raises(RunReferenceError, match="teacher_run is needed"):
        run(root, stage="heads")
    with pytest.raises(RunReferenceError, match="not a finished stage=teacher run of dih .*'heads'"):
        run(root, stage="heads", teacher_run=heads.info["uid"])


# ------------------------------------------------------------------------------------------- stage C
def fixed_taps(*teacher_logits):
    from losses.taps import Taps

    empty = torch.zeros(0)
    return lambda: Taps([], [empty], [], [empty], list(teacher_logits))


def test_kd_and_the_dih_cohort_by_hand():
    """One sample, two classes: z_s = [0, 0] (p = 1/2, 1/2), label 1; teachers z = [0, ln 3] (q = 1/4, 3/4) and
    z = [0, 0] (q = p, KL 0); tau = 1 so the tau^2 factor is visible only through the temperature argument."""
    from losses.cohort import CohortDistillation

    student = [torch.zeros(1, 2, requires_grad=True)]
    y = torch.tensor([1])
    ce = math.log(2)
    kl = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    sharp, flat = torch.tensor([[0.0, math.log(3)]]), torch.zeros(1, 2)
    kd = CohortDistillation(fixed_taps(flat, sharp), alpha=0.1, temperature=1.0, cohort="final")
    assert kd(student, y).item() == pytest.approx(0.9 * ce + 0.1 * kl)  # the final exit only
    summed = CohortDistillation(fixed_taps(flat, sharp), alpha=0.1, temperature=1.0, reduction="sum")
    assert summed(student, y).item() == pytest.approx(2 * 0.9 * ce + 0.1 * kl)  # CE counted once per member
    mean = CohortDistillation(fixed_taps(flat, sharp), alpha=0.1, temperature=1.0, reduction="mean")
    assert mean(student, y).item() == pytest.approx(0.9 * ce + 0.1 * kl / 2)
    hot = CohortDistillation(fixed_taps(sharp), alpha=1.0, temperature=2.0, cohort="final")
    q = torch.softmax(sharp / 2, 1)[0]
    assert hot(student, y).item() == pytest.approx(4 * float((q * (q / 0.5).log()).sum()), rel=1e-6)


@pytest.mark.parametrize("method", ["ce", "kd", "dih", "at", "mhkd", "tofd"])
def test_every_method_fits_a_tiny_batch_and_never_moves_the_teacher(method):
    from experiments.dih import student_objective
    from models.distill import StudentWithTeacher

    torch.manual_seed(0)
    kind = "tofd" if method == "tofd" else "linear"
    teacher = IntermediateHeads(create_model("resnet8", num_classes=3, width=4), (3, 8, 8), kind=kind)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    net = StudentWithTeacher(create_model("resnet8", num_classes=3, width=4), teacher).train()
    loss_fn = student_objective(method, net, alpha=0.1, kd_temperature=5.0, cohort_reduction="mean",
                                input_shape=(3, 8, 8))
    x, y = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    optimizer = torch.optim.SGD([*net.parameters(), *loss_fn.parameters()], lr=0.1, momentum=0.9)
    for _ in range(60):
        optimizer.zero_grad()
        loss_fn(net(x), y).backward()
        optimizer.step()
    net.eval()
    assert (net(x)[-1].argmax(1) == y).all()
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


def test_the_student_stage_chains_teacher_and_heads_and_refuses_heads_of_another_teacher(chain):
    root, teacher, heads = chain
    runs = {m: run(root, stage="student", method=m, teacher_run=teacher.info["uid"], heads_run=heads.info["uid"])
            for m in ("ce", "kd", "dih", "at", "mhkd", "crd")}
    for method, r in runs.items():
        assert r.status == "COMPLETED" and r.info["variant"] == f"{method}: resnet8 -> resnet8"
        assert (Path(r.info["snapshot_dir"]) / "exit_record.npz").is_file()
        assert r.info["parent"]["uid"] == teacher.info["uid"]
    assert runs["dih"].info["heads"]["uid"] == heads.info["uid"]
    other = run(root, stage="teacher", seed=9)
    with pytest.raises(RunReferenceError, match=f"holds heads of teacher {teacher.info['uid']}, not of teacher_run"):
        run(root, stage="student", method="dih", teacher_run=other.info["uid"], heads_run=heads.info["uid"])


def test_tofd_distils_from_the_teachers_own_branches_and_refuses_dihs_heads(chain):
    root, teacher, heads = chain
    branches = run(root, stage="heads", heads="tofd", teacher_run=teacher.info["uid"])
    assert branches.info["variant"] == "resnet8+tofd heads"
    record = json.loads((root / "runs" / branches.info["uid"] / "info.json").read_text())["exits"]
    assert "test_acc_exit3" in record and "test_acc_exit4" not in record  # 2 branches + the final exit
    assert record["test_acc_exit3"] == pytest.approx(teacher.info["exits"]["test_acc_exit3"])
    student = run(root, stage="student", method="tofd", teacher_run=teacher.info["uid"],
                  heads_run=branches.info["uid"])
    assert student.status == "COMPLETED" and student.info["heads"]["uid"] == branches.info["uid"]
    weights = torch.load(Path(student.info["snapshot_dir"]) / "last.pt", weights_only=True)  # with the loss
    assert any(k.startswith("branches.") for k in weights["loss"]) and "links.2.weight" in weights["loss"]
    with pytest.raises(RunReferenceError, match="holds heads=linear; method=tofd needs a stage=heads heads=tofd"):
        run(root, stage="student", method="tofd", teacher_run=teacher.info["uid"], heads_run=heads.info["uid"])
    with pytest.raises(RunReferenceError, match="holds heads=tofd; method=dih needs a stage=heads heads=linear"):
        run(root, stage="student", method="dih", teacher_run=teacher.info["uid"], heads_run=branches.info["uid"])


def test_show_commands_work_without_the_references_a_run_needs(capsys):
    dih.ex.run_commandline(["dih.py", "print_named_configs", "--loglevel=ERROR"])
    assert "crd_recipe" in capsys.readouterr().out
    dih.ex.run_commandline(["dih.py", "print_config", "with", "stage=student", "--loglevel=ERROR"])
    assert "student_arch = 'resnet8'" in capsys.readouterr().out


def test_fitnets_hint_phase_then_kd_from_the_hinted_student(chain):
    root, teacher, heads = chain
    hint = run(root, stage="hint", teacher_run=teacher.info["uid"])
    assert hint.status == "COMPLETED" and hint.info["variant"] == "hint: resnet8 -> resnet8"
    hinted = torch.load(Path(hint.info["snapshot_dir"]) / "final.pt", weights_only=True)["model"]
    torch.manual_seed(3)  # the hint run's seed: the student it started from
    fresh = create_model("resnet8", num_classes=4, in_channels=3, width=4).state_dict()
    guided, later = "student.blocks.0.0.body.0.weight", "student.blocks.2.0.body.0.weight"
    assert not torch.equal(hinted[guided], fresh[guided[len("student."):]])  # the guided stage learned the hint
    assert torch.equal(hinted[later], fresh[later[len("student."):]])  # nothing after it gets a gradient
    student = run(root, stage="student", method="fitnets", teacher_run=teacher.info["uid"],
                  hint_run=hint.info["uid"], optim={"lr": 1e-12})  # KD that barely moves: it starts from the hint
    assert student.info["hint"]["uid"] == hint.info["uid"] and student.info["variant"] == "fitnets: resnet8 -> resnet8"
    final = torch.load(Path(student.info["snapshot_dir"]) / "final.pt", weights_only=True)["model"]
    torch.testing.assert_close(final[guided], hinted[guided], atol=1e-6, rtol=0)
    with pytest.raises(RunReferenceError, match="hint_run is needed"):
        run(root, stage="student", method="fitnets", teacher_run=teacher.info["uid"])


def test_takd_distils_through_a_kd_trained_assistant(chain):
    root, teacher, heads = chain
    assistant = run(root, stage="student", method="kd", student_arch="resnet14", teacher_run=teacher.info["uid"])
    student = run(root, stage="student", method="takd", teacher_run=teacher.info["uid"],
                  assistant_run=assistant.info["uid"])
    assert student.status == "COMPLETED" and student.info["variant"] == "takd: resnet8 -> resnet14 -> resnet8"
    assert student.info["assistant"]["uid"] == assistant.info["uid"]
    dih_student = run(root, stage="student", method="dih", teacher_run=teacher.info["uid"], heads_run=heads.info["uid"])
    with pytest.raises(RunReferenceError, match="was trained with method=dih; TAKD's assistant is a student"):
        run(root, stage="student", method="takd", teacher_run=teacher.info["uid"],
            assistant_run=dih_student.info["uid"])
