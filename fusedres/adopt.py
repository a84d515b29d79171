"""``fuse(model)`` by structure: find residual blocks in anyone's ``forward`` with torch.fx.

A residual block, here, is an add in some module's ``forward`` of a branch's output to the
branch's input: ``x + branch(x)`` (either order), ``x + c * branch(x)``, or ``shortcut(x) +
branch(x)`` with a bias-free ``nn.Linear`` shortcut. A branch is a chain (each value used once,
by the next piece) of torch modules and functional calls in this order, brackets optional::

    [norm] -> [act] -> Linear                                   fused_residual
    [norm] -> [act] -> Linear -> [hidden norm] -> act -> [dropout] -> Linear
                                                                fused_residual_mlp
    ... then, in any order: [dropout] [per-channel scale x * gamma] [constant c] [DropPath]

with ``norm`` an ``nn.BatchNorm1d`` / ``nn.LayerNorm`` / ``nn.RMSNorm`` over the block's width,
``act`` ``nn.ReLU`` / ``nn.GELU`` / ``nn.SiLU`` / ``nn.LeakyReLU`` or ``F.relu`` / ``F.gelu`` /
``F.silu`` / ``F.leaky_relu`` / ``torch.relu`` / ``x.relu()``, ``nn.Identity`` anywhere (skipped),
``nn.Dropout`` where the fused forms take a dropout (hidden: after the hidden activation; output:
on the branch before the add), a per-channel scale a multiply by a 1-D parameter or buffer of the
block's width (timm's ``LayerScale``), and a per-sample drop a module shaped like timm's
``DropPath`` (``drop_prob`` and ``scale_by_keep`` attributes, no parameters; matched by those,
not by its code, whose ``if self.training`` tracing would freeze). Anything else (a hidden norm
*after* the activation as timm's ``Mlp(norm_layer=...)`` has it, an activation in place on the
block's input, a dropout on the input, a shortcut with a hidden layer, ...) is left as it is,
and the report says why.

How: each module's ``forward`` is traced on its own (:class:`BlockTracer`: every submodule is a
leaf except ``nn.Sequential``, whose children are inlined), so a forward that cannot be traced
(data-dependent control flow) stops only itself; the search goes on in its children. A leaf
that is neither torch's nor a DropPath, met inside a branch, is traced in turn and its chain
spliced in (timm's ``Mlp`` and ``LayerScale``). Every forward is traced twice, once with the
modules in training mode and once in eval mode: if the two graphs differ, the forward reads
``self.training`` in Python, which a traced graph would freeze, and it is left alone.

When at least one block of a module's forward is fused, the matched nodes are replaced by one
call of :func:`residual_block` that receives the user's own modules and tensors (``get_attr``
nodes: the same objects, read at call time, so ``train()``/``eval()``, running statistics and
the optimizer's parameters all keep working), and the rewritten graph's Python code becomes
that module's ``forward`` (an instance attribute: the module keeps its class, its other
methods, its children and its state_dict; nothing is copied). Python decisions in a forward
(``if self.shortcut is not None``) are read when ``fuse`` runs: configure before fusing.
"""
from __future__ import annotations

import dataclasses
import itertools
import linecache
import operator
import inspect
import types
import warnings
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from .activations import ACTIVATIONS, Activation, resolve as resolve_act
from . import chain as _chain
from .chain import call_for as _chain_call, produced as _produced

__all__ = ["FuseReport", "Candidate", "fuse_structure", "residual_block", "BlockTracer"]

_ADOPTED = "_fusedres_forward_graph"     # the instance attribute that marks a rewritten forward


# ---------------------------------------------------------------------------------------------
# the report


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One place ``fuse`` looked at: a residual add (or a whole module it could not read).

    - ``path``: the module whose ``forward`` holds it (``""``: the model itself);
    - ``node``: the add's node name in that traced forward (``"add_1"``), or None for a whole
      module (an untraceable forward, or a class-based conversion);
    - ``branch``: the branch, piece by piece (``"normalization -> linear1 -> activation -> ..."``);
    - ``fused``: whether it now runs fused; ``recipe``: the fused call it became; ``reason``: why
      it was left alone.
    """
    path: str
    node: Optional[str]
    branch: str
    fused: bool
    recipe: Optional[str] = None
    reason: Optional[str] = None

    def __str__(self) -> str:
        where = (self.path or "<model>") + (f" [{self.node}]" if self.node else "")
        if self.fused:
            return f"fused  {where}: {self.branch}\n       -> {self.recipe}"
        return f"left   {where}: {self.branch}\n       reason: {self.reason}"


class FuseReport(list):
    """What ``fuse(model, report=True)`` found: a list of :class:`Candidate`, in model order;
    ``str(report)`` prints one entry per candidate. ``fused`` and ``left`` split it."""

    @property
    def fused(self) -> list[Candidate]:
        return [c for c in self if c.fused]

    @property
    def left(self) -> list[Candidate]:
        return [c for c in self if not c.fused]

    def __str__(self) -> str:
        head = f"fusedres.fuse: {len(self.fused)} fused, {len(self.left)} left alone"
        return "\n".join([head, *map(str, self)])


# ---------------------------------------------------------------------------------------------
# tracing


def _is_torch_module(m: nn.Module) -> bool:
    return type(m).__module__.split(".")[0] == "torch"


def _is_drop_path(m: nn.Module) -> bool:
    """timm's ``DropPath`` by its shape: a ``drop_prob`` and a ``scale_by_keep``, no state."""
    return (hasattr(m, "drop_prob") and hasattr(m, "scale_by_keep") and not list(m.parameters(recurse=True))
            and not list(m.buffers()) and not list(m.children()))


