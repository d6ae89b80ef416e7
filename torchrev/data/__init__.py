"""Small real and generated data sets for the command line and the examples."""

from .digits import load_digits as load_digits
from .sentiment import make_sentiment as make_sentiment
from .shapes2d import make_shapes_detect as make_shapes_detect
from .shapes3d import make_shapes3d as make_shapes3d
from .uea import load_uea as load_uea
