"""The demo: small digits networks, their data, a training loop and plots (``bkn train-demo``, ``bkn demo``).

Not part of the library proper. :mod:`bkn_export.demo.models` and
:mod:`bkn_export.demo.training` need only torch; the digits data needs scikit-learn and
the plots matplotlib, both in the ``[demo]`` extra (``pip install -e ".[demo]"``). They
are imported where they are used, so importing this package, its modules or running
``bkn train-demo --help`` (:mod:`bkn_export.commands.train_demo`) works without them;
using the data or a plot without them raises :class:`DemoDependencyError`, which says what to install.
"""

from __future__ import annotations

__all__ = ["INSTALL_DEMO", "DemoDependencyError", "missing_dependency"]

#: How to install the demo's dependencies (from a checkout of the repository).
INSTALL_DEMO = 'pip install -e ".[demo]"'


class DemoDependencyError(ImportError):
    """A dependency of the demo (scikit-learn, matplotlib) is not installed.

    ``bkn`` commands exit with status 2 on it (an environment problem).
    """

    exit_code = 2


def missing_dependency(distribution: str, needed_for: str, error: ImportError) -> DemoDependencyError:
    """The error to raise (``from error``) when importing ``distribution`` for ``needed_for`` failed."""
    return DemoDependencyError(
        f"{needed_for} needs {distribution}, which is not installed or cannot be imported ({error}); "
        f"install the demo extra: {INSTALL_DEMO} (or pip install 'bkn-export[demo]')"
    )
