"""Fixed-step ODE and SDE solvers; reversible Heun gives exact gradients in O(1) memory."""

from ._base import AbstractSolver as AbstractSolver
from .brownian import BrownianIncrements as BrownianIncrements
from .euler import Euler as Euler
from .midpoint import Midpoint as Midpoint
from .reversible_heun import ReversibleHeun as ReversibleHeun
from .rk4 import RK4 as RK4
from .solve import SOLVERS as SOLVERS
from .solve import odeint as odeint
from .solve import sdeint as sdeint
