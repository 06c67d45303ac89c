"""Module and Parameter: the stateful layer of numres.

A :class:`Module` owns parameters, buffers and child modules, as in PyTorch, but
there is no autograd: every module has a ``forward`` that saves what its gradient
needs (its *cache*, through :meth:`Module.save_for_backward`) and a
``backward(grad_output)`` that

* accumulates ``param.grad`` for each of its parameters (``+=``, as PyTorch does;
  a frozen parameter, ``requires_grad=False``, gets none), and
* returns the gradient with respect to its input.

A container's backward calls its children's backward in reverse order.

**Caches live for one backward.**  When a module's backward has finished, its cache
is freed, so memory falls as backward walks back through the network (a ResNet's
saved activations go one block at a time).  A second backward without a new forward
therefore raises a clear RuntimeError, as PyTorch's does, instead of adding the
gradients twice.  ``model.backward(dy, retain_graph=True)`` keeps every cache
(the flag holds for each module whose backward runs inside that call).

Under :func:`no_grad`, forward keeps no cache (inference uses less memory) and
backward is unavailable.
"""
from __future__ import annotations

import contextlib
import functools
from collections import OrderedDict
from typing import NamedTuple

import numpy as np

from .. import backend as B
from ..config import is_reference_mode
from ..functional.dispatch import ops_for

_grad_enabled = True
_retain_graph = False        # True while a backward(..., retain_graph=True) runs: no cache is freed


@contextlib.contextmanager
def no_grad():
    """Within this block, forward passes keep nothing for backward."""
    global _grad_enabled
    previous, _grad_enabled = _grad_enabled, False
    try:
        yield
    finally:
        _grad_enabled = previous


def is_grad_enabled() -> bool:
    return _grad_enabled


_parameter_version = 0       # bumped whenever parameters or buffers may have changed (see parameters_changed)


def parameters_changed() -> None:
    """Note that parameters or buffers may have new values.  ``train()``/``eval()``, ``load_state_dict``,
    ``to()`` and every optimizer ``step()`` call it; anything derived from parameter values and kept
    (the folded BatchNorm weights of :mod:`numres.nn.fusion`) is remade when the count has moved."""
    global _parameter_version
    _parameter_version += 1


def parameter_version() -> int:
    """How many times :func:`parameters_changed` has been called."""
    return _parameter_version


class Parameter:
    """A learnable array (``data``) and the gradient accumulated into it (``grad``, None until backward).

    ``requires_grad = False`` freezes it, as in PyTorch: backward computes no gradient for it (a
    layer skips that weight-gradient GEMM) and optimizers leave it alone.
    """

    __slots__ = ("data", "grad", "requires_grad")

    def __init__(self, data, requires_grad: bool = True):
        self.data = data
        self.grad = None
        self.requires_grad = bool(requires_grad)

    @property
    def shape(self):
        return self.data.shape

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def size(self):
        return self.data.size

    def numel(self) -> int:
        """The number of elements, as ``torch.Tensor.numel()``: ``sum(p.numel() for p in model.parameters())``."""
        return int(self.data.size)

    def requires_grad_(self, requires_grad: bool = True):
        """Freeze (False) or unfreeze (True) this parameter in place; returns it, as PyTorch's does."""
        self.requires_grad = bool(requires_grad)
        return self

    def accumulate_grad(self, gradient):
        """``grad += gradient``; the first gradient is adopted as it is (backward returns fresh arrays)."""
        if gradient is None or not self.requires_grad:
            return
        if self.grad is None:
            self.grad = gradient
        else:
            self.grad += gradient

    def __repr__(self):
        return f"Parameter(shape={tuple(self.shape)}, dtype={self.dtype})"


class IncompatibleKeys(NamedTuple):
    missing_keys: list
    unexpected_keys: list


class StateDictError(KeyError):
    """``load_state_dict`` found keys or shapes that do not fit the model."""

    def __str__(self):
        return self.args[0]


