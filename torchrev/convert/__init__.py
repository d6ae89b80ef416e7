"""Convert pretrained models: Re2TAL rewiring, MEFT fine-tuning, undo, comparison."""

from ._replace import undo as undo
from .branches import Adapter as Adapter
from .meft import adapter_state_dict as adapter_state_dict
from .meft import load_adapters as load_adapters
from .meft import meft as meft
from .meft import meft_stage as meft_stage
from .report import ConversionReport as ConversionReport
from .report import compare as compare
from .rewire import rewire as rewire
