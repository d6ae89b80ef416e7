"""torchrev: reversible neural networks for PyTorch.

Training a reversible stack stores no per-block activations: backward rebuilds each block's
input from its output and recomputes the block once, and the gradients equal plain autograd's.
"""

from . import ode as ode
from . import pgi as pgi
from ._core.block import AbstractReversibleBlock as AbstractReversibleBlock
from ._core.checks import BlockReport as BlockReport
from ._core.checks import ReversibilityReport as ReversibilityReport
from ._core.checks import check_reversibility as check_reversibility
from ._core.coupling import AbstractCoupling as AbstractCoupling
from ._core.errors import ReversibilityError as ReversibilityError
from ._core.errors import ReversibilityWarning as ReversibilityWarning
from ._core.fit import fit_memory as fit_memory
from ._core.fit import set_memory_budget as set_memory_budget
from ._core.plan import Plan as Plan
from ._core.sequence import ReversibleSequential as ReversibleSequential
from ._core.sharding import fully_shard_stack as fully_shard_stack
from ._core.streams import Concat as Concat
from ._core.streams import Duplicate as Duplicate
from ._core.streams import Mean as Mean
from ._core.streams import ReversibleStage as ReversibleStage
from ._core.streams import Split as Split
from .cli.checkpoint import load_checkpoint as load_checkpoint
from .convert import compare as compare
from .convert import meft as meft
from .convert import rewire as rewire
from .convert import undo as undo
from .couplings import AdditiveCoupling as AdditiveCoupling
from .couplings import AffineCoupling as AffineCoupling
from .couplings import MomentumCoupling as MomentumCoupling
from .couplings import ScaledCoupling as ScaledCoupling
from .models import create_model as create_model
from .models import list_models as list_models

__version__ = "0.1.0"
