"""Exact memory traffic, dot FLOPs and per-lane bounds of Triton kernels run in the interpreter.

:class:`InterpreterTraffic` is a context manager. While it is active, every kernel launched through
Triton's interpreter (``TRITON_INTERPRET=1``) is recorded, launch by launch:

- **request bytes** per kernel argument: every active (unmasked) lane of every load and store,
  times the element size. Tile re-reads count each time: this is what the kernel asks of the
  memory system before any cache.
- **unique bytes** per argument: the distinct bytes that were read, and those written. Per
  launch, ``unique_bytes = unique read + unique written``: the traffic of a kernel with a perfect
  cache, which is the quantity the compulsory-minimum model (e.g. ``e(2MD + D^2 + D)``) counts.
- **dot FLOPs**: ``2 * M * N * K`` of every ``tl.dot`` tile as issued (masked padding included).
- **bounds violations**: an active lane whose address (or the element's last byte) falls outside
  the storage of the tensor its pointer was derived from (``scope="storage"``: on a GPU, a memory
  fault or silent corruption), or inside the storage but outside the tensor view's byte extent
  (``scope="view"``). Each violation names the kernel, launch, program id, load or store, the
  argument and the first offending byte offsets. ``raise_on_violation=True`` raises
  :class:`BoundsViolation` *before* the access runs, which is what a sanitizer needs (the
  interpreter would otherwise read and write the real heap).

How it works (Triton's private interpreter, as in triton 3.6, 3.7, 3.8 and 3.9: the releases CI runs the
instrument's own tests on, ``tests/test_traffic.py``; on any other release :func:`supported` is
False and the tests that need the instrument say so and skip):

- ``GridExecutor.__call__`` (the launch entry) is wrapped: it binds the launch's arguments and
  names every tensor argument;
- the module function ``_implicit_cvt`` (which turns each host tensor into a pointer handle) is
  wrapped to tag that pointer handle with its argument: the argument's storage range and view
  extent, taken from the very host tensor the kernel will address;
- every ``InterpreterBuilder.create_*`` method is wrapped to carry the tag from its pointer
  operands to the pointer it returns (``addptr``, ``splat``, ``broadcast``, ``expand_dims``,
  ``select``, ...), so a lane's provenance is known even when its address is out of bounds;
  a pointer whose provenance is lost (e.g. through ``int_to_ptr``) is attributed by address;
- ``create_masked_load`` / ``create_masked_store`` (which the plain ``create_load`` /
  ``create_store``, the atomic load/store and the tensor-descriptor paths all call), and
  ``create_atomic_rmw`` / ``create_atomic_cas`` count and check the active lanes;
- ``create_dot`` / ``create_dot_scaled`` count FLOPs.

Nothing is patched outside the ``with`` block. It works only in an interpreted process, and
assumes kernels are launched from one thread at a time (as the interpreter itself does).
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import inspect
import threading
from dataclasses import dataclass
from typing import Iterable

import numpy as np

__all__ = ["supported", "InterpreterTraffic", "LaunchTraffic", "ArgTraffic", "Violation", "BoundsViolation"]

_TAG = "_fusedres_traffic_src"
_MAX_SAMPLES = 8


class BoundsViolation(RuntimeError):
    """An active lane addressed memory outside its tensor (raised only with ``raise_on_violation``)."""

    def __init__(self, violation: "Violation"):
        super().__init__(str(violation))
        self.violation = violation


@dataclass(frozen=True)
class Violation:
    kernel: str
    launch: int                   # index of the launch within the counter
    program: tuple                # (pid_x, pid_y, pid_z)
    op: str                       # "load" | "store" | "atomic"
    arg: str | None               # the argument the pointer came from; None: unknown provenance
    scope: str                    # "storage" (outside the allocation) | "view" (outside the tensor's extent)
    lanes: int                    # active lanes out of bounds in this access
    offsets: tuple                # first few offending byte offsets, relative to the storage start
    storage_nbytes: int | None

    def __str__(self) -> str:
        where = f"argument {self.arg!r}" if self.arg else "a pointer of unknown provenance"
        size = f" of {self.storage_nbytes} B" if self.storage_nbytes is not None else ""
        return (f"{self.kernel} (launch {self.launch}, program {self.program}): {self.op} of {self.lanes} active "
                f"lane(s) outside the {self.scope}{size} of {where}; byte offsets {list(self.offsets)}")


class _ArgInfo:
    """One pointer argument of one launch: its name and host address ranges, plus its counters."""

    __slots__ = ("name", "dtype", "esize", "lo", "hi", "view_lo", "view_hi", "bytes_read", "bytes_written",
                 "loads", "stores", "_bm_read", "_bm_write", "_extra_read", "_extra_write", "track")

    def __init__(self, name: str, tensor, track: bool):
        storage = tensor.untyped_storage()
        self.name = name
        self.dtype = str(tensor.dtype).replace("torch.", "")
        self.esize = tensor.element_size()
        self.lo = storage.data_ptr()
        self.hi = self.lo + storage.nbytes()
        start = tensor.data_ptr()
        if tensor.numel() == 0:
            self.view_lo = self.view_hi = start
        else:
            neg = sum((s - 1) * st for s, st in zip(tensor.shape, tensor.stride()) if st < 0)
            pos = sum((s - 1) * st for s, st in zip(tensor.shape, tensor.stride()) if st > 0)
            self.view_lo = start + neg * self.esize
            self.view_hi = start + (pos + 1) * self.esize
        self.bytes_read = self.bytes_written = self.loads = self.stores = 0
        self.track = track
        self._bm_read = self._bm_write = None
        self._extra_read: set[int] = set()
        self._extra_write: set[int] = set()

    def mark(self, addrs: np.ndarray, esize: int, write: bool) -> None:
        """Mark the bytes of in-storage lanes as touched: a byte bitmap over the view's extent,
        and a set for the (rare) bytes inside the storage but outside the view."""
        if not self.track or addrs.size == 0:
            return
        attr = "_bm_write" if write else "_bm_read"
        bm = getattr(self, attr)
        n = self.view_hi - self.view_lo
        if bm is None:
            bm = np.zeros(n, dtype=np.uint8)
            setattr(self, attr, bm)
        inside = (addrs >= self.view_lo) & (addrs + esize <= self.view_hi)
        if not inside.all():
            extra = self._extra_write if write else self._extra_read
            for a in addrs[~inside].tolist():
                extra.update(range(a, a + esize))
            addrs = addrs[inside]
        off = (addrs - np.uint64(self.view_lo)).astype(np.int64)
        if esize in (1, 2, 4, 8) and n % esize == 0 and not (off & (esize - 1)).any():
            bm.view(f"u{esize}")[off // esize] = np.iinfo(f"u{esize}").max    # all bytes of each element
        else:
            for j in range(esize):
                bm[off + j] = 1

    def unique(self, write: bool) -> int:
        bm = self._bm_write if write else self._bm_read
        extra = self._extra_write if write else self._extra_read
        return (int(np.count_nonzero(bm)) if bm is not None else 0) + len(extra)

    def release(self) -> None:
        self._bm_read = self._bm_write = None
        self._extra_read = self._extra_write = set()


@dataclass(frozen=True)
class ArgTraffic:
    """Traffic of one kernel argument in one launch."""
    name: str
    dtype: str
    storage_nbytes: int
    view_nbytes: int
    bytes_read: int
    bytes_written: int
    unique_read: int
    unique_written: int
    loads: int                    # load instructions (tiles) issued through this argument
    stores: int


@dataclass(frozen=True)
class LaunchTraffic:
    """Everything recorded for one kernel launch."""
    kernel: str
    grid: tuple
    args: dict                    # name -> ArgTraffic
    dot_flops: int
    dots: int
    unattributed_read: int        # bytes through pointers whose provenance and address match no argument
    unattributed_written: int
    unique_read: int              # distinct bytes read; arguments aliasing one storage count each byte once
    unique_written: int
    violations: tuple = ()

    @property
    def bytes_read(self) -> int:
        return sum(a.bytes_read for a in self.args.values()) + self.unattributed_read

    @property
    def bytes_written(self) -> int:
        return sum(a.bytes_written for a in self.args.values()) + self.unattributed_written

    @property
    def unique_bytes(self) -> int:
        """Distinct bytes read plus distinct bytes written: the launch's traffic with a perfect cache."""
        return self.unique_read + self.unique_written


