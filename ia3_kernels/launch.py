"""Eager kernel launches that skip most of Triton's per-call Python.

Why: on the H100 host a `kernel[grid](...)` call costs ~45 us of CPU against ~26 us for a
whole `F.linear` (benchmarks/results/host-overhead-h100.log): Triton's `run()` parses options,
binds and specialises every argument, builds a string cache key, checks globals and builds
launch metadata on every call. An eager layer at M <= 512 is bound by that host time, not by
the GPU, and a training step pays it for every launch of every layer.

`FastKernel(jit_fn)[grid](*args, **kwargs)` is a drop-in for `jit_fn[grid](...)`. The first
call of each specialisation goes through Triton (compiling if needed) and keeps the
`CompiledKernel` it returns under a key of our own; later calls with the same key call the
compiled kernel's C launcher directly. The key holds everything Triton specialises on, or
more (a finer key only costs a cache entry, never a wrong kernel):
  - constexpr parameters and ints: their values (Triton keys ints on == 1, divisibility by
    16 and the int32 range);
  - tensors: dtype and 16-byte alignment of the data pointer; None: None;
  - host-side TMA descriptors: dtype, block shape, base alignment (and padding/tf32 flags);
  - num_warps, num_stages and the current device.
Other launch options, an argument without a dtype (floats, tuples), launch hooks
set by a profiler, or a Triton whose compiled kernels do not expose the launcher (checked once)
send the call through Triton's own path, as does a kernel whose first direct launch of a key
raises TypeError/ValueError/AttributeError (a launcher that takes its arguments otherwise).
`IA3_FAST_LAUNCH=0` turns the shortcut off.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch

_ENABLED = os.environ.get("IA3_FAST_LAUNCH", "1").strip().lower() not in ("0", "false", "no", "off")

try:  # triton >= 3.4: hooks live in knobs (HookChain objects, empty unless a profiler adds one)
    from triton import knobs as _knobs

    def _launch_hooks_active() -> bool:
        runtime = _knobs.runtime
        return _hook_active(runtime.launch_enter_hook) or _hook_active(runtime.launch_exit_hook)
except ImportError:  # triton 3.3: class attributes of CompiledKernel, None unless set
    from triton.compiler.compiler import CompiledKernel as _CompiledKernel

    def _launch_hooks_active() -> bool:
        return (_CompiledKernel.launch_enter_hook is not None
                or _CompiledKernel.launch_exit_hook is not None)


def _hook_active(hook) -> bool:
    return hook is not None and bool(getattr(hook, "calls", True))


def cdiv(a: int, b: int) -> int:
    """Host-side ceil division. Not triton.cdiv: since Triton 3.6 that is a constexpr_function
    whose call costs ~4 us of Python (5 calls per launch were a tenth of a layer's budget)."""
    return -(-a // b)


_driver_calls: dict = {}


def _driver():
    """Triton's active driver's device and stream getters (what its run() asks), resolved once."""
    if not _driver_calls:
        from triton.runtime import driver
        _driver_calls["device"] = driver.active.get_current_device
        _driver_calls["stream"] = driver.active.get_current_stream
    return _driver_calls["device"], _driver_calls["stream"]


def current_stream_handle(device_index: int) -> int:
    """The current CUDA stream's handle, as Triton's launcher takes it (no Stream object)."""
    return _driver()[1](device_index)


@functools.lru_cache(maxsize=16)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """SMs of a CUDA device; 4 elsewhere (the interpreter: few CTAs, so that tests cover
    split-K, multi-block reductions and persistent kernels walking several tiles a CTA)."""
    if device.type != "cuda":
        return 4
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


_TENSOR_KEY = "(None if {0} is None else ({0}.dtype, not {0}.data_ptr() & 15))"
_INT_KEY = "{0}"
# Host-side TMA descriptors (triton.tools.tensor_descriptor): Triton types them as
# tensordesc<dtype[block_shape]>; the key adds the base's 16-byte alignment, the padding mode
# and the tf32 flag where the class has them. Their launcher builds the CUtensorMap from the
# descriptor object, the same call as in Triton's own run().
_DESC_KEY = ("(type({0}), {0}.base.dtype, tuple({0}.block_shape), not {0}.base.data_ptr() & 15,"
             " getattr({0}, 'padding', None), getattr({0}, 'round_f32_to_tf32', None))")


def _is_descriptor(value) -> bool:
    return type(value).__name__ == "TensorDescriptor" and hasattr(value, "block_shape")


def _make_binder(params, example_args: dict):
    """A function with the kernel's own signature (Python binds positional and keyword
    arguments in C) that returns (key, every argument in signature order, num_warps,
    num_stages, other options). The key expression of each runtime parameter follows the kind
    of value it had in `example_args`:
      - int: the value itself. Triton specialises ints on == 1, divisibility by 16 and the
        int32 range; keying on the value is finer (one entry per distinct M, say), and costs
        nothing to compute, where three comparisons for each of ~10 ints cost ~1.5 us;
      - a TMA descriptor (triton.tools.tensor_descriptor.TensorDescriptor): its class, the
        base's dtype and alignment, the block shape, padding and tf32 flags (_DESC_KEY);
      - anything else (a tensor or None): None, or (dtype, 16-byte alignment of the data).
        A value without .dtype raises AttributeError: Triton's own path takes that call.
    A tensor passed later where an int was keys by its identity: a miss, never a wrong kernel.
    """
    names = [p.name for p in params]
    keys = []
    for name, p in zip(names, params):
        if p.is_constexpr or type(example_args[name]) is int:
            keys.append(_INT_KEY.format(name))
        elif _is_descriptor(example_args[name]):
            keys.append(_DESC_KEY.format(name))
        else:
            keys.append(_TENSOR_KEY.format(name))
    source = (f"def bind({', '.join(names)}, num_warps=4, num_stages=3, **options):\n"
              f"    return (({', '.join(keys)}, num_warps, num_stages), ({', '.join(names)},), "
              f"num_warps, num_stages, options)\n")
    namespace: dict = {}
    exec(source, namespace)  # noqa: S102 - names come from a triton.jit signature
    return namespace["bind"]


# Distinct keys kept per kernel before the cache is cleared (each miss costs one Triton launch).
_MAX_ENTRIES = 4096


class FastKernel:
    """Wraps a `triton.jit` function; index it with a grid and call it like the original."""

    def __init__(self, fn):
        self.fn = fn
        self._names = [p.name for p in fn.params]
        self._bind = None  # built on the first call, from the kinds of its arguments
        self._compiled: dict = {}
        self._launched: set = set()  # keys launched directly once without error
        self._usable = _ENABLED
        self._current_device = self._current_stream = None

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self._launch(grid, args, kwargs)

    def _launch(self, grid, args, kwargs):
        if not self._usable or _launch_hooks_active():
            return self.fn[grid](*args, **kwargs)
        if self._bind is None:
            self._first_call_setup(args, kwargs)
        try:
            key, full, num_warps, num_stages, options = self._bind(*args, **kwargs)
        except (AttributeError, TypeError):  # an argument we cannot key, or a defaulted one
            return self.fn[grid](*args, **kwargs)
        if options:  # launch options beyond warps and stages: Triton's path
            return self.fn[grid](*args, **kwargs)
        device = self._current_device()
        key = (device, key)
        kernel = self._compiled.get(key)
        if kernel is None:
            kernel = self.fn[grid](*full, num_warps=num_warps, num_stages=num_stages)
            if all(hasattr(kernel, a) for a in ("run", "function", "packed_metadata")):
                if len(self._compiled) >= _MAX_ENTRIES:
                    self._compiled.clear()
                    self._launched.clear()
                self._compiled[key] = kernel
            else:
                self._usable = False  # a Triton whose launch API we do not know: its own path
            return kernel
        if key in self._launched:
            self._run(kernel, grid, device, full)
            return kernel
        try:  # the first direct launch of a key: a launcher that refuses its arguments (a Triton
            # whose launcher takes them otherwise) sends this kernel back to Triton's own path
            self._run(kernel, grid, device, full)
        except (TypeError, ValueError, AttributeError):
            self._usable = False
            return self.fn[grid](*args, **kwargs)
        self._launched.add(key)
        return kernel

    def _run(self, kernel, grid, device, full):
        kernel.run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1,
                   self._current_stream(device), kernel.function, kernel.packed_metadata, None,
                   None, None, *full)

    def plan(self, grid, args, kwargs, slots):
        """Launch this call, then return a callable that relaunches the same specialisation
        with every argument fixed but the parameters named in `slots`, which it takes
        positionally in that order: launch plan(v0, v1, ...) -> True, or False (launching
        nothing) while a profiler's launch hooks are set. None where the fast path cannot serve
        this call yet (its key's first direct launch comes on its second call) or at all.
        The caller keys its plans on everything the fixed arguments and Triton's
        specialisation of the slots (dtypes, 16-byte alignment) depend on."""
        kernel = self._launch(grid, args, kwargs)
        if not self._usable or _launch_hooks_active():
            return None
        try:
            key, full, _, _, options = self._bind(*args, **kwargs)
        except (AttributeError, TypeError):
            return None
        device = self._current_device()
        if options or (device, key) not in self._launched:
            return None
        slot_indices = [self._names.index(name) for name in slots]
        if any(isinstance(v, torch.Tensor) for i, v in enumerate(full) if i not in slot_indices):
            return None  # a tensor outside the slots would be replayed stale
        return _make_plan(kernel, tuple(grid) + (1,) * (3 - len(grid)), device, full,
                          slot_indices, self._current_stream)

    def _first_call_setup(self, args, kwargs):
        example = dict(zip(self._names, args))
        example.update(kwargs)
        self._bind = _make_binder(self.fn.params, example)
        self._current_device, self._current_stream = _driver()


def _make_plan(kernel, grid, device, full, slot_indices, current_stream):
    """FastKernel.plan's launcher: copies the fixed arguments and puts the slots' values in
    place by index (no per-call binding or key). A closure, not generated code: exec'ing a
    function per plan cost 129 us on the development CPU (~3x that on the GPU hosts), paid
    again for every new signature, where the closure's loop costs 0.35 us a call more."""
    # The slots are filled on every call: the template keeps None there, never the first call's
    # tensors. Keeping them held that call's output (and through its grad_fn the autograd graph,
    # AccumulateGrad nodes included) for the process's life: memory, and a CUDA-graph capture
    # of a later backward broke on the stale AccumulateGrad's stream (H100, 2026-12-05:
    # "operation would make the legacy stream depend on a capturing blocking stream").
    template = tuple(None if i in slot_indices else value for i, value in enumerate(full))
    function, metadata, run = kernel.function, kernel.packed_metadata, kernel.run
    gx, gy, gz = grid

    def plan(*values):
        if _launch_hooks_active():  # looked up at each call: a profiler may set hooks later
            return False
        args = list(template)
        for index, value in zip(slot_indices, values):
            args[index] = value
        run(gx, gy, gz, current_stream(device), function, metadata, None, None, None, *args)
        return True

    return plan


def aligned_16(tensors) -> bool:
    """Whether every tensor's data (None skipped) is 16-byte aligned: Triton specialises a
    pointer argument on it, which a launch plan fixes."""
    pointers = 0
    for t in tensors:
        if t is not None:
            pointers |= t.data_ptr()
    return not pointers & 15


def pointer_key(tensors) -> Optional[tuple]:
    """What Triton's specialisation of pointer arguments adds to a launch plan's key: each
    tensor's dtype (None for None); None (no plan) where any is not 16-byte aligned."""
    if not aligned_16(tensors):
        return None
    return tuple(None if t is None else t.dtype for t in tensors)


class PlanCache:
    """Launch plans (FastKernel.plan) of one kernel per caller key, for launchers whose
    non-tensor arguments follow from a key the caller can form cheaply (shapes, strides,
    flags, device and pointer_key of the tensors): a hit skips building the arguments and
    FastKernel's per-call binding and key. `slots` names every tensor parameter, in signature
    order; a call passes their values in that order. Each plan may keep an `extra` value
    beside it: what the launcher chose for that key (dense.py: its tiles)."""

    def __init__(self, kernel, slots: tuple, max_entries: int = 1024):
        self.kernel = kernel
        self.slots = slots
        self.max_entries = max_entries
        self.plans: dict = {}  # key -> (plan, extra)

    def extra(self, key):
        """The extra kept with key's plan; None without a plan (or key None)."""
        entry = self.plans.get(key) if key is not None else None
        return None if entry is None else entry[1]

    def launch(self, key, grid, values, build_args, extra=None) -> None:
        """Replay key's plan with `values`; else launch kernel[grid](*args, **kwargs) from
        build_args() -> (args, kwargs) and keep the plan it yields (with `extra`). key None:
        a plain launch (an unaligned pointer)."""
        entry = self.plans.get(key) if key is not None else None
        if entry is not None and entry[0](*values):
            return
        args, kwargs = build_args()
        if key is None or not isinstance(self.kernel, FastKernel):
            self.kernel[grid](*args, **kwargs)
            return
        plan = self.kernel.plan(grid, args, kwargs, self.slots)  # launches this call
        if plan is not None:
            if len(self.plans) >= self.max_entries:
                self.plans.clear()
            self.plans[key] = (plan, extra)