def _is_fusedres_module(m: nn.Module) -> bool:
    return type(m).__module__.split(".")[0] == "fusedres"


class BlockTracer(fx.Tracer):
    """Reads one module's own ``forward``: every submodule is a leaf (a ``call_module`` node)
    except ``nn.Sequential``, whose children are inlined in its order."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return type(m) is not nn.Sequential


def _modes(module: nn.Module) -> dict:
    return {m: m.training for m in module.modules()}


def _trace(module: nn.Module, cache: dict) -> fx.Graph:
    """The module's forward as a graph, or an exception saying why not (cached per module)."""
    key = id(module)
    if key in cache:
        result = cache[key][1]
        if isinstance(result, Exception):
            raise result
        return result
    modes = _modes(module)
    try:
        extra = [name for name in inspect.signature(module.forward).parameters][1:]
        if extra:
            # fx passes every argument as a proxy: `if mask is None` would be decided once, wrongly
            raise _Untraceable(f"its forward takes more than one input ({', '.join(extra)}): a traced graph would "
                               "freeze the Python decisions on them")
        graphs = []
        for training in (True, False):
            module.train(training)
            graphs.append(BlockTracer().trace(module))
        if graphs[0].python_code("self").src != graphs[1].python_code("self").src:
            raise _Untraceable("its forward reads self.training in Python (a traced graph would freeze one mode)")
        for m, t in modes.items():
            m.training = t
        graph = BlockTracer().trace(module)
    except Exception as e:     # noqa: BLE001 (any failure to trace stops this module only)
        err = e if isinstance(e, _Untraceable) else _Untraceable(f"{type(e).__name__}: {_first_line(e)}")
        cache[key] = (module, err)
        raise err
    finally:
        for m, t in modes.items():
            m.training = t
    cache[key] = (module, graph)
    return graph


class _Untraceable(Exception):
    pass


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][:160] if text else ""


# ---------------------------------------------------------------------------------------------
# branch pieces


@dataclasses.dataclass
class _Piece:
    """One step of a branch: ``kind`` in linear, norm, act, dropout, identity, scale (per
    channel), const (a number), drop_path, other. ``path``: the module or tensor, relative to
    the module whose forward is being rewritten; ``act``: the activation (a module path or a
    name); ``inplace``: an in-place activation."""
    kind: str
    label: str
    path: Optional[str] = None
    obj: Any = None
    act: Optional[str] = None
    value: float = 1.0
    inplace: bool = False
    why: str = ""


_ACT_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", F.relu_: "relu", torch.relu_: "relu", F.silu: "silu",
                  F.gelu: "gelu", F.leaky_relu: "leaky_relu", F.leaky_relu_: "leaky_relu"}
_INPLACE_FUNCTIONS = {F.relu_, torch.relu_, F.leaky_relu_}
_ACT_METHODS = {"relu": "relu", "relu_": "relu"}
_MULS = {operator.mul, torch.mul}
_ADDS = {operator.add, torch.add}
_ACT_MODULES = (nn.ReLU, nn.GELU, nn.SiLU, nn.LeakyReLU)
_NORM_MODULES = (nn.BatchNorm1d, nn.LayerNorm, nn.RMSNorm)


def _const(a) -> bool:
    return isinstance(a, (int, float)) and not isinstance(a, bool)