class _Launch:
    """The live record of the launch in flight (shared by all active counters)."""

    def __init__(self, kernel: str, index_by_counter: dict, track: bool, raise_on_violation: bool,
                 progress: list | None = None):
        self.kernel = kernel
        self.progress = progress or []
        self.index_by_counter = index_by_counter
        self.track = track
        self.raise_on_violation = raise_on_violation
        self.args: list[_ArgInfo] = []
        self.pending: collections.deque = collections.deque()
        self.dot_flops = 0
        self.dots = 0
        self.unattributed_read = 0
        self.unattributed_written = 0
        self.violations: list[Violation] = []
        self.grid = ()

    def finish(self) -> LaunchTraffic:
        args = {}
        for a in self.args:
            args[a.name] = ArgTraffic(a.name, a.dtype, a.hi - a.lo, a.view_hi - a.view_lo, a.bytes_read,
                                      a.bytes_written, a.unique(False), a.unique(True), a.loads, a.stores)
        unique = {False: 0, True: 0}
        groups: dict[tuple, list[_ArgInfo]] = collections.defaultdict(list)
        for a in self.args:
            groups[(a.lo, a.hi)].append(a)
        for group in groups.values():
            for write in (False, True):
                unique[write] += _union_count(group, write)
        for a in self.args:
            a.release()
        return LaunchTraffic(self.kernel, tuple(self.grid), args, self.dot_flops, self.dots, self.unattributed_read,
                             self.unattributed_written, unique[False], unique[True], tuple(self.violations))


