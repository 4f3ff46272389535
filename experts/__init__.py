"""Frozen expert networks and the registry of expert modalities."""
