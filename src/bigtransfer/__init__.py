"""bigtransfer: Big Transfer (BiT, Kolesnikov et al. 2020) in PyTorch."""

from .checkpoints import download_pretrained, load_weights, read_checkpoint, save_weights
from .finetuning import finetune
from .models import Architecture, ModelSpec, ResNetV2, create_model, get_model_spec, list_models, register_model
from .runtime import keep_freed_memory

keep_freed_memory()  # CPU speed: large activations reuse heap memory instead of page-faulting (see its docstring)

__version__ = "0.1.0"

# The rest of the public API, imported on first use (PEP 562) so that `import bigtransfer` and every `bit`
# command stay quick.
_LAZY = {"pretrain": "pretraining", "few_shot_sweep": "protocols", "linear_probe": "probe", "run_vtab": "vtab",
         "load_model": "inference", "predict": "inference", "embed": "inference", "export": "inference"}

__all__ = ["finetune", "Architecture", "ModelSpec", "ResNetV2", "create_model", "download_pretrained", "get_model_spec",
           "keep_freed_memory", "list_models", "load_weights", "read_checkpoint", "register_model", "save_weights",
           *_LAZY]


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
