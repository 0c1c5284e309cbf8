"""Manifests, integrity checks and datasets."""
