"""featcache: run a frozen ViT over a dataset once and keep every tapped block's tokens.

    from featcache import ExtractConfig, extract, open_store
    result = extract(ExtractConfig(model="vit_small", dataset="demo", random_init=True))
    store = open_store(result.path); train = store.split("train")
"""

from .errors import UserError
from .layout import TokenLayout
from .store import FORMAT_VERSION, Store, open_store

# These load torch and timm (seconds): imported when first asked for, so that reading,
# listing and describing stores (`featcache ls`, `info`) starts at once.
_LAZY = {"ExtractConfig": "extraction", "ExtractResult": "extraction", "extract": "extraction",
         "ALIASES": "models", "Backbone": "models", "load_backbone": "models",
         "Dataset": "sources", "open_dataset": "sources"}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'featcache' has no attribute '{name}'")
    import importlib

    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:  # (tab completion lists the lazy names too)
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["ALIASES", "Backbone", "Dataset", "ExtractConfig", "ExtractResult", "FORMAT_VERSION",
           "Store", "TokenLayout", "UserError", "extract", "load_backbone", "open_dataset",
           "open_store"]
