"""models/timm_backbone.py: timm models as multi-exit networks (``timm/<name>``), on tiny random-init models.

Stages against timm's own forward, staged execution with samples dropped, per-exit costs against torch's
FlopCounterMode, training steps (summed CE, Phuong & Lampert's distillation, Gradient Equilibrium), weights
(timm's download failing in one line, a local checkpoint loading bit-identically), the registry prefix and the
config rules."""
from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import timm
import torch
import torch.nn.functional as F
from sacred import Experiment
from torch.utils.flop_counter import FlopCounterMode

from conftest import assert_staged_equals_forward_with_samples_dropped, sgd_step_lowers_the_summed_exit_loss
from experiments import multiexit_distillation
from experiments.ingredients import model as model_ing
from experiments.validation import ConfigError, rules_of, validate_run
from losses import PhuongDistillationLoss
from models import count_exit_costs, create_model, list_models
from models.registry import family_of
from models.timm_backbone import TimmMultiExit, timm_multiexit

RESNET = dict(channels=[16, 32, 64, 128])  # timm's resnet18 with narrow stages (its 7x7 stem stays 64 wide)
VIT = dict(patch_size=8, depth=4)  # 16 patches of 8x8 on 32x32 inputs, 4 blocks
# name: (timm kwargs, input shape, stage output shapes); Fashion-MNIST's 1x28x28 for the CNNs that take it
MODELS = {
    "resnet18": (RESNET, (1, 28, 28), [(64, 14, 14), (16, 7, 7), (32, 4, 4), (64, 2, 2), (128, 1, 1)]),
    "mobilenetv3_small_050": ({}, (1, 28, 28), [(16, 14, 14), (8, 7, 7), (16, 4, 4), (24, 2, 2), (288, 1, 1)]),
    "convnext_atto": ({}, (3, 32, 32), [(40, 8, 8), (80, 4, 4), (160, 2, 2), (320, 1, 1)]),
    "vit_tiny_patch16_224": (VIT, (3, 32, 32), [(17, 192)] * 4),  # 16 patch tokens and the class token
}


def tiny(name: str, num_classes: int = 5, **knobs) -> TimmMultiExit:
    kwargs, shape, _ = MODELS[name]
    torch.manual_seed(0)
    return create_model(f"timm/{name}", num_classes=num_classes, in_channels=shape[0], image_size=shape[1],
                        kwargs=kwargs, **knobs)


def batch(name: str, n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(n, *MODELS[name][1], generator=generator)
    return x, torch.arange(n) % 5


# ------------------------------------------------------------------------------------------- stages and exits
@pytest.mark.parametrize("name", list(MODELS))
def test_one_exit_per_feature_stage_with_its_shapes(name):
    model = tiny(name).eval()
    x, _ = batch(name, 2)
    shapes = MODELS[name][2]
    assert model.num_exits == len(shapes) and family_of(f"timm/{name}") == "timm"
    logits, features, _ = model.staged_outputs(x)
    assert [tuple(z.shape) for z in logits] == [(2, 5)] * len(shapes)
    assert [tuple(f.shape[1:]) for f in features] == shapes


def test_exits_pick_feature_stages_and_the_last_must_be_the_final_one():
    model = tiny("resnet18", exits=[1, 4]).eval()
    _, features, _ = model.staged_outputs(batch("resnet18", 2)[0])
    assert model.exits == [1, 4] and [tuple(f.shape[1:]) for f in features] == [(16, 7, 7), (128, 1, 1)]
    for bad in ([1, 3], [2, 1, 4], [0, 5]):
        with pytest.raises(ValueError, match="exits must be increasing feature stages in 0..4 ending with 4"):
            tiny("resnet18", exits=bad)


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv3_small_050", "convnext_atto"])
def test_stages_are_timms_own_intermediate_features(name):
    """The stage slices compute exactly what timm's forward_intermediates returns for the same weights."""
    kwargs, shape, _ = MODELS[name]
    torch.manual_seed(0)
    reference = timm.create_model(name, in_chans=shape[0], num_classes=0, **kwargs).eval()
    model = TimmMultiExit(copy.deepcopy(reference), 5, shape).eval()
    x = batch(name, 3)[0]
    with torch.no_grad():
        expected = reference.forward_intermediates(x, intermediates_only=True)
        _, features, _ = model.staged_outputs(x)
    assert len(features) == len(expected)
    for ours, theirs in zip(features, expected):
        assert torch.equal(ours, theirs)


def test_a_model_whose_forward_is_not_its_children_in_order_is_refused():
    """Registered after the stages, bn1 would be left out of stage 0: the check against timm's own forward sees it."""
    model = timm.create_model("resnet18", num_classes=0, **RESNET)
    bn1 = model.bn1
    del model.bn1
    model.bn1 = bn1
    torch.nn.init.uniform_(bn1.weight, 2.0, 3.0)
    with pytest.raises(ValueError, match="resnet18 is not supported: stage 0 .* differs from timm's forward_inter"):
        TimmMultiExit(model, 5, (3, 32, 32))


def test_vit_exits_read_the_final_norm_and_pool_the_class_token():
    """The last exit's feature vector is timm's pre-logits; earlier exits start with copies of the same norm."""
    torch.manual_seed(0)
    reference = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=0, **VIT).eval()
    model = TimmMultiExit(copy.deepcopy(reference), 5, (3, 32, 32)).eval()
    x = batch("vit_tiny_patch16_224", 3)[0]
    with torch.no_grad():
        expected = reference.forward_head(reference.forward_features(x), pre_logits=True)
        _, _, embeddings = model.staged_outputs(x)
    torch.testing.assert_close(embeddings[-1], expected, rtol=0, atol=0)
    first, last = model.heads[0].features[0], model.heads[-1].features[0]
    assert first is not last and torch.equal(first.weight, last.weight)
    assert model.heads[-1].features[1].pool == "token"


