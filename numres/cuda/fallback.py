"""The generic op stands in for a kernel whenever a call asks for more than the kernel does.

Each kernel in this package implements one generic op of :mod:`numres.functional` for the
arguments and inputs numres's models use.  The generic ops grow (new keyword arguments such as
``ignore_index`` or ``return_indices``, ``None`` weights, empty batches) faster than the
kernels, so every registered kernel is wrapped by :func:`kernel_op`, which decides per call:

* the call binds only the kernel's own parameters (the fast path: no inspection at all when
  every keyword is one the kernel knows) -> the kernel runs;
* the call passes an argument the kernel does not have, with a value other than the generic
  op's default -> the **generic op** runs, with the call's arguments exactly as given;
* the kernel's own ``usable(*args, **kwargs)`` test says no (empty input, a ``None`` the kernel
  cannot take, ...) -> the generic op runs.

Backward ops are special: a backward called with a *kernel* cache cannot hand that cache to the
generic op (it does not know the format).  Extra arguments there raise a clear ``TypeError``
unless the kernel handles them itself; a backward called with a generic cache (its forward fell
back) always goes to the generic op.  The generic op is imported from its module, never looked
up through :mod:`numres.functional.dispatch` (that would find this wrapper again).
"""
from __future__ import annotations

import functools
import inspect

_SIMPLE_DEFAULTS = (bool, int, float, str, type(None))


def _is_default(value, default) -> bool:
    """Whether ``value`` is the parameter's default: the same object, or an equal plain scalar."""
    if value is default:
        return True
    if default is inspect.Parameter.empty:
        return False
    if isinstance(default, _SIMPLE_DEFAULTS) and isinstance(value, _SIMPLE_DEFAULTS) and not (
            value is None or default is None):
        return type(value) is type(default) and value == default
    return False


@functools.lru_cache(maxsize=None)
def _signature(function):
    return inspect.signature(function)


def split_arguments(generic_function, kernel_parameters, args, kwargs):
    """``(foreign, args, kwargs)`` for one call.

    ``foreign`` maps the arguments the kernel does not take, and that are not the generic op's
    defaults, to their values (empty: the kernel can run); arguments the generic op does not know
    either are reported too, so that the generic op raises its own error for them.  ``args`` and
    ``kwargs`` are the call for the kernel, without the arguments it does not take.
    """
    if len(args) <= len(kernel_parameters) and all(name in kernel_parameters for name in kwargs):
        return {}, args, kwargs
    signature = _signature(generic_function)
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError:
        return {"<arguments>": (args, kwargs)}, args, kwargs
    foreign, own = {}, {}
    for name, value in bound.arguments.items():
        parameter = signature.parameters[name]
        if name in kernel_parameters and parameter.kind not in (inspect.Parameter.VAR_KEYWORD,
                                                                 inspect.Parameter.VAR_POSITIONAL):
            own[name] = value
        elif parameter.kind is inspect.Parameter.VAR_KEYWORD:
            foreign.update(value)
        elif parameter.kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                foreign[name] = value
        elif not _is_default(value, parameter.default):
            foreign[name] = value
    return foreign, (), own


def kernel_op(generic_function, usable=None, cache_type=None):
    """Decorate a kernel version of ``generic_function`` with the fall-back rules above.

    ``usable(*args, **kwargs) -> bool`` (optional) vetoes the kernel for a call the kernel's
    parameters accept but its implementation does not (empty batch, ``None`` weight).
    ``cache_type`` marks a backward op: its second positional argument (or ``cache=``) is the
    forward's cache, and only a cache of this type belongs to the kernel.
    """
    def decorate(kernel_function):
        kernel_parameters = tuple(inspect.signature(kernel_function).parameters)

        @functools.wraps(kernel_function)
        def op(*args, **kwargs):
            if cache_type is not None:
                cache = args[1] if len(args) > 1 else kwargs.get("cache")
                if not isinstance(cache, cache_type):
                    return generic_function(*args, **kwargs)
                foreign, args, kwargs = split_arguments(generic_function, kernel_parameters, args, kwargs)
                if foreign:
                    raise TypeError(
                        f"{generic_function.__name__}: the CUDA kernel's forward made this cache, and the "
                        f"kernel's backward does not take {sorted(foreign)}; call the forward with an "
                        f"argument the kernel does not support (so the generic op runs both passes), or set "
                        f"NUMRES_CUDA_KERNELS=0")
                return kernel_function(*args, **kwargs)
            foreign, own_args, own_kwargs = split_arguments(generic_function, kernel_parameters, args, kwargs)
            if foreign or (usable is not None and not usable(*own_args, **own_kwargs)):
                return generic_function(*args, **kwargs)
            return kernel_function(*own_args, **own_kwargs)

        op.generic = generic_function
        op.kernel = kernel_function
        return op
    return decorate
