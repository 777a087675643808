"""The local model store: names, manifests, content-addressed blobs and the registry.

Public API (see docs/ARCHITECTURE.md, "Store")::

    open_store(home=None) -> Store
    Store.register(name, *, model, mmproj=None, template=None, params=None, source=None,
                   license=None, move=False, link=True, template_hint=None, family=None)
    Store.resolve(name) -> ModelRecord
    parse_name(raw) -> ModelName
    load_registry(home=None) -> Registry
"""

from mmchat.store.names import DEFAULT_TAG, InvalidNameError, ModelName, parse_name
from mmchat.store.registry import Registry, RegistryEntry, Source, load_registry
from mmchat.store.store import ModelRecord, PartRef, Store, open_store

__all__ = [
    "DEFAULT_TAG",
    "InvalidNameError",
    "ModelName",
    "ModelRecord",
    "PartRef",
    "Registry",
    "RegistryEntry",
    "Source",
    "Store",
    "load_registry",
    "open_store",
    "parse_name",
]
