"""The graph input and output names a training-mode export gives a layer's running statistics and posterior.

One declaration for the exporter (:mod:`bkn_export.export.training`) and for ``runtime`` (which feeds and reads
them); imports nothing, so that ``runtime`` can read them without torch. For a layer ``<layer>``:

* ``running_stats_io=True``: graph inputs ``<layer>.running_mean`` / ``<layer>.running_var`` and graph outputs
  ``<layer>.running_mean_out`` / ``<layer>.running_var_out`` (BatchNorm's update of them);
* ``expose_posteriors=True``: graph outputs ``<layer>.posterior_mean`` / ``<layer>.posterior_variance``.
"""

from __future__ import annotations

__all__ = [
    "POSTERIOR_MEAN_SUFFIX",
    "POSTERIOR_VARIANCE_SUFFIX",
    "RUNNING_MEAN_SUFFIX",
    "RUNNING_VAR_SUFFIX",
    "UPDATED_SUFFIX",
    "is_running_statistic_input",
]

RUNNING_MEAN_SUFFIX = ".running_mean"
RUNNING_VAR_SUFFIX = ".running_var"
#: Appended to a running-statistic input's name to name its updated value (an output).
UPDATED_SUFFIX = "_out"
POSTERIOR_MEAN_SUFFIX = ".posterior_mean"
POSTERIOR_VARIANCE_SUFFIX = ".posterior_variance"


def is_running_statistic_input(name: str, output_names: set[str] | frozenset[str]) -> bool:
    """Whether graph input ``name`` is a layer's running statistic: it ends in one of the running suffixes and its
    update (``name`` + :data:`UPDATED_SUFFIX`) is among the graph's outputs."""
    return name.endswith((RUNNING_MEAN_SUFFIX, RUNNING_VAR_SUFFIX)) and name + UPDATED_SUFFIX in output_names