def _module_piece(path: str, m: nn.Module) -> _Piece:
    name = path
    t = type(m)
    if t is nn.Linear:
        return _Piece("linear", name, path, m)
    if t in _NORM_MODULES:
        return _Piece("norm", name, path, m)
    if t in _ACT_MODULES:
        return _Piece("act", name, path, m, act=path, inplace=bool(getattr(m, "inplace", False)))
    if t is nn.Dropout:
        return _Piece("dropout", name, path, m)
    if t is nn.Identity:
        return _Piece("identity", name, path, m)
    if _is_drop_path(m):
        return _Piece("drop_path", name, path, m)
    return _Piece("other", name, path, m, why=f"{name} ({t.__name__})")


def _function_piece(node: fx.Node, data: fx.Node, root: nn.Module, prefix: str) -> _Piece:
    """A call_function/call_method node of one data input ``data`` as a piece."""
    target, args, kwargs = node.target, node.args, node.kwargs
    name = node.name
    if node.op == "call_function" and target in _ACT_FUNCTIONS:
        act = _ACT_FUNCTIONS[target]
        if act == "gelu":
            approximate = kwargs.get("approximate", args[1] if len(args) > 1 else "none")
            act = "gelu_tanh" if approximate == "tanh" else "gelu"
        elif act == "leaky_relu":
            slope = kwargs.get("negative_slope", args[1] if len(args) > 1 else 0.01)
            act = f"leaky_relu:{float(slope)!r}"
        at = 2 if target is F.leaky_relu else 1      # the position of F.relu's / F.leaky_relu's inplace
        inplace = target in _INPLACE_FUNCTIONS or bool(kwargs.get("inplace", args[at] if len(args) > at else False))
        return _Piece("act", name, act=act, inplace=inplace)
    if node.op == "call_method" and target in _ACT_METHODS and len(args) == 1 and not kwargs:
        return _Piece("act", name, act=_ACT_METHODS[target], inplace=target.endswith("_"))
    if node.op == "call_function" and target is F.dropout:
        p = kwargs.get("p", args[1] if len(args) > 1 else 0.5)
        if p == 0:
            return _Piece("identity", name)
        return _Piece("other", name, why=f"{name} (F.dropout with p={p}: its training flag is fixed when traced; "
                                         "use nn.Dropout)")
    is_mul = (node.op == "call_function" and target in _MULS) or (node.op == "call_method" and target in ("mul",
                                                                                                          "mul_"))
    if is_mul and len(args) == 2 and not kwargs:
        other = args[1] if args[0] is data else args[0]
        if _const(other):
            return _Piece("const", name, value=float(other))
        if isinstance(other, fx.Node) and other.op == "get_attr":
            path = prefix + other.target
            try:
                tensor = _get_tensor(root, path)
            except AttributeError:
                tensor = None
            if isinstance(tensor, Tensor) and tensor.dim() == 1:
                return _Piece("scale", path, path, tensor)
    what = target if isinstance(target, str) else getattr(target, "__name__", str(target))
    return _Piece("other", name, why=f"{name} ({what})")


def _get_tensor(root: nn.Module, path: str):
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _data_inputs(node: fx.Node) -> list[fx.Node]:
    """The node's inputs that are values (not parameters read by get_attr)."""
    return [a for a in node.all_input_nodes if a.op != "get_attr"]


class _NotAChain(Exception):
    pass


def _walk(graph_end: fx.Node, start: fx.Node, root: nn.Module, prefix: str,
          cache: dict) -> tuple[list[_Piece], list[fx.Node]]:
    """The pieces from ``start`` (exclusive) to ``graph_end`` (inclusive), in forward order, and
    the nodes that hold them. Every node on the way has one data input, and every one but the
    end one user. Raises _NotAChain with a reason."""
    pieces, nodes = [], []
    node = graph_end
    while node is not start:
        if node.op == "placeholder":
            raise _NotAChain("the branch does not start at the residual's input")
        if node is not graph_end and len(node.users) != 1:
            raise _NotAChain(f"{node.name}'s value is also used outside the branch")
        if node.op == "get_attr":
            raise _NotAChain(f"{node.name} is a constant, not a branch of the input")
        data = _data_inputs(node)
        if len(data) != 1:
            raise _NotAChain(f"{node.name} takes {len(data)} tensors (the branch is not a chain)")
        if node.op == "call_module":
            if node.kwargs or len(node.args) != 1:
                raise _NotAChain(f"{node.name} is called with more than its input")
            path = prefix + node.target
            m = root.get_submodule(path)
            piece = _module_piece(path, m)
            if piece.kind == "other" and not _is_torch_module(m) and not _is_fusedres_module(m):
                pieces[:0] = _expand(m, path + ".", root, cache)
            else:
                pieces.insert(0, piece)
        elif node.op in ("call_function", "call_method"):
            pieces.insert(0, _function_piece(node, data[0], root, prefix))
        else:
            raise _NotAChain(f"{node.name} ({node.op})")
        nodes.append(node)
        node = data[0]
    return pieces, nodes


