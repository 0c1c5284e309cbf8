"""Pipelines: compositions of a task's stages. Nothing but the order of stages lives here.

Installed as ``medseg_pipelines`` (a top-level ``pipelines`` would collide with other packages
in site-packages); in a checkout it is this folder. Every task runs :func:`standard.run`; what
differs between tasks (which splits are scored) the task itself declares.
"""

from __future__ import annotations

from .standard import run

__all__ = ["run"]
