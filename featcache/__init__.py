"""featcache: run a frozen ViT over a dataset once and keep every tapped block's tokens.

    from featcache import ExtractConfig, extract, open_store
    result = extract(ExtractConfig(model="vit_small", dataset="demo", random_init=True))
    store = open_store(result.path); train = store.split("train")
"""

from .errors import UserError
from .extract import ExtractConfig, ExtractResult, extract
from .models import ALIASES, Backbone, TokenLayout, load_backbone
from .sources import Dataset, open_dataset
from .store import FORMAT_VERSION, Store, open_store

__all__ = ["ALIASES", "Backbone", "Dataset", "ExtractConfig", "ExtractResult", "FORMAT_VERSION",
           "Store", "TokenLayout", "UserError", "extract", "load_backbone", "open_dataset",
           "open_store"]
