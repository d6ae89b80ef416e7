"""Couplings: one per file, all on :class:`torchrev.AbstractCoupling`."""

from .additive import AdditiveCoupling as AdditiveCoupling
from .affine import AffineCoupling as AffineCoupling
from .momentum import MomentumCoupling as MomentumCoupling
from .scaled import ScaledCoupling as ScaledCoupling

#: Every coupling torchrev ships; the tests run each one through the engine's invariants.
COUPLINGS = (AdditiveCoupling, ScaledCoupling, AffineCoupling, MomentumCoupling)
