"""YOLOv9's programmable gradient information with a reversible auxiliary branch.

The public names of :mod:`torchrev.models.pgi`: :class:`PGI` wraps a multi-level main model,
:meth:`PGI.strip` gives it back for inference.
"""

from .models.pgi import PGI as PGI
from .models.pgi import AuxiliaryColumns as AuxiliaryColumns
from .models.pgi import CBFuse as CBFuse
from .models.pgi import CBLinear as CBLinear
from .models.pgi import FusedLevel as FusedLevel
from .models.pgi import MultiLevel as MultiLevel

__all__ = ["PGI", "AuxiliaryColumns", "CBFuse", "CBLinear", "FusedLevel", "MultiLevel"]