class HookHandle:
    """Returned by the ``register_*_hook`` methods; ``remove()`` detaches the hook."""

    _next_id = 0

    def __init__(self, hooks: dict):
        self._hooks = hooks
        self.id = HookHandle._next_id
        HookHandle._next_id += 1

    def remove(self):
        self._hooks.pop(self.id, None)


def _wrap_backward(backward):
    """Wrap a subclass's ``backward`` with what every backward shares.

    Around the layer's own code, the wrapper

    1. checks the upstream gradient against the last output (backend, shape, dtype);
    2. takes ``retain_graph`` off the arguments: when given, it holds for this module and for
       every module whose backward runs inside this call (the children of a model);
    3. feeds the gradient of an unbatched forward (a ``(C, H, W)`` layer output, a model's
       ``(num_classes,)`` logits) in as a batch of one, and drops that axis from the input gradient;
    4. frees the module's cache once its backward has succeeded, unless retained;
    5. runs the full backward hooks, which may replace the input gradient.

    A subclass's backward that calls ``super().backward(...)`` is wrapped twice; the inner
    call only runs the layer code.
    """

    @functools.wraps(backward)
    def wrapped_backward(self, grad_output=None, *args, retain_graph=None, **kwargs):
        global _retain_graph
        state = self.__dict__
        if state.get("_running_backward", False):          # super().backward(...) inside a backward
            return backward(self, grad_output, *args, **kwargs)
        self.check_grad_output(grad_output)
        outer_retain = _retain_graph
        if retain_graph is not None:
            _retain_graph = bool(retain_graph)
        retain = _retain_graph
        state["_running_backward"] = True
        try:
            if state.get("_unbatched", False):
                grad_input = _drop_batch_dim(backward(self, _restore_batch_dim(grad_output), *args, **kwargs))
            else:
                grad_input = backward(self, grad_output, *args, **kwargs)
        finally:
            state["_running_backward"] = False
            _retain_graph = outer_retain
        if not retain:
            self._free_cache()
        for hook in list(self._backward_hooks.values()):
            replaced = hook(self, (grad_input,), (grad_output,))
            if replaced is not None:
                grad_input = replaced[0]
        return grad_input

    wrapped_backward.is_wrapped_backward = True
    return wrapped_backward


def _to_arguments(args, backend, device, dtype):
    """Sort :meth:`Module.to`'s arguments into a canonical backend name and a ``np.dtype`` (either may be None)."""
    if len(args) > 2:
        raise TypeError(f"Module.to() takes at most a backend and a dtype, got {len(args)} positional arguments")
    if backend is not None and device is not None:
        raise TypeError("Module.to() got both backend= and device=; they are the same thing, give one")
    backend = device if backend is None else backend
    for arg in args:
        if arg is None:
            continue
        if B.is_backend_name(arg):
            if backend is not None:
                raise TypeError(f"Module.to() got two backends, {backend!r} and {arg!r}")
            backend = arg
            continue
        if isinstance(arg, str) and not _names_a_dtype(arg):
            raise ValueError(f"Module.to(): unknown backend {arg!r}, and not a dtype either; give a backend "
                             f"('numpy', 'cupy', or the device names 'cpu', 'cuda') or a dtype ('float32', 'float64')")
        if dtype is not None:
            raise TypeError(f"Module.to() got two dtypes, {dtype!r} and {arg!r}")
        dtype = arg
    return (None if backend is None else B.normalize_backend(backend),
            None if dtype is None else B.normalize_dtype(dtype))


def _names_a_dtype(text: str) -> bool:
    try:
        np.dtype(text)
    except TypeError:
        return False
    return True


def _add_batch_dim(value):
    """``(C, H, W)`` arrays (alone or in a tuple) as ``(1, C, H, W)`` views; anything else unchanged."""
    if isinstance(value, tuple):
        return tuple(_add_batch_dim(item) for item in value)
    return value[None] if getattr(value, "ndim", None) == 3 else value