def _union_count(group: list[_ArgInfo], write: bool) -> int:
    """Distinct bytes touched through the arguments of one storage, each byte counted once."""
    if len(group) == 1:
        return group[0].unique(write)
    lo = min(a.view_lo for a in group)
    hi = max(a.view_hi for a in group)
    merged = np.zeros(hi - lo, dtype=np.uint8)
    outside: set[int] = set()
    for a in group:
        bm = a._bm_write if write else a._bm_read
        if bm is not None:
            merged[a.view_lo - lo:a.view_hi - lo] |= bm
        for addr in (a._extra_write if write else a._extra_read):
            if lo <= addr < hi:
                merged[addr - lo] = 1
            else:
                outside.add(addr)
    return int(np.count_nonzero(merged)) + len(outside)


# ---------------------------------------------------------------------------------------------
# The patches


_lock = threading.RLock()
_active: list["InterpreterTraffic"] = []
_current: _Launch | None = None
_originals: dict = {}


def _interp():
    from triton.runtime import interpreter
    return interpreter


def _pointer_handle(h) -> bool:
    import triton.language as tl
    return isinstance(h, _interp().TensorHandle) and isinstance(h.dtype, tl.pointer_type)


def _carry_tag(out, inputs) -> None:
    if isinstance(out, tuple):
        for o in out:
            _carry_tag(o, inputs)
        return
    if not _pointer_handle(out) or _TAG in out.attr:
        return
    src: tuple = ()
    for a in inputs:
        tag = getattr(a, "attr", None)
        if isinstance(tag, dict) and _TAG in tag:
            src += tuple(s for s in tag[_TAG] if s not in src)
    if src:
        out.attr[_TAG] = src


def _wrap_provenance(fn):
    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        out = fn(self, *args, **kwargs)
        if _current is not None:
            _carry_tag(out, list(args) + list(kwargs.values()))
        return out
    wrapper.__fusedres_traffic__ = True
    return wrapper


def _count(a: _ArgInfo, nbytes: int, read: bool, write: bool) -> None:
    if read:
        a.bytes_read += nbytes
        a.loads += 1
    if write:
        a.bytes_written += nbytes
        a.stores += 1


