"""The engine: couplings' contract, the reversible autograd node, stacks. Imports only torch."""