def _restore_batch_dim(value):
    """The upstream gradient of an unbatched forward, whose output lost its batch axis: that axis put back
    on every array (``(C, H, W) -> (1, C, H, W)``, a model's ``(K,) -> (1, K)``)."""
    if isinstance(value, tuple):
        return tuple(_restore_batch_dim(item) for item in value)
    return value[None] if getattr(value, "ndim", None) is not None else value


def _drop_batch_dim(value):
    """The inverse of :func:`_add_batch_dim` on a layer's result: ``(1, ...)`` arrays lose their first axis."""
    if isinstance(value, tuple):
        return tuple(_drop_batch_dim(item) for item in value)
    return value[0] if getattr(value, "ndim", 0) >= 1 else value


class Module:
    """Base class of every layer and model.

    Subclasses call ``super().__init__(backend=..., dtype=...)`` first, then assign
    :class:`Parameter` objects, child modules and buffers (:meth:`register_buffer`)
    as attributes; the assignments are recorded in order, which fixes the names and
    order of :meth:`named_parameters` and :meth:`state_dict`.

    ``backend`` is ``"numpy"`` or ``"cupy"``; PyTorch's device names ``"cpu"`` and ``"cuda"``
    are accepted as aliases and stored as the canonical name.

    A 2-D layer that sets ``accepts_unbatched = True`` also takes an unbatched ``(C, H, W)``
    input, as PyTorch's do: ``__call__`` runs it as a batch of one and drops the batch axis
    from the output, and ``backward`` does the same with the gradient.

    A subclass's ``backward`` is wrapped automatically (see :func:`_wrap_backward`):
    it accepts ``retain_graph=True``, frees the cache when done, and runs backward hooks.
    """

    accepts_unbatched = False

    def __init__(self, *, backend: str = "numpy", dtype="float32"):
        backend = B.normalize_backend(backend)
        B.get_xp(backend)    # fail now, with a clear message, if the backend is unusable
        d = self.__dict__
        d["_parameters"] = OrderedDict()
        d["_buffers"] = OrderedDict()
        d["_modules"] = OrderedDict()
        d["_forward_hooks"] = OrderedDict()
        d["_forward_pre_hooks"] = OrderedDict()
        d["_backward_hooks"] = OrderedDict()
        d["backend"] = backend
        d["dtype"] = B.normalize_dtype(dtype)
        d["training"] = True
        d["_cache"] = None
        d["_cache_freed"] = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        backward = cls.__dict__.get("backward")
        if backward is not None and not getattr(backward, "is_wrapped_backward", False):
            cls.backward = _wrap_backward(backward)

    # --- attribute bookkeeping ----------------------------------------------------------------

    def __setattr__(self, name, value):
        if "_parameters" not in self.__dict__:
            raise AttributeError(f"call Module.__init__() before assigning {name!r} in {type(self).__name__}")
        if isinstance(value, Parameter):
            self._modules.pop(name, None)
            self._parameters[name] = value
        elif isinstance(value, Module):
            self._parameters.pop(name, None)
            self._modules[name] = value
        elif name in self._buffers:
            self._buffers[name] = value
        else:
            self._parameters.pop(name, None)
            self._modules.pop(name, None)
        object.__setattr__(self, name, value)

    def register_buffer(self, name: str, array) -> None:
        """Record ``array`` as state that is saved in the state dict but not learned."""
        self._buffers[name] = array
        object.__setattr__(self, name, array)

    @property
    def xp(self):
        """The array module (numpy or cupy) this module computes with."""
        return B.get_xp(self.backend)

    @property
    def ops(self):
        """The functional ops for this module's backend (generic array code, or a registered kernel)."""
        return ops_for(self.backend)

    # --- running ------------------------------------------------------------------------------

    def forward(self, x):
        """Compute the output and :meth:`save_for_backward` what backward will need."""
        raise NotImplementedError(f"{type(self).__name__} has no forward")

    def backward(self, grad_output):
        """Accumulate the parameters' gradients and return ``dL/dinput`` (read the cache, never change it).

        Every subclass's backward also takes ``retain_graph=True`` (see :func:`_wrap_backward`)."""
        raise NotImplementedError(f"{type(self).__name__} has no backward")

    def __call__(self, *inputs, **kwargs):
        """``forward`` between the forward pre-hooks and hooks; remembers the output's shape and dtype,
        which the upstream gradient of the next backward must have."""
        for hook in list(self._forward_pre_hooks.values()):
            replaced = hook(self, inputs)
            if replaced is not None:
                inputs = replaced if isinstance(replaced, tuple) else (replaced,)
        unbatched = self.accepts_unbatched and getattr(inputs[0] if inputs else None, "ndim", None) == 3
        self.__dict__["_unbatched"] = unbatched
        if unbatched:
            # PyTorch's 2-D layers take an unbatched (C, H, W) input: run it as a batch of one.
            y = _drop_batch_dim(self.forward(*_add_batch_dim(inputs), **kwargs))
        else:
            y = self.forward(*inputs, **kwargs)
        for hook in list(self._forward_hooks.values()):
            replaced = hook(self, inputs, y)
            if replaced is not None:
                y = replaced
        self.__dict__["_output_signature"] = (tuple(y.shape), y.dtype) if hasattr(y, "shape") else None
        return y

    def check_grad_output(self, grad_output):
        """The upstream gradient must have the backend, shape and dtype of the last output (no silent
        broadcast, no raw array-library error)."""
        signature = self.__dict__.get("_output_signature")
        if signature is None or grad_output is None or not hasattr(grad_output, "shape") \
                or isinstance(grad_output, np.generic):           # a host scalar such as np.float32(2)
            return
        if not isinstance(grad_output, self.xp.ndarray):
            raise TypeError(f"{type(self).__name__}.backward() got a {type(grad_output).__module__}."
                            f"{type(grad_output).__name__} gradient, but the module is on backend {self.backend!r}")
        shape, dtype = signature
        if tuple(grad_output.shape) != shape:
            raise ValueError(f"{type(self).__name__}.backward() got a gradient of shape {tuple(grad_output.shape)}, "
                             f"but its output had shape {shape}")
        if grad_output.dtype != dtype:
            raise TypeError(f"{type(self).__name__}.backward() got a gradient of dtype {grad_output.dtype}, "
                            f"but its output had dtype {dtype}")

    def save_for_backward(self, cache):
        """Keep ``cache`` for the next backward, unless gradients are disabled."""
        self.__dict__["_cache"] = cache if _grad_enabled else None
        self.__dict__["_cache_freed"] = False
        self.__dict__["_cache_in_reference_mode"] = is_reference_mode()

    def saved_cache(self):
        """The cache of the last forward; a clear error when there is none (never run, or already used)."""
        if self._cache is None:
            if self._cache_freed:
                raise RuntimeError(
                    f"{type(self).__name__}.backward() called a second time after its saved cache was freed; "
                    f"run forward again, or pass retain_graph=True to the first backward")
            raise RuntimeError(
                f"{type(self).__name__}.backward() called before forward() "
                f"(or the forward ran under numres.no_grad(), or the module was moved with .to() since)")
        if self.__dict__.get("_cache_in_reference_mode", False) != is_reference_mode():
            inside = "inside" if self._cache_in_reference_mode else "outside"
            raise RuntimeError(
                f"{type(self).__name__}.backward(): its forward ran {inside} numres.reference_mode() and its "
                f"backward does not; run a forward and its backward in the same mode")
        return self._cache

    def _free_cache(self):
        """Let the last forward's cache go (called when this module's backward is done)."""
        if self._cache is not None:
            self.__dict__["_cache"] = None
            self.__dict__["_cache_freed"] = True

    def check_input(self, x, ndim=4, channels=None, what="input"):
        """Raise a clear error when ``x`` has the wrong backend, dtype, rank or channel count."""
        array_type = self.xp.ndarray
        if not isinstance(x, array_type):
            raise TypeError(f"{type(self).__name__} is on backend {self.backend!r} and expects a "
                            f"{array_type.__module__}.ndarray {what}, got {type(x).__module__}.{type(x).__name__}")
        if x.dtype.kind != "f":
            raise TypeError(f"{type(self).__name__} expects a floating-point {what}, got dtype {x.dtype}; "
                            f"convert the {what} with .astype({self.dtype.name!r}) (images: scale them to [0, 1] "
                            f"first)")
        if x.dtype != self.dtype and any(p is not None for p in self._parameters.values()):
            # Layers without parameters (pools, ReLU, Flatten) follow their input's dtype, as PyTorch's do.
            raise TypeError(f"{type(self).__name__} has dtype {self.dtype} but got {what} of dtype {x.dtype}; "
                            f"convert the {what} with .astype({self.dtype.name!r}) or the model with "
                            f".to(dtype={x.dtype.name!r})")
        if ndim is not None and x.ndim != ndim:
            layout = " (N, C, H, W)" if ndim == 4 else ""
            if ndim == 4 and self.accepts_unbatched:
                layout += " or an unbatched 3-D (C, H, W) one"
            raise ValueError(f"{type(self).__name__} expects a {ndim}-D {what}{layout}, got shape {tuple(x.shape)}")
        if channels is not None and x.shape[1] != channels:
            raise ValueError(f"{type(self).__name__} expects {channels} channels, got {x.shape[1]} "
                             f"({what} shape {tuple(x.shape)})")

    # --- hooks --------------------------------------------------------------------------------

    def register_forward_hook(self, hook) -> HookHandle:
        """``hook(module, inputs, output)`` after each forward; a non-None return replaces the output."""
        handle = HookHandle(self._forward_hooks)
        self._forward_hooks[handle.id] = hook
        return handle

    def register_forward_pre_hook(self, hook) -> HookHandle:
        """``hook(module, inputs)`` before each forward; a non-None return replaces the input."""
        handle = HookHandle(self._forward_pre_hooks)
        self._forward_pre_hooks[handle.id] = hook
        return handle

    def register_full_backward_hook(self, hook) -> HookHandle:
        """``hook(module, grad_input, grad_output)`` after each backward; a non-None return replaces grad_input."""
        handle = HookHandle(self._backward_hooks)
        self._backward_hooks[handle.id] = hook
        return handle

    # --- traversal ----------------------------------------------------------------------------

    def apply(self, fn):
        """Call ``fn(module)`` on every submodule, children before their parent and ``self`` last, as
        PyTorch's ``Module.apply`` does (``model.apply(init_weights)``); returns ``self``."""
        for child in self.children():
            child.apply(fn)
        fn(self)
        return self

    def named_children(self):
        return iter(self._modules.items())

    def children(self):
        return iter(self._modules.values())

    def named_modules(self, prefix="", remove_duplicate=True):
        """``(dotted name, module)`` for this module and every descendant; a module reachable by two
        paths is listed once unless ``remove_duplicate=False`` (state dicts list it under each)."""
        seen = set()

        def walk(module, name):
            if remove_duplicate:
                if id(module) in seen:
                    return
                seen.add(id(module))
            yield name, module
            for child_name, child in module._modules.items():
                yield from walk(child, f"{name}.{child_name}" if name else child_name)

        yield from walk(self, prefix)

    def modules(self):
        for _, module in self.named_modules():
            yield module

    def named_parameters(self, prefix="", recurse=True):
        """Every parameter once (a shared one under its first name), so an optimizer updates it once."""
        seen = set()
        modules = self.named_modules(prefix) if recurse else [(prefix, self)]
        for module_name, module in modules:
            for name, param in module._parameters.items():
                if id(param) not in seen:
                    seen.add(id(param))
                    yield (f"{module_name}.{name}" if module_name else name), param

    def parameters(self, recurse=True):
        for _, param in self.named_parameters(recurse=recurse):
            yield param

    def named_buffers(self, prefix="", recurse=True):
        modules = self.named_modules(prefix) if recurse else [(prefix, self)]
        for module_name, module in modules:
            for name, buffer in module._buffers.items():
                if buffer is not None:
                    yield (f"{module_name}.{name}" if module_name else name), buffer

    def buffers(self, recurse=True):
        for _, buffer in self.named_buffers(recurse=recurse):
            yield buffer

    # --- modes and gradients --------------------------------------------------------------------

    def train(self, mode: bool = True):
        for module in self.modules():
            module.__dict__["training"] = bool(mode)
        parameters_changed()            # eval() refolds BatchNorm (numres.nn.fusion) after hand-made changes
        return self

    def eval(self):
        return self.train(False)

    def zero_grad(self, set_to_none: bool = True):
        """Forget accumulated gradients (``grad = None``, or zeros with ``set_to_none=False``)."""
        for param in self.parameters():
            if set_to_none or param.grad is None:
                param.grad = None
            else:
                param.grad[...] = 0

    def requires_grad_(self, requires_grad: bool = True):
        """Freeze (False) or unfreeze (True) every parameter of this module and its children; returns self.

        A frozen parameter gets no gradient (its layer skips the weight-gradient GEMM) and
        optimizers leave it alone; it is still listed by :meth:`parameters` and saved in the
        state dict, as in PyTorch.  Fine-tuning a classifier only::

            model.requires_grad_(False); model.fc.requires_grad_(True)
        """
        for param in self.parameters():
            param.requires_grad = bool(requires_grad)
        return self

    # --- backend and dtype ------------------------------------------------------------------------

    def to(self, *args, backend=None, dtype=None, device=None):
        """Move every parameter, gradient and buffer to a backend and/or dtype, in place; returns self.

        As PyTorch's ``Module.to``, it takes a backend (or device) and a dtype, positionally
        or by keyword, each optional::

            model.to("cupy"); model.to("cuda"); model.to(device="cpu")      # "cpu"/"cuda": numpy/cupy
            model.to("float64"); model.to(np.float64); model.to(dtype="float32")
            model.to("cuda", "float32")

        A positional string is a backend when it names one (``numpy``, ``cupy``, ``cpu``, ``cuda``,
        ``cuda:N``), otherwise a dtype; ``float32`` and ``float64`` are the dtypes numres computes in
        (``torch.float64`` and ``torch.device`` work too).  Memory layout is kept (channels-last
        weights stay so); integer buffers (``num_batches_tracked``) keep their dtype; caches of an
        earlier forward are dropped.
        """
        backend, dtype = _to_arguments(args, backend, device, dtype)
        backend = backend or self.backend
        B.get_xp(backend)
        for module in self.modules():
            target_dtype = dtype or module.dtype
            for param in module._parameters.values():
                param.data = B.convert(param.data, backend, target_dtype)
                if param.grad is not None:
                    param.grad = B.convert(param.grad, backend, target_dtype)
            for name, buffer in list(module._buffers.items()):
                if buffer is not None:
                    keep_integer = np.issubdtype(buffer.dtype, np.integer)
                    module.register_buffer(name, B.convert(buffer, backend, None if keep_integer else target_dtype))
            module.__dict__["backend"] = backend
            module.__dict__["dtype"] = target_dtype
            module.__dict__["_cache"] = None
            module.__dict__["_cache_freed"] = False
        parameters_changed()
        return self

    def cpu(self):
        """``to("numpy")``, under PyTorch's name."""
        return self.to("numpy")

    def cuda(self, device=None):
        """``to("cupy")``, under PyTorch's name; ``device`` (an index or ``"cuda:N"``) must be CuPy's current GPU.

        Where CuPy or a GPU is missing this raises :class:`numres.backend.BackendUnavailableError`.
        """
        return self.to("cuda" if device is None else f"cuda:{device}" if isinstance(device, int) else device)

    def float(self):
        """``to(dtype="float32")``, under PyTorch's name."""
        return self.to(dtype="float32")

    def double(self):
        """``to(dtype="float64")``, under PyTorch's name."""
        return self.to(dtype="float64")

    # --- state ------------------------------------------------------------------------------------

    def state_dict(self):
        """Parameters and buffers by their dotted names, each module's own first, then its children's."""
        state = OrderedDict()
        for module_name, module in self.named_modules(remove_duplicate=False):
            for name, param in module._parameters.items():
                state[f"{module_name}.{name}" if module_name else name] = param.data
            for name, buffer in module._buffers.items():
                if buffer is not None:
                    state[f"{module_name}.{name}" if module_name else name] = buffer
        return state

    def load_state_dict(self, state_dict, strict: bool = True):
        """Copy values into this module's arrays (keeping their dtype, backend and layout).

        Any shape mismatch, and with ``strict`` any missing or unexpected key, raises one
        :class:`StateDictError` that lists them all; nothing is copied in that case.
        """
        targets = {}
        for module_name, module in self.named_modules(remove_duplicate=False):
            for name in list(module._parameters) + [b for b, v in module._buffers.items() if v is not None]:
                targets[f"{module_name}.{name}" if module_name else name] = (module, name)
        # Checkpoints from before PyTorch 1.0 (torchvision's original ResNet weights) have no
        # num_batches_tracked; like PyTorch, such a counter starts again from 0.
        untracked = [key for key in targets if key.endswith("num_batches_tracked") and key not in state_dict]
        missing = [key for key in targets if key not in state_dict and key not in untracked]
        unexpected = [key for key in state_dict if key not in targets]
        mismatched, unreadable, values = [], [], []
        for key, (module, name) in targets.items():
            if key not in state_dict:
                continue
            current = module._parameters[name].data if name in module._parameters else module._buffers[name]
            try:
                value = B.asarray(state_dict[key], self.backend).astype(current.dtype, copy=False)
            except (TypeError, ValueError) as exc:
                unreadable.append(f"{key}: cannot be read as {current.dtype} ({exc})")
                continue
            if tuple(value.shape) != tuple(current.shape):
                mismatched.append(f"{key}: checkpoint has shape {tuple(value.shape)}, model has {tuple(current.shape)}")
            values.append((current, value))
        problems = []
        if strict and missing:
            problems.append("missing keys: " + ", ".join(missing))
        if strict and unexpected:
            problems.append("unexpected keys: " + ", ".join(unexpected))
        if mismatched:
            problems.append("shape mismatches: " + "; ".join(mismatched))
        if unreadable:
            problems.append("values of the wrong type: " + "; ".join(unreadable))
        if problems:
            raise StateDictError(f"error loading state dict into {type(self).__name__}:\n  " + "\n  ".join(problems))
        for current, value in values:            # every value is checked and converted: copying cannot fail
            current[...] = value
        for key in untracked:
            module, name = targets[key]
            module._buffers[name][...] = 0
        parameters_changed()
        return IncompatibleKeys(missing, unexpected)

    # --- printing -------------------------------------------------------------------------------

    def extra_repr(self) -> str:
        return ""

    def __repr__(self):
        extra = self.extra_repr()
        lines = extra.split("\n") if extra else []
        children = []
        for name, child in self._modules.items():
            child_text = repr(child).replace("\n", "\n  ")
            children.append(f"({name}): {child_text}")
        text = type(self).__name__ + "("
        if len(lines) == 1 and not children:
            text += lines[0]
        elif lines or children:
            text += "\n  " + "\n  ".join(lines + children) + "\n"
        return text + ")"
