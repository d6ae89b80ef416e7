"""Fixed-step ODE, SDE and CDE solvers; reversible Heun gives exact gradients in O(1) memory."""

from ._base import AbstractSolver as AbstractSolver
from ._interpolation import AbstractInterpolation as AbstractInterpolation
from .brownian import BrownianIncrements as BrownianIncrements
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
from .rk4 import RK4 as RK4
from .solve import SOLVERS as SOLVERS
from .solve import odeint as odeint
from .solve import sdeint as sdeint
