"""ODE, SDE and CDE solvers; the reversible methods (Heun, and Runge-Kutta of any tableau,
fixed or adaptive steps) give backpropagation's gradients in memory constant in the steps."""

from ._base import AbstractSolver as AbstractSolver
from ._interpolation import AbstractInterpolation as AbstractInterpolation
from .adaptive import AdaptiveSteps as AdaptiveSteps
from .brownian import BrownianIncrements as BrownianIncrements
from .brownian_interval import BrownianInterval as BrownianInterval
from .cde import cdeint as cdeint
from .cubic import CubicSpline as CubicSpline
from .cubic import natural_cubic_coeffs as natural_cubic_coeffs
from .euler import Euler as Euler
from .hermite import hermite_cubic_coeffs as hermite_cubic_coeffs
from .linear import LinearInterpolation as LinearInterpolation
from .linear import linear_interpolation_coeffs as linear_interpolation_coeffs
from .midpoint import Midpoint as Midpoint
from .noise import NOISE_TYPES as NOISE_TYPES
from .reversible_heun import ReversibleHeun as ReversibleHeun
from .reversible_rk import ReversibleRK as ReversibleRK
from .rk4 import RK4 as RK4
from .solve import SOLVERS as SOLVERS
from .solve import odeint as odeint
from .solve import sdeint as sdeint
from .tableau import TABLEAUS as TABLEAUS
from .tableau import ButcherTableau as ButcherTableau
