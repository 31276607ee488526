"""The graph pass: ``match`` finds sites, ``rewrite`` replaces them.

``consumers`` says what is matched, ``steps`` what may lie between the linear
and a consumer, ``site`` holds the records, ``rewrite`` what replaces them.
"""

from .match import find_sites
from .rewrite import rewrite_site
from .site import Site

__all__ = ["Site", "find_sites", "rewrite_site"]
