"""The networks that make expert labels, one module each, each a `Generator`
following the protocol in experts/network.py; which expert uses which network
is in the table of modalities, common/modalities.py."""

from __future__ import annotations

import importlib

from common.modalities import EXPERTS, label_networks


def generator_class(name: str):
    """The Generator class of expert `name` (its module imported on demand: networks are heavy)."""
    expert = EXPERTS[name]
    if expert.network is None:
        raise NotImplementedError(f"no label network for {name!r}; label networks: {', '.join(label_networks())}")
    return importlib.import_module(f"experts.{expert.network}").Generator


def generator_network(name: str, **options):
    """The label network of expert `name`; `options` go to its Generator (e.g. OCR's
    `clip` text encoder and `lexicon`)."""
    return generator_class(name)(name, **options)
