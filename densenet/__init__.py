"""DenseNet-BC for distributed ImageNet training.

    import densenet
    model = densenet.create_model("densenet121", num_classes=1000, memory_efficient=True)
"""

# Every name is imported on first use (PEP 562), not when the package is:
# - `import densenet.training.config` (train_dist.py's --help and flag errors) and `densenet.specs` need no
#   torch, which takes seconds to import on a cold node;
# - `python -m densenet.weights` runs that module as __main__; a copy already imported by the package
#   would make runpy warn that it may run twice (and it would: two modules, two WeightsError classes).
_EXPORTS = {
    "model": ("DenseNet", "create_model", "densenet121", "densenet161", "densenet169", "densenet201",
              "densenet_bc_100", "densenet_tiny"),
    "specs": ("MODEL_SPECS", "DenseNetSpec", "get_spec", "list_models"),
    "weights": ("WeightsError", "WeightsFile", "export_torchvision", "load_state_dict_file", "load_weights",
                "read_weights"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = [name for names in _EXPORTS.values() for name in names]


def __getattr__(name: str):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
