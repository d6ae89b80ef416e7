"""The trainable tensors a vector field reaches, found without ``adjoint_params``.

The reversible adjoint returns gradients only for the tensors it is handed. torchdiffeq takes
the parameters of a field that is an ``nn.Module``; a field written as a closure
(``lambda t, y: net(y)``) has none, and its parameters would get no gradient. So the field is
walked: modules give their parameters and the buffers that require grad; functions give what
their closure cells, defaults and the globals their code names hold; bound methods their
object; ``functools.partial`` its function and arguments; containers and plain objects their
items and attributes. Python modules and classes are not entered, the walk is bounded (depth
and number of objects), and whatever it misses is caught when the field is first evaluated:
a trainable tensor the field uses but the walk did not find raises there and names the fix.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Iterable, Iterator

from torch import Tensor, nn

_MAX_DEPTH = 8
_MAX_OBJECTS = 20_000
_MODULE_INTERNALS = frozenset(vars(nn.Module()))


def parameters_of(*fields: object) -> list[Tensor]:
    """The tensors requiring grad that ``fields`` reach, each once, in the order found."""
    found: dict[int, Tensor] = {}
    seen: set[int] = set()
    pending = [(field, 0) for field in reversed(fields)]
    while pending and len(seen) < _MAX_OBJECTS:
        obj, depth = pending.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, Tensor):
            if obj.requires_grad:
                found.setdefault(id(obj), obj)
            continue
        if depth < _MAX_DEPTH:
            pending.extend((child, depth + 1) for child in reversed(list(_children(obj))))
    return list(found.values())


def _children(obj: object) -> Iterable[object]:
    if isinstance(obj, (str, bytes, int, float, complex, bool, type, types.ModuleType)):
        return ()
    if isinstance(obj, nn.Module):
        return _module_children(obj)
    if isinstance(obj, types.FunctionType):
        return _function_children(obj)
    if isinstance(obj, types.MethodType):
        return (obj.__self__, obj.__func__)
    if isinstance(obj, functools.partial):
        return (obj.func, *obj.args, *obj.keywords.values())
    if isinstance(obj, (list, tuple, set, frozenset)):
        return obj
    if isinstance(obj, dict):
        return obj.values()
    if isinstance(obj, (types.BuiltinFunctionType, types.BuiltinMethodType)):
        return ()
    return getattr(obj, "__dict__", {}).values()


def _module_children(module: nn.Module) -> Iterator[object]:
    yield from module.parameters()
    yield from module.buffers()
    for sub in module.modules():  # plain attributes: closures, tensors kept outside _parameters
        yield from (v for k, v in vars(sub).items() if k not in _MODULE_INTERNALS)


def _function_children(fn: types.FunctionType) -> Iterator[object]:
    for cell in fn.__closure__ or ():
        try:
            yield cell.cell_contents
        except ValueError:  # an empty cell: a name bound later in the enclosing scope
            continue
    yield from fn.__defaults__ or ()
    yield from (fn.__kwdefaults__ or {}).values()
    for name in dict.fromkeys(_global_names(fn.__code__)):
        if name in fn.__globals__:
            yield fn.__globals__[name]


def _global_names(code: types.CodeType) -> Iterator[str]:
    yield from code.co_names
    for const in code.co_consts:  # nested functions, lambdas and comprehensions
        if isinstance(const, types.CodeType):
            yield from _global_names(const)
