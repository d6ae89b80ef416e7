"""Reversible model families, one per file, behind one registry."""

from . import gelan, pgi, revcol, revnet, unet3d, vit  # noqa: F401  (each registers its models)
from ._base import AbstractReversibleModel as AbstractReversibleModel
from ._registry import ModelInfo as ModelInfo
from ._registry import create_model as create_model
from ._registry import list_models as list_models
from ._registry import model_info as model_info
from ._registry import register_model as register_model
from .gelan import GELAN as GELAN
from .gelan import GELANPGI as GELANPGI
from .pgi import PGI as PGI
from .revcol import RevCol as RevCol
from .revnet import RevNet as RevNet
from .unet3d import UNet3D as UNet3D
from .vit import RevViT as RevViT
