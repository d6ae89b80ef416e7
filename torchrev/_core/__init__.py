"""The engine: the reversible-block contract, the autograd nodes, stacks. Imports only torch."""
