"""``CCE_INDUCTOR=1``: turn the rewrite on at ``import torch``, with no import by the user.

PyTorch calls ``autoload`` through the ``torch.backends`` entry point at the
end of ``import torch``.  It reads one environment variable and returns unless
it is set, and it never raises: a failure here would break ``import torch``.
"""

from __future__ import annotations

import os

ENV_VAR = "CCE_INDUCTOR"


def autoload() -> None:
    """Call ``cce_inductor.enable()`` when ``CCE_INDUCTOR`` is set to a true value."""
    if os.environ.get(ENV_VAR, "").strip().lower() not in ("1", "true", "yes", "on"):
        return
    try:
        from .backend import enable

        enable()
    except Exception as error:  # never break `import torch`
        import warnings

        warnings.warn(f"cce_inductor: {ENV_VAR} is set but the rewrite could not be "
                      f"enabled ({type(error).__name__}: {error})", stacklevel=2)