@pytest.mark.parametrize("name", list(MODELS))
def test_staged_execution_equals_forward_with_samples_dropped(name):
    assert_staged_equals_forward_with_samples_dropped(tiny(name).eval(), batch(name, 8)[0])


@pytest.mark.parametrize("head", ["eenet", "msdnet"])
def test_conv_heads_on_feature_maps(head):
    model = tiny("resnet18", head=head).eval()
    logits = model(batch("resnet18", 2)[0])
    assert [tuple(z.shape) for z in logits] == [(2, 5)] * 5
    with pytest.raises(ValueError, match="needs feature maps"):
        tiny("vit_tiny_patch16_224", head=head)


def test_too_small_inputs_and_unsliceable_models_fail_in_one_line():
    with pytest.raises(ValueError, match=r"convnext_atto: stage 3 fails on inputs of shape \(1, 28, 28\)") as err:
        create_model("timm/convnext_atto", num_classes=5, in_channels=1, image_size=28)
    assert "\n" not in str(err.value)
    # ConvNeXt's 2x2 stride-2 downsampling needs 32 px; a dilated last stage takes Fashion-MNIST's 28
    model = create_model("timm/convnext_atto", num_classes=5, in_channels=1, image_size=28,
                         kwargs=dict(output_stride=16))
    assert model.num_exits == 4
    with pytest.raises(ValueError, match="eva02_tiny_patch14_224 is not supported"):
        create_model("timm/eva02_tiny_patch14_224", num_classes=5, kwargs=dict(patch_size=8, depth=1))