def _expand(m: nn.Module, prefix: str, root: nn.Module, cache: dict) -> list[_Piece]:
    """A user module inside a branch as pieces: its traced forward must be a chain from its one
    input to its output (timm's Mlp, LayerScale)."""
    name = prefix[:-1]
    try:
        graph = _trace(m, cache)
    except _Untraceable as e:
        return [_Piece("other", name, why=f"{name} ({type(m).__name__}: not traceable: {e})")]
    inputs = [n for n in graph.nodes if n.op == "placeholder" and n.users]
    out = next(n for n in graph.nodes if n.op == "output")
    if len(inputs) != 1 or not isinstance(out.args[0], fx.Node):
        return [_Piece("other", name, why=f"{name} ({type(m).__name__}: not one input to one output)")]
    try:
        pieces, _ = _walk(out.args[0], inputs[0], root, prefix, cache)
    except _NotAChain as e:
        return [_Piece("other", name, why=f"{name} ({type(m).__name__}: {e})")]
    return pieces


# ---------------------------------------------------------------------------------------------
# the grammar: pieces -> a fused call


@dataclasses.dataclass
class _Spec:
    linears: list
    norm: Optional[_Piece] = None
    pre_act: Optional[_Piece] = None
    hidden_norm: Optional[_Piece] = None
    act: Optional[_Piece] = None
    hidden_dropout: Optional[_Piece] = None
    dropout: Optional[_Piece] = None
    scale: Optional[_Piece] = None
    const: float = 1.0
    drop_path: Optional[_Piece] = None
    proj: Optional[str] = None


class _Unsupported(Exception):
    pass


def _parse(pieces: list[_Piece], x_is_input: bool) -> _Spec:
    """Match the pieces against the grammar (module docstring), or raise _Unsupported."""
    for p in pieces:
        if p.kind == "other":
            raise _Unsupported(f"unsupported piece: {p.why}")
    ps = [p for p in pieces if p.kind != "identity"]
    lin = [i for i, p in enumerate(ps) if p.kind == "linear"]
    if not lin:
        raise _Unsupported("no nn.Linear in the branch")
    if len(lin) > 2:
        raise _Unsupported(f"{len(lin)} Linears in the branch (at most 2)")
    spec = _Spec(linears=[ps[i] for i in lin])
    head, tail = ps[:lin[0]], ps[lin[-1] + 1:]
    middle = ps[lin[0] + 1:lin[1]] if len(lin) == 2 else []
    # head: [norm] -> [act]
    kinds = [p.kind for p in head]
    if kinds not in ([], ["norm"], ["act"], ["norm", "act"]):
        if "dropout" in kinds:
            raise _Unsupported("dropout on the block's input (fusedres drops the hidden layer or the branch output)")
        raise _Unsupported("before the first Linear: " + " -> ".join(f"{p.label} ({p.kind})" for p in head)
                           + "; supported: [norm] -> [activation]")
    for p in head:
        setattr(spec, "norm" if p.kind == "norm" else "pre_act", p)
    if spec.pre_act is not None and spec.pre_act.inplace and spec.norm is None and x_is_input:
        raise _Unsupported(f"{spec.pre_act.label} is in place on the block's input: eager's add then sees act(x)")
    # middle: [hidden norm] -> act -> [dropout]
    if len(lin) == 2:
        kinds = [p.kind for p in middle]
        if kinds in (["act", "norm"], ["act", "dropout", "norm"]):
            raise _Unsupported("a hidden norm after the activation (fusedres's hidden_norm comes before it: "
                               "not the same math)")
        if kinds not in (["act"], ["norm", "act"], ["act", "dropout"], ["norm", "act", "dropout"]):
            raise _Unsupported("between the Linears: " + " -> ".join(f"{p.label} ({p.kind})" for p in middle)
                               + "; supported: [norm] -> activation -> [dropout]")
        for p in middle:
            setattr(spec, {"norm": "hidden_norm", "act": "act", "dropout": "hidden_dropout"}[p.kind], p)
    elif spec.pre_act is None:
        raise _Unsupported("no activation before the Linear (fused_residual's branch is act(norm(x)) @ W.T + b)")
    # tail: any order of [dropout] [scale] [const] [drop_path], each at most once
    seen = set()
    for p in tail:
        if p.kind not in ("dropout", "scale", "const", "drop_path") or p.kind in seen:
            raise _Unsupported(f"after the last Linear: {p.label} ({p.kind}); supported: [dropout], "
                               "[per-channel scale], [constant], [DropPath], once each")
        seen.add(p.kind)
        if p.kind == "const":
            spec.const = p.value
        else:
            setattr(spec, p.kind, p)
    if spec.scale is not None and spec.const != 1.0:
        raise _Unsupported("both a per-channel scale and a constant on the branch")
    return spec


