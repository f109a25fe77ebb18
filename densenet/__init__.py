"""DenseNet-BC for distributed ImageNet training.

    import densenet
    model = densenet.create_model("densenet121", num_classes=1000, memory_efficient=True)
"""

from .model import (DenseNet, create_model, densenet121, densenet161, densenet169, densenet201,
                    densenet_bc_100, densenet_tiny)
from .weights import export_torchvision, load_state_dict_file, load_weights
from .zoo import MODEL_SPECS, DenseNetSpec, get_spec, list_models

__all__ = [
    "DenseNet", "DenseNetSpec", "MODEL_SPECS", "create_model", "list_models", "get_spec",
    "densenet121", "densenet169", "densenet201", "densenet161", "densenet_bc_100", "densenet_tiny",
    "load_state_dict_file", "load_weights", "export_torchvision",
]