# ------------------------------------------------------------------------------------------- costs
def flop_counter_macs(model: TimmMultiExit, shape: tuple[int, ...]) -> list[int]:
    """Half of torch's FLOPs per stage (stem with stage 0, block, exit head), with attention as explicit matmuls
    that it counts (on CPU it does not count the fused kernel)."""
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    macs, state = [], torch.zeros(1, *shape)
    with torch.no_grad():
        for k in range(model.num_exits):
            with FlopCounterMode(display=False) as counter:
                state, _ = model.run_stage(k, model.init_state(state) if k == 0 else state)
            macs.append(counter.get_total_flops() // 2)
    return macs


# FlopCounterMode counts convs and matmuls without bias; models/cost.py also counts Linear biases, ReLU outputs and
# pooling (max-pool k^2 per output, global pooling one per input), so it is above by that share. Measured on these
# models: ResNet 3.9, 3.7, 0.5, 0.2, 0.1% (stage 0: the 1-channel 7x7 stem conv does 49 MACs per output, its ReLU
# and the exit's pooling 1 each; stage 1: the 3x3 max-pool), ViT 0.4% (Linear biases, 1/192 of its Linear work).
@pytest.mark.parametrize("name, tolerance", [("resnet18", 0.05), ("vit_tiny_patch16_224", 0.01)])
def test_per_exit_macs_increase_and_match_torchs_flop_counter(name, tolerance):
    model = tiny(name).eval()
    shape = MODELS[name][1]
    cumulative = count_exit_costs(model, shape).macs
    assert all(b > a for a, b in zip(cumulative, cumulative[1:]))
    ours = [b - a for a, b in zip([0, *cumulative], cumulative)]
    for k, (mine, theirs) in enumerate(zip(ours, flop_counter_macs(model, shape))):
        assert 0 <= mine - theirs <= tolerance * mine, (k, mine, theirs)


# ------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("name", ["resnet18", "vit_tiny_patch16_224"])
def test_sgd_step_lowers_the_summed_exit_loss(name):
    sgd_step_lowers_the_summed_exit_loss(tiny(name), *batch(name), lr=0.05)


def test_phuong_distillation_step_on_a_timm_backbone():
    model = tiny("resnet18")
    x, y = batch("resnet18")
    loss = PhuongDistillationLoss(model.num_exits)
    before = loss(model(x), y)
    before.backward()
    torch.optim.SGD(model.parameters(), lr=0.05).step()
    loss.after_batch(model(x))
    with torch.no_grad():
        assert loss(model(x), y) < before.detach()


@pytest.mark.parametrize("name", ["resnet18", "vit_tiny_patch16_224"])
def test_gradient_equilibrium_on_a_timm_backbone(name):
    """ge_scope='coarsest': block k gets 1/(n-k+1) of the plain summed-loss gradient, heads and forward unchanged,
    and a step still lowers the loss."""
    plain = tiny(name).double()
    ge = tiny(name, ge_scope="coarsest").double()
    ge.load_state_dict(plain.state_dict())
    x, y = batch(name)
    x = x.double()
    out_ge, out_plain = ge(x), plain(x)
    for a, b in zip(out_ge, out_plain):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for outputs in (out_ge, out_plain):
        sum(F.cross_entropy(z, y) for z in outputs).backward()
    n = ge.num_exits
    for k in range(n):
        for (p_name, p_ge), p_plain in zip(ge.blocks[k].named_parameters(), plain.blocks[k].parameters()):
            torch.testing.assert_close(p_ge.grad, p_plain.grad / (n - k), rtol=1e-9, atol=1e-12, msg=p_name)
        for p_ge, p_plain in zip(ge.heads[k].parameters(), plain.heads[k].parameters()):
            torch.testing.assert_close(p_ge.grad, p_plain.grad, rtol=1e-9, atol=1e-12)
    for p_ge, p_plain in zip(ge.stem.parameters(), plain.stem.parameters()):  # the ViT's embedding
        torch.testing.assert_close(p_ge.grad, p_plain.grad / n, rtol=1e-9, atol=1e-12)
    ge.zero_grad()
    sgd_step_lowers_the_summed_exit_loss(ge, x, y, lr=0.05)


# ------------------------------------------------------------------------------------------- weights
def test_timms_pretrained_weights_fail_in_one_line_without_network(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail at once instead of retrying
    with pytest.raises(RuntimeError, match="cannot load timm's pretrained weights for 'resnet18'") as err:
        create_model("timm/resnet18", num_classes=5, pretrained=True)
    assert "\n" not in str(err.value) and "pretrained='/path/to/model.safetensors'" in str(err.value)
    assert err.value.__cause__ is None and err.value.__suppress_context__


@pytest.mark.parametrize("suffix", ["safetensors", "pth"])
def test_a_local_checkpoint_loads_bit_identically(tmp_path, suffix):
    torch.manual_seed(1)
    source = timm.create_model("resnet18", num_classes=7, **RESNET)
    with torch.no_grad():
        for module in source.modules():  # non-trivial buffers, so they are checked too
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
    state = source.state_dict()
    path = tmp_path / f"resnet18.{suffix}"
    if suffix == "safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    model = timm_multiexit("resnet18", num_classes=5, pretrained=str(path), kwargs=RESNET)
    ours = model.state_dict()
    assert set(model.timm_names.values()) == set(state) - {"fc.weight", "fc.bias"}  # all but timm's classifier
    for key, timm_key in model.timm_names.items():  # the BN statistics cannot be a random init's 0 and 1
        assert torch.equal(ours[key], state[timm_key]), key


def test_a_checkpoint_of_another_model_is_refused(tmp_path):
    path = tmp_path / "convnext.pth"
    torch.save(timm.create_model("convnext_atto").state_dict(), path)
    with pytest.raises(ValueError, match="lacks .* of the trunk's tensors .*is it a timm checkpoint of this model"):
        timm_multiexit("resnet18", num_classes=5, pretrained=str(path), kwargs=RESNET)
    with pytest.raises(FileNotFoundError, match="is not a file"):
        timm_multiexit("resnet18", num_classes=5, pretrained=str(tmp_path / "missing.pth"))


# ------------------------------------------------------------------------------------------- registry and config
def test_timm_names_resolve_through_the_registry_without_being_listed():
    assert not [n for n in list_models() if "/" in n] and "timm/resnet18" not in list_models()
    assert family_of("timm/resnet18.a1_in1k") == "timm"  # a pretrained tag is part of a timm name
    with pytest.raises(KeyError, match=r"Unknown architecture 'timm/resnt18'\. Did you mean timm/resnet18"):
        create_model("timm/resnt18", num_classes=5)
    with pytest.raises(KeyError, match="Valid choices: .*resnet110.*, or timm/<a timm model name>"):
        create_model("resnet21", num_classes=5)


def test_importing_models_does_not_import_timm():
    code = "import sys, models; assert 'timm' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def run_config(updates: dict) -> None:
    """Validate as the experiments do, on Phuong & Lampert's experiment with its ``fast`` config."""
    run = Experiment._create_run(multiexit_distillation.ex, named_configs=["fast"], config_updates=updates)
    validate_run(run, rules_of(multiexit_distillation.NAME))


def test_config_accepts_any_timm_name_and_the_timm_knobs():
    run_config({"model.arch": "timm/vit_tiny_patch16_224", "model.timm.kwargs.patch_size": 8,
                "model.timm.exits": [1, 3], "model.timm.pretrained": "/weights/vit.safetensors"})
    run_config({"model.arch": "timm/convnext_atto", "model.timm.head": "eenet", "model.timm.pretrained": True})


@pytest.mark.parametrize("updates, message", [
    ({"model.arch": "timm/resnt18"}, "invalid model.arch='timm/resnt18': expected 'timm/' and the name of a timm "
                                     "model \\(did you mean 'timm/resnet18'"),
    ({"model.arch": "resnet21"}, "expected one of 'bert_exits', .* or 'timm/<a timm model name>' \\(did you mean"),
    ({"model.arch": "timm/resnet18", "model.timm.head": "conv"}, "invalid model.timm.head='conv': expected one of"),
    ({"model.arch": "timm/resnet18", "model.timm.exits": [-1]}, "invalid model.timm.exits=\\[-1\\]"),
    ({"model.arch": "timm/resnet18", "model.timm.kwargs": 3}, "expected a dict of timm.create_model keyword"),
])
def test_config_refuses_unknown_timm_names_with_close_matches_and_bad_knobs(updates, message):
    with pytest.raises(ConfigError, match=message):
        run_config(updates)


def test_the_timm_knobs_pass_through_the_model_ingredient():
    assert set(model_ing.TIMM_KNOBS) == set(model_ing.TIMM_RULES)
    knobs = dict(model_ing.TIMM_KNOBS, exits=[1, 4], head="eenet", kwargs=RESNET)
    model = model_ing.build({"arch": "timm/resnet18", "timm": knobs}, num_classes=3, in_channels=1, image_size=28,
                            ge_scope="coarsest")
    assert isinstance(model, TimmMultiExit) and model.exits == [1, 4] and model.ge_scope == "coarsest"
    assert model.blocks[0].conv1.in_channels == 1 and model.heads[0].classifier.in_features == 16 // 4  # EENet: C/4
    assert [tuple(z.shape) for z in model.eval()(torch.zeros(2, 1, 28, 28))] == [(2, 3), (2, 3)]
