"""The networks that make expert labels, one module each (load, preprocess, to_label);
which expert uses which network is in the table of modalities, common/modalities.py."""

from __future__ import annotations

import importlib

from common.modalities import EXPERTS, label_networks


def generator_network(name: str):
    """The label-generating module of expert `name` (imported on demand: networks are heavy)."""
    expert = EXPERTS[name]
    if expert.network is None:
        raise NotImplementedError(f"no label network for {name!r} yet; implemented: {', '.join(label_networks())}")
    return importlib.import_module(f"experts.{expert.network}")
