"""The graph pass: ``match`` finds candidate losses, ``rewrite`` replaces them."""

from .match import Site, find_sites
from .rewrite import rewrite_site

__all__ = ["Site", "find_sites", "rewrite_site"]