def _check_shapes(spec: _Spec, proj: Optional[nn.Linear]) -> None:
    from .norm import norm_kind
    fc1 = spec.linears[0].obj
    D = fc1.in_features
    if len(spec.linears) == 2:
        fc2 = spec.linears[1].obj
        if proj is not None:
            raise _Unsupported("a projection shortcut with a hidden layer (fused_residual_mlp has no proj_weight)")
        if fc2.in_features != fc1.out_features or fc2.out_features != D:
            raise _Unsupported(f"the Linears are {D} -> {fc1.out_features} -> {fc2.in_features} -> "
                               f"{fc2.out_features}: the block must map {D} back to {D}")
        out = D
    else:
        out = fc1.out_features
        if proj is None and out != D:
            raise _Unsupported(f"the Linear is {D} -> {out}: a residual add needs out == in")
        if proj is not None and (proj.in_features, proj.out_features) != (D, out):
            raise _Unsupported(f"the shortcut is {proj.in_features} -> {proj.out_features}, the branch {D} -> {out}")
        if proj is not None and spec.norm is not None:
            raise _Unsupported("a norm with a projection shortcut (fused_residual refuses it)")
    for p, width in ((spec.norm, D), (spec.hidden_norm, fc1.out_features)):
        if p is not None:
            try:
                norm_kind(p.obj, width, p.label)
            except (TypeError, ValueError) as e:
                raise _Unsupported(str(e)) from None
            if isinstance(p.obj, nn.LayerNorm) and tuple(p.obj.normalized_shape) != (width,):
                raise _Unsupported(f"{p.label} normalizes over {tuple(p.obj.normalized_shape)}, not the last dim")
    if spec.scale is not None and tuple(spec.scale.obj.shape) not in ((out,), (1,)):
        raise _Unsupported(f"the scale {spec.scale.label} has shape {list(spec.scale.obj.shape)}, not [{out}]")
    for p in (spec.pre_act, spec.act):
        if p is not None and p.path is not None:
            try:
                resolve_act(p.obj, p.label)
            except (TypeError, ValueError) as e:
                raise _Unsupported(str(e)) from None


def _check_dropout(spec: _Spec) -> None:
    """fused_residual refuses dropout with a projection shortcut: such a block stays eager."""
    if spec.proj is not None and spec.dropout is not None:
        raise _Unsupported(f"dropout ({spec.dropout.label}) with a projection shortcut (fused_residual takes no "
                           "dropout with proj_weight)")


def _recipe_text(spec: _Spec) -> str:
    def a(p):
        if p is None:
            return "None"
        return type(p.obj).__name__ + "()" if p.path else repr(_act(p.act).spec)
    parts = []
    if len(spec.linears) == 2:
        fc1, fc2 = (p.obj for p in spec.linears)
        parts.append(f"fused_residual_mlp(D={fc1.in_features}, H={fc1.out_features}")
        if spec.norm:
            parts.append(f"norm={type(spec.norm.obj).__name__}")
        parts.append(f"pre_act={a(spec.pre_act)}")
        if spec.hidden_norm:
            parts.append(f"hidden_norm={type(spec.hidden_norm.obj).__name__}")
        parts.append(f"act={a(spec.act)}")
        if spec.hidden_dropout:
            parts.append(f"hidden_dropout={spec.hidden_dropout.label} (p={spec.hidden_dropout.obj.p})")
    else:
        fc = spec.linears[0].obj
        parts.append(f"fused_residual({fc.in_features} -> {fc.out_features}")
        if spec.norm:
            parts.append(f"norm={type(spec.norm.obj).__name__}")
        parts.append(f"act={a(spec.pre_act)}")
        if spec.proj:
            parts.append(f"proj_weight={spec.proj}.weight")
    if spec.dropout:
        parts.append(f"dropout={spec.dropout.label} (p={spec.dropout.obj.p})")
    if spec.scale:
        parts.append(f"alpha={spec.scale.label} (per channel)")
    elif spec.const != 1.0:
        parts.append(f"alpha={spec.const!r}")
    if spec.drop_path:
        parts.append(f"sample_scale=DropPath({spec.drop_path.label})")
    return ", ".join(parts) + ")"


# ---------------------------------------------------------------------------------------------
# the call a fused block becomes


def _act(a) -> Optional[Activation]:
    """An activation argument of :func:`residual_block`: a module, a table name
    (``"leaky_relu:0.2"`` with its slope), or None."""
    if a is None or isinstance(a, nn.Module):
        return a
    if a.startswith("leaky_relu:"):
        return Activation("leaky_relu", float(a.split(":", 1)[1]))
    return ACTIVATIONS[a]


