"""Multi-exit backbones, the registry that builds them by name, and their cost."""
# importing a backbone module registers its builders
from models import (bert, densenet, msdnet, resnet_bottleneck, resnet_cifar, resnet_imagenet,  # noqa: F401
                    t2t_vit, timm_backbone, vgg, wide_resnet)
from models.imta import IMTANetwork, build_imta
from models.cost import count_exit_costs, measure_exit_latency
from models.multiexit import ExitHead, MultiExitNetwork, select_state
from models.registry import create_model, list_models, register_model

__all__ = [
    "ExitHead",
    "IMTANetwork",
    "build_imta",
    "MultiExitNetwork",
    "count_exit_costs",
    "create_model",
    "list_models",
    "measure_exit_latency",
    "register_model",
    "select_state",
]