def _check_view_and_mark(launch: _Launch, a: _ArgInfo, lanes: np.ndarray, esize: int, op: str, read: bool,
                         write: bool) -> None:
    """``lanes`` are inside ``a``'s storage: flag those outside its view, then mark them touched."""
    if lanes.size == 0:
        return
    if int(lanes.min()) < a.view_lo or int(lanes.max()) + esize > a.view_hi:
        outside = lanes[(lanes < np.uint64(a.view_lo)) | (lanes + np.uint64(esize) > np.uint64(a.view_hi))]
        _violation(launch, op, a.name, "view", outside, a.lo, a.hi - a.lo)
    if read:
        a.mark(lanes, esize, write=False)
    if write:
        a.mark(lanes, esize, write=True)


def _record_access(ptrs, mask, op: str, write: bool, read: bool) -> None:
    """Count, check and mark the active lanes of one load, store or atomic (before it runs)."""
    launch = _current
    data = np.asarray(ptrs.data)
    if mask is None:
        active = data.reshape(-1)
    else:
        m = np.asarray(mask.data, dtype=bool)
        if m.shape != data.shape:
            m = np.broadcast_to(m, data.shape)
        active = data[m]
    active = active.astype(np.uint64, copy=False)
    esize = max(1, ptrs.get_element_ty().primitive_bitwidth // 8)
    e64 = np.uint64(esize)
    src = ptrs.attr.get(_TAG) if isinstance(getattr(ptrs, "attr", None), dict) else None

    if src and len(src) == 1:                      # the usual case: one known argument
        a = src[0]
        _count(a, int(active.size) * esize, read, write)   # request bytes include out-of-bounds lanes
        if active.size == 0:
            return
        if int(active.min()) < a.lo or int(active.max()) + esize > a.hi:
            ok = (active >= np.uint64(a.lo)) & (active + e64 <= np.uint64(a.hi))
            _violation(launch, op, a.name, "storage", active[~ok], a.lo, a.hi - a.lo)
            active = active[ok]
        _check_view_and_mark(launch, a, active, esize, op, read, write)
        return

    # Several possible sources (a select between pointers), or provenance lost: attribute by address.
    remaining = active
    for a in (src or launch.args):
        if remaining.size == 0:
            break
        sel = (remaining >= np.uint64(a.lo)) & (remaining + e64 <= np.uint64(a.hi))
        if not sel.any():
            continue
        mine, remaining = remaining[sel], remaining[~sel]
        _count(a, int(mine.size) * esize, read, write)
        _check_view_and_mark(launch, a, mine, esize, op, read, write)
    if remaining.size:
        nbytes = int(remaining.size) * esize
        if src:
            _violation(launch, op, "|".join(a.name for a in src), "storage", remaining, src[0].lo,
                       src[0].hi - src[0].lo)
            _count(src[0], nbytes, read, write)
        else:
            _violation(launch, op, None, "storage", remaining, 0, None)
            launch.unattributed_read += nbytes if read else 0
            launch.unattributed_written += nbytes if write else 0


def _violation(launch: _Launch, op, name, scope, addrs: np.ndarray, base: int, storage_nbytes) -> None:
    program = tuple(getattr(_interp().interpreter_builder, "grid_idx", None) or ())
    offsets = tuple(int(a) - base for a in addrs[:_MAX_SAMPLES].tolist())
    v = Violation(launch.kernel, -1, program, op, name, scope, int(addrs.size), offsets, storage_nbytes)
    launch.violations.append(v)
    if launch.raise_on_violation and scope == "storage":
        raise BoundsViolation(v)


# The wrappers take the leading arguments they need by position and pass the rest through: the
# cache arguments differ between supported Triton releases (3.6-3.8: ``cache_modifier,
# eviction_policy``; 3.9: ``cache_policy``), the operands the instrument reads do not.

def _masked_load(self, ptrs, mask, *rest, **kwargs):
    if _current is not None:
        _record_access(ptrs, mask, "load", write=False, read=True)
    return _originals["create_masked_load"](self, ptrs, mask, *rest, **kwargs)


def _masked_store(self, ptrs, value, mask, *rest, **kwargs):
    if _current is not None:
        _record_access(ptrs, mask, "store", write=True, read=False)
    return _originals["create_masked_store"](self, ptrs, value, mask, *rest, **kwargs)


def _atomic_rmw(self, rmwOp, ptr, val, mask, *rest, **kwargs):
    if _current is not None:
        _record_access(ptr, mask, "atomic", write=True, read=True)
    return _originals["create_atomic_rmw"](self, rmwOp, ptr, val, mask, *rest, **kwargs)


def _atomic_cas(self, ptr, *rest, **kwargs):
    if _current is not None:
        _record_access(ptr, None, "atomic", write=True, read=True)
    return _originals["create_atomic_cas"](self, ptr, *rest, **kwargs)


def _dot_flops(a_shape, b_shape) -> int:
    m, k = a_shape[-2], a_shape[-1]
    n = b_shape[-1]
    batch = int(np.prod(a_shape[:-2])) if len(a_shape) > 2 else 1
    return 2 * batch * m * n * k


def _dot(self, a, b, *rest, **kwargs):
    if _current is not None:
        _current.dot_flops += _dot_flops(a.data.shape, b.data.shape)
        _current.dots += 1
    return _originals["create_dot"](self, a, b, *rest, **kwargs)


def _dot_scaled(self, lhs, lhs_scale, lhs_format, rhs, rhs_scale, rhs_format, fast_math, lhs_k_pack, rhs_k_pack,
                acc, *rest, **kwargs):
    if _current is not None:
        # best effort: K is the lhs's last dim, doubled when fp4 (e2m1) values are packed two a byte along K
        k = lhs.data.shape[-1] * (2 if "E2M1" in str(lhs_format) and lhs_k_pack else 1)
        _current.dot_flops += 2 * int(np.prod(acc.data.shape)) * k
        _current.dots += 1
    return _originals["create_dot_scaled"](self, lhs, lhs_scale, lhs_format, rhs, rhs_scale, rhs_format, fast_math,
                                           lhs_k_pack, rhs_k_pack, acc, *rest, **kwargs)


def _implicit_cvt(arg):
    out = _originals["_implicit_cvt"](arg)
    launch = _current
    if launch is not None and hasattr(arg, "data_ptr") and launch.pending:
        name = launch.pending.popleft()
        handle = getattr(out, "handle", None)
        from triton.runtime.jit import TensorWrapper
        tensor = arg.base if isinstance(arg, TensorWrapper) else arg
        info = _ArgInfo(name, tensor, launch.track)
        launch.args.append(info)
        if handle is not None and isinstance(getattr(handle, "attr", None), dict):
            handle.attr[_TAG] = (info,)
    return out


def _set_grid_idx(self, x, y, z):
    _originals["set_grid_idx"](self, x, y, z)
    launch = _current
    if launch is not None and launch.progress:
        nx, ny, nz = self.grid_dim
        for callback in launch.progress:
            callback(launch.kernel, (x * ny + y) * nz + z, nx * ny * nz)


def _flat_tensor_names(name, value) -> Iterable[str]:
    from triton.tools.tensor_descriptor import TensorDescriptor
    if isinstance(value, TensorDescriptor):
        yield f"{name}.base"
    elif hasattr(value, "data_ptr"):
        yield name
    elif isinstance(value, tuple):
        for i, v in enumerate(value):
            yield from _flat_tensor_names(f"{name}[{i}]", v)


def _grid_call(self, *args_dev, **kwargs):
    global _current
    if not _active or _current is not None:
        return _originals["GridExecutor.__call__"](self, *args_dev, **kwargs)
    argspec = inspect.getfullargspec(self.fn)
    kw = {k: v for k, v in kwargs.items() if k in argspec.args or k in argspec.kwonlyargs}
    bound = inspect.getcallargs(self.fn, *args_dev, **kw)
    counters = list(_active)
    launch = _Launch(self.fn.__name__, {id(c): len(c.launches) for c in counters},
                     track=any(c.track_unique for c in counters),
                     raise_on_violation=any(c.raise_on_violation for c in counters),
                     progress=[c.progress for c in counters if c.progress is not None])
    for name, value in bound.items():
        if name not in self.constexprs:
            launch.pending.extend(_flat_tensor_names(name, value))
    _current = launch
    try:
        _originals["GridExecutor.__call__"](self, *args_dev, **kwargs)
    except Exception as exc:
        # The interpreter wraps errors of the kernel body in InterpreterError, once more per jit
        # function the access sits in (the K-loop helper); hand a sanitizer the BoundsViolation itself.
        cause = exc.__cause__
        while cause is not None and not isinstance(cause, BoundsViolation):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise
    finally:
        _current = None
        launch.grid = tuple(getattr(_interp().interpreter_builder, "grid_dim", ()) or ())
        record = launch.finish()
        for c in counters:
            idx = launch.index_by_counter[id(c)]
            vs = tuple(dataclasses.replace(v, launch=idx) for v in record.violations)
            c.launches.append(dataclasses.replace(record, violations=vs))


_SPECIAL = {"create_masked_load": _masked_load, "create_masked_store": _masked_store,
            "create_atomic_rmw": _atomic_rmw, "create_atomic_cas": _atomic_cas,
            "create_dot": _dot, "create_dot_scaled": _dot_scaled}
#: What the instrument cannot work without (``create_dot_scaled`` is absent from triton 3.6 and 3.7's
#: interpreter, and no fusedres kernel uses it).
_REQUIRED = ("create_masked_load", "create_masked_store", "create_atomic_rmw", "create_atomic_cas", "create_dot")
#: The triton releases whose interpreter internals the instrument is written and tested against.
SUPPORTED_TRITON = ("3.6", "3.7", "3.8", "3.9")
# These delegate to create_masked_load / create_masked_store: wrapping them would count twice.
_DELEGATING = {"create_load", "create_store", "create_atomic_load", "create_atomic_store",
               "create_descriptor_load", "create_descriptor_store", "create_descriptor_gather",
               "create_descriptor_scatter", "create_atomic_poll"}


def _install() -> None:
    interp = _interp()
    builder = interp.InterpreterBuilder
    for name in _REQUIRED:
        if not hasattr(builder, name):
            raise RuntimeError(f"fusedres.traffic: triton's InterpreterBuilder has no {name}; the instrument "
                               f"supports the interpreters of triton {', '.join(SUPPORTED_TRITON)}")
    for name in dir(builder):
        if not name.startswith("create_") or name in _DELEGATING:
            continue
        orig = builder.__dict__.get(name)
        if orig is None or not callable(orig):
            continue
        _originals[name] = orig
        if name in _SPECIAL:
            setattr(builder, name, _wrap_provenance(_SPECIAL[name]))
        else:
            setattr(builder, name, _wrap_provenance(orig))
    _originals["set_grid_idx"] = builder.__dict__["set_grid_idx"]
    builder.set_grid_idx = _set_grid_idx
    _originals["GridExecutor.__call__"] = interp.GridExecutor.__call__
    interp.GridExecutor.__call__ = _grid_call
    _originals["_implicit_cvt"] = interp._implicit_cvt
    interp._implicit_cvt = _implicit_cvt


def _uninstall() -> None:
    interp = _interp()
    interp.GridExecutor.__call__ = _originals.pop("GridExecutor.__call__")
    interp._implicit_cvt = _originals.pop("_implicit_cvt")
    for name, orig in list(_originals.items()):
        setattr(interp.InterpreterBuilder, name, orig)
    _originals.clear()


def supported() -> tuple[bool, str]:
    """``(ok, why)``: whether the installed triton's interpreter is one the instrument supports."""
    import triton
    version = ".".join(triton.__version__.split(".")[:2])
    if version not in SUPPORTED_TRITON:
        return False, (f"fusedres.traffic supports the interpreters of triton {', '.join(SUPPORTED_TRITON)}; "
                       f"this is triton {triton.__version__}")
    missing = [name for name in _REQUIRED if not hasattr(_interp().InterpreterBuilder, name)]
    if missing:
        return False, f"triton {triton.__version__}'s InterpreterBuilder lacks {', '.join(missing)}"
    return True, ""


class InterpreterTraffic:
    """Record every interpreted kernel launch inside the ``with`` block.

    Args:
        track_unique: keep byte bitmaps to count distinct bytes (one byte of host memory per byte
            of each argument's extent, freed at the end of each launch). Off: request bytes only.
        raise_on_violation: raise :class:`BoundsViolation` before an access that leaves its
            tensor's storage (views are only recorded).
        progress: optional ``callback(kernel_name, program_index, programs_in_grid)``, called as
            each program of a launch starts (for a progress bar).

    After the block: ``launches`` (a list of :class:`LaunchTraffic`), ``violations``, and the
    aggregates ``bytes_read``, ``bytes_written``, ``unique_bytes``, ``dot_flops``, each with an
    optional ``kernels=`` filter (names of the kernels to include).
    """

    def __init__(self, track_unique: bool = True, raise_on_violation: bool = False, progress=None):
        self.track_unique = track_unique
        self.raise_on_violation = raise_on_violation
        self.progress = progress
        self.launches: list[LaunchTraffic] = []

    def __enter__(self) -> "InterpreterTraffic":
        from triton.runtime.interpreter import GridExecutor  # noqa: F401  (fails clearly without triton)
        import os
        if os.environ.get("TRITON_INTERPRET", "0") != "1":
            raise RuntimeError("fusedres.traffic: kernels are not interpreted in this process (set TRITON_INTERPRET=1 "
                               "before triton is imported); there is nothing to instrument")
        with _lock:
            if not _active:
                _install()
            _active.append(self)
        return self

    def __exit__(self, *exc) -> None:
        with _lock:
            _active.remove(self)
            if not _active:
                _uninstall()

    # -- aggregates ----------------------------------------------------------------------------

    def select(self, kernels: Iterable[str] | None = None) -> list[LaunchTraffic]:
        if kernels is None:
            return list(self.launches)
        names = {kernels} if isinstance(kernels, str) else set(kernels)
        return [launch for launch in self.launches if launch.kernel in names]

    def bytes_read(self, kernels=None) -> int:
        return sum(launch.bytes_read for launch in self.select(kernels))

    def bytes_written(self, kernels=None) -> int:
        return sum(launch.bytes_written for launch in self.select(kernels))

    def unique_bytes(self, kernels=None) -> int:
        """Sum over launches of each launch's distinct bytes read plus distinct bytes written."""
        return sum(launch.unique_bytes for launch in self.select(kernels))

    def dot_flops(self, kernels=None) -> int:
        return sum(launch.dot_flops for launch in self.select(kernels))

    @property
    def violations(self) -> list[Violation]:
        return [v for launch in self.launches for v in launch.violations]

    def per_argument(self, kernels=None) -> dict[str, dict[str, int]]:
        """``{"kernel.arg": {bytes_read, bytes_written, unique_read, unique_written}}`` summed over launches."""
        out: dict[str, dict[str, int]] = {}
        for launch in self.select(kernels):
            for name, a in launch.args.items():
                d = out.setdefault(f"{launch.kernel}.{name}", collections.Counter())
                d.update(bytes_read=a.bytes_read, bytes_written=a.bytes_written, unique_read=a.unique_read,
                         unique_written=a.unique_written)
        return {k: dict(v) for k, v in out.items()}

    def summary(self, kernels=None) -> str:
        lines = []
        for launch in self.select(kernels):
            lines.append(f"{launch.kernel} grid={launch.grid}: read {launch.bytes_read} B, written "
                         f"{launch.bytes_written} B, unique {launch.unique_bytes} B, dot FLOPs {launch.dot_flops}, "
                         f"violations {len(launch.violations)}")
            for name, a in launch.args.items():
                lines.append(f"  {name:>10} {a.dtype:>8}: read {a.bytes_read} (unique {a.unique_read}), "
                             f"written {a.bytes_written} (unique {a.unique_written})")
        return "\n".join(lines)
