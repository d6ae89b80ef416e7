"""Convert pretrained models: Re2TAL rewiring, MEFT fine-tuning, undo, comparison."""

from ._replace import undo as undo
from .branches import Adapter as Adapter
from .branches import Call as Call
from .branches import Sublayer as Sublayer
from .families import FAMILIES as FAMILIES
from .families import LayerFamily as LayerFamily
from .lm_loss import chunked_cross_entropy as chunked_cross_entropy
from .lm_loss import chunked_lm_loss as chunked_lm_loss
from .lm_loss import default_chunk_tokens as default_chunk_tokens
from .meft import meft as meft
from .meft import meft_stage as meft_stage
from .report import ConversionReport as ConversionReport
from .report import compare as compare
from .rewire import rewire as rewire
from .saving import adapter_state_dict as adapter_state_dict
from .saving import from_adapters as from_adapters
from .saving import load_adapters as load_adapters
from .saving import save_adapters as save_adapters
