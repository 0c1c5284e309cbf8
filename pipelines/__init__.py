"""Pipelines: compositions of a task's stages. Nothing but the order of stages lives here.

Installed as ``medseg_pipelines`` (a top-level ``pipelines`` would collide with other packages
in site-packages); in a checkout it is this folder. A task without an entry here (one a separate
package registers) runs :func:`pipelines.standard.run`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import reconstruction, standard

#: task name -> ``run(ctx, task)``; segmentation and classification run the standard list.
PIPELINES: dict[str, Callable[[Any, Any], None]] = {
    "segmentation": standard.run,
    "classification": standard.run,
    "reconstruction": reconstruction.run,
}


def pipeline_for(task_name: str) -> Callable[[Any, Any], None]:
    """The stage list of ``task_name``: its own, or the standard one."""
    return PIPELINES.get(task_name, standard.run)


__all__ = ["PIPELINES", "pipeline_for"]