def residual_block(x: Tensor, fc1: nn.Linear, fc2: Optional[nn.Linear] = None, *, norm=None, pre_act=None,
                   hidden_norm=None, act=None, hidden_dropout: Optional[nn.Dropout] = None,
                   dropout: Optional[nn.Dropout] = None, scale: Optional[Tensor] = None, alpha: float = 1.0,
                   drop_path: Optional[nn.Module] = None, proj: Optional[nn.Linear] = None) -> Tensor:
    """What a structurally found block calls: ``shortcut + alpha * s * dropout(branch(x))`` on
    :func:`fusedres.fused_residual` (``fc2`` None) or :func:`fusedres.fused_residual_mlp`, with the
    user's modules (``fc1``, ``fc2``, ``norm``, ``hidden_norm``: the objects themselves; ``act`` and
    ``pre_act`` a module or an activation name; ``scale`` a per-channel tensor such as LayerScale's
    ``gamma``; ``drop_path`` a timm-style DropPath, whose ``drop_prob``, ``scale_by_keep`` and
    ``training`` are read here; dropouts' ``p`` and ``training`` too).

    Runs the branch as the original code did (the same modules, eager), with a warning, when the
    fused forms cannot compute it exactly at this call: an ``nn.BatchNorm1d`` over an input that
    is not ``(N, C)`` (it normalizes dim 1; the fused norm is over the last dimension), two
    dropouts of the block set to different modes (one in training, one in eval), hooks on its
    modules (or global ones) registered after ``fuse``, or a module replaced by one of another
    type (an adapter's Linear subclass).
    """
    pre, hid = _act(pre_act), _act(act)
    mlp = fc2 is not None
    kw = {}
    why = "an nn.BatchNorm1d over a 3-D input normalizes dim 1" if isinstance(norm, nn.BatchNorm1d) and \
        x.dim() != 2 else None
    modules = [m for m in (fc1, fc2, norm, hidden_norm, pre_act, act, hidden_dropout, dropout, drop_path, proj)
               if isinstance(m, nn.Module)]
    if any(_hooks(m) for m in modules) or _global_hooks():
        why = "a module of the block has hooks, which only its own forward runs"
    elif not _same_kinds(fc1, fc2, proj, norm, hidden_norm, pre_act, act, hidden_dropout, dropout):
        why = "a module of the block was replaced after fuse by one of another type"
    trainings = set()
    for d, key in ((dropout, "dropout"), (hidden_dropout, "hidden_dropout")):
        if d is not None and d.p > 0:
            kw[key] = d.p
            trainings.add(d.training)
    if len(trainings) > 1:
        why = "its two dropouts are in different modes (training and eval)"
    elif trainings:
        kw["training"] = trainings.pop()
    if why is not None:
        warnings.warn(f"fusedres: a block fused by structure runs eagerly at this call: {why}", RuntimeWarning,
                      stacklevel=2)
        return _replay(x, fc1, fc2, norm, pre, hidden_norm, hid, hidden_dropout, dropout, scale, alpha, drop_path,
                       proj)
    sample_scale = None
    if drop_path is not None:
        sample_scale = _drop_path_scale(x, drop_path)
    a = scale if scale is not None else alpha
    # a chain of such blocks hands norm statistics from one to the next (fusedres.chain): the
    # block is known by its first Linear
    chain = _chain_call(fc1, norm, x, fc1.training, proj)
    if mlp:
        from .mlp_op import fused_residual_mlp
        y = fused_residual_mlp(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, alpha=a, sample_scale=sample_scale,
                               pre_act=pre, act=hid, norm=norm, hidden_norm=hidden_norm, _chain=chain, **kw)
    else:
        from .op import fused_residual
        y = fused_residual(x, fc1.weight, fc1.bias, alpha=a, proj_weight=None if proj is None else proj.weight,
                           sample_scale=sample_scale, act=pre, norm=norm, _chain=chain, **kw)
    if _chain._NORMS_SEEN:
        _produced(y, fc1)
    return y


def _same_kinds(fc1, fc2, proj, norm, hidden_norm, pre_act, act, hidden_dropout, dropout) -> bool:
    """Whether the modules a fused call reads are still of the types ``fuse`` matched (a LoRA or
    parametrized Linear swapped in later computes more than ``weight`` and ``bias``)."""
    return (all(m is None or type(m) is nn.Linear for m in (fc1, fc2, proj))
            and all(m is None or type(m) in _NORM_MODULES for m in (norm, hidden_norm))
            and all(not isinstance(m, nn.Module) or type(m) in _ACT_MODULES for m in (pre_act, act))
            and all(m is None or type(m) is nn.Dropout for m in (hidden_dropout, dropout)))


def _drop_path_scale(x: Tensor, m: nn.Module) -> Optional[Tensor]:
    """timm's ``drop_path``'s draw, value for value: ``bernoulli(1 - p)`` per sample, divided by
    ``1 - p`` when ``scale_by_keep`` (and ``1 - p > 0``); None in eval or at ``p = 0``."""
    p = float(m.drop_prob)
    if p == 0.0 or not m.training:
        return None
    keep = 1.0 - p
    s = x.new_empty(x.shape[0]).bernoulli_(keep)
    if keep > 0.0 and m.scale_by_keep:
        s.div_(keep)
    return s


def _replay(x, fc1, fc2, norm, pre, hidden_norm, act, hidden_dropout, dropout, scale, alpha, drop_path, proj):
    """The branch as the original forward computes it, on the same modules."""
    h = x if norm is None else norm(x)
    if pre is not None:
        h = pre(h)
    h = fc1(h)
    if fc2 is not None:
        if hidden_norm is not None:
            h = hidden_norm(h)
        h = act(h)
        if hidden_dropout is not None:
            h = hidden_dropout(h)
        h = fc2(h)
    if dropout is not None:
        h = dropout(h)
    if scale is not None:
        h = h * scale
    elif alpha != 1.0:
        h = alpha * h
    if drop_path is not None:
        s = _drop_path_scale(h, drop_path)
        if s is not None:
            h = h * s.reshape((-1,) + (1,) * (h.dim() - 1))
    return (x if proj is None else proj(x)) + h


# ---------------------------------------------------------------------------------------------
# finding and rewriting


def _residual_adds(graph: fx.Graph):
    for node in graph.nodes:
        if node.op == "call_function" and node.target in _ADDS and len(node.args) == 2:
            yield node
        elif node.op == "call_method" and node.target in ("add", "add_") and len(node.args) == 2:
            yield node


def _ancestors(node: fx.Node) -> set:
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        for a in n.all_input_nodes:
            if a not in seen:
                seen.add(a)
                todo.append(a)
    return seen


def _match(add: fx.Node, root: nn.Module, cache: dict):
    """``None`` when the add is not a residual (no side is the other's input); otherwise
    ``(branch text, result)``, the result a ``(spec, x, nodes)`` or a reason string."""
    a, b = add.args
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return None
    options = []
    for short, branch in ((a, b), (b, a)):
        anc = _ancestors(branch)
        if short in anc:
            options.append((short, branch, None))
        elif (short.op == "call_module" and len(short.args) == 1 and isinstance(short.args[0], fx.Node)
              and short.args[0] in anc and len(short.users) == 1
              and type(root.get_submodule(short.target)) is nn.Linear):
            options.append((short.args[0], branch, (short, root.get_submodule(short.target))))
    if not options:
        return None
    x, branch, shortcut = options[0]
    try:
        pieces, nodes = _walk(branch, x, root, "", cache)
    except _NotAChain as e:
        return "?", f"not a chain of pieces: {e}"
    text = " -> ".join(p.label for p in pieces if p.kind != "identity" or p.path) or "(empty)"
    if len(branch.users) != 1:
        return text, f"{branch.name}'s value is also used outside the residual add"
    if shortcut is not None:
        if shortcut[1].bias is not None:
            return text, f"the shortcut {shortcut[0].target} is not a bias-free nn.Linear"
    if add.op == "call_method" and add.target == "add_":
        return text, "an in-place add (add_): the caller's tensor would change"
    if add.kwargs:
        return text, f"an add with keywords {dict(add.kwargs)}"
    try:
        spec = _parse(pieces, x_is_input=True)
        if shortcut is not None:
            spec.proj = shortcut[0].target
        _check_shapes(spec, shortcut[1] if shortcut else None)
        _check_dropout(spec)
        _check_hooks(spec, root)
    except _Unsupported as e:
        return text, str(e)
    return text, (spec, x, nodes + ([shortcut[0]] if shortcut else []))


def _hooks(m: nn.Module) -> bool:
    """Whether ``m`` has forward or backward hooks (pruning, old-style weight_norm and
    spectral_norm are forward pre-hooks): the fused call reads parameters, it calls no module."""
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or getattr(m, "_backward_pre_hooks", None))


def _global_hooks() -> bool:
    """Whether module hooks are registered globally (``nn.modules.module.register_module_*``)."""
    mm = torch.nn.modules.module
    return bool(mm._global_forward_hooks or mm._global_forward_pre_hooks or mm._global_backward_hooks
                or getattr(mm, "_global_backward_pre_hooks", None))


def _check_hooks(spec: _Spec, root: nn.Module) -> None:
    """A hook on a module of the branch (or on a container inlined into it) would not run in the
    fused call: such a block is left alone."""
    pieces = [*spec.linears, spec.norm, spec.pre_act, spec.hidden_norm, spec.act, spec.hidden_dropout, spec.dropout,
              spec.drop_path]
    paths = {p.path for p in pieces if p is not None and p.path and isinstance(p.obj, nn.Module)}
    if spec.proj:
        paths.add(spec.proj)
    for path in sorted(paths):
        parts = path.split(".")
        for i in range(1, len(parts) + 1):        # the module and the containers it sits in
            sub = ".".join(parts[:i])
            if _hooks(root.get_submodule(sub)):
                raise _Unsupported(f"{sub} has hooks, which the fused call (it reads parameters, calls no module) "
                                   "would not run")
    if _global_hooks():
        raise _Unsupported("module hooks are registered globally; the fused call would not run them")


def _rewrite(graph: fx.Graph, add: fx.Node, spec: _Spec, x: fx.Node, nodes: list) -> None:
    with graph.inserting_before(add):
        def ref(p):
            return None if p is None else graph.get_attr(p.path)

        def act(p):
            if p is None:
                return None
            return graph.get_attr(p.path) if p.path else p.act
        kwargs = dict(norm=ref(spec.norm), pre_act=act(spec.pre_act), dropout=ref(spec.dropout),
                      scale=ref(spec.scale), alpha=spec.const, drop_path=ref(spec.drop_path))
        args = [x, graph.get_attr(spec.linears[0].path)]
        if len(spec.linears) == 2:
            args.append(graph.get_attr(spec.linears[1].path))
            kwargs.update(hidden_norm=ref(spec.hidden_norm), act=act(spec.act),
                          hidden_dropout=ref(spec.hidden_dropout))
        if spec.proj is not None:
            kwargs["proj"] = graph.get_attr(spec.proj)
        kwargs = {k: v for k, v in kwargs.items() if v is not None and not (k == "alpha" and v == 1.0)}
        fused = graph.call_function(residual_block, tuple(args), kwargs)
    add.replace_all_uses_with(fused)
    graph.erase_node(add)
    for n in nodes:      # from the add back to the input: each one's only user is already gone
        graph.erase_node(n)


_counter = itertools.count()


def _install(module: nn.Module, graph: fx.Graph) -> None:
    """Make the graph's code ``module``'s forward (an instance attribute)."""
    graph.lint()
    code = graph.python_code(root_module="self")
    name = f"<fusedres.fuse:{type(module).__name__}:{next(_counter)}>"
    linecache.cache[name] = (len(code.src), None, code.src.splitlines(True), name)
    scope = dict(code.globals)
    exec(compile(code.src, name, "exec"), scope)     # noqa: S102 (fx's own generated code)
    module.forward = types.MethodType(scope["forward"], module)
    object.__setattr__(module, _ADOPTED, graph)


def fuse_structure(model: nn.Module, report: FuseReport, path: str = "", cache: Optional[dict] = None) -> None:
    """The structural pass of :func:`fusedres.fuse` over ``model`` and its descendants,
    appending to ``report``."""
    cache = {} if cache is None else cache
    _fuse_one(model, path, report, cache)
    for name, child in model.named_children():
        fuse_structure(child, report, f"{path}.{name}" if path else name, cache)


def _fuse_one(module: nn.Module, path: str, report: FuseReport, cache: dict) -> None:
    if (_is_torch_module(module) or _is_fusedres_module(module) or _is_drop_path(module)
            or _ADOPTED in module.__dict__):
        return
    try:
        graph = _trace(module, cache)
    except _Untraceable as e:
        report.append(Candidate(path, None, f"{type(module).__name__}.forward", False,
                                reason=f"untraceable: {e}; its submodules are searched on their own"))
        return
    graph = _copy(graph)
    changed = False
    for add in list(_residual_adds(graph)):
        found = _match(add, module, cache)
        if found is None:
            continue
        text, result = found
        if isinstance(result, str):
            report.append(Candidate(path, add.name, text, False, reason=result))
            continue
        spec, x, nodes = result
        report.append(Candidate(path, add.name, text, True, recipe=_recipe_text(spec)))
        _rewrite(graph, add, spec, x, nodes)
        changed = True
    if changed:
        _install(module, graph)


def _copy(graph: fx.Graph) -> fx.Graph:
    new = fx.Graph()
    out = new.graph_copy(graph, {})
    new.output(out)
    return new
