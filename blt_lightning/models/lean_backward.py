"""Keeping less for backward than autograd would, without changing a result: three ways.

1. Autograd functions for RMSNorm and SwiGLU's gate. Autograd keeps every intermediate a backward formula
   names: for RMSNorm the input and the normalised input, for SwiGLU's w2(silu(gate) * up) silu(gate) and
   the product besides gate and up. These keep the input (and 1 / rms), or the stacked product [gate, up],
   and recompute the rest in backward, which is elementwise and cheap.
2. Recipes. A tensor that is a cheap function of tensors backward keeps anyway (a norm's output of its
   input, the copies of keys each block of queries meets, the keys each query gathers) is marked with
   remade_in_backward (or computed by remade); while keeping_recipes() is on (the models' forward), an
   operation that saves it (or a view of it) keeps the recipe instead, and backward makes it again,
   bitwise the same. (Under autocast a product keeps its own low-precision copy of its input, so there
   norms' outputs gain nothing.)
3. swiglu_recomputed: the feed-forward's hidden [gate, up] itself is recomputed in backward from its
   input (one more product with w13): the option for long rows, where it is the largest thing kept.

What each gives, measured on bench/training.py's 48M BLT training on a 1 x 8192-byte row: its tensors peak at
2,113 MB without any of these, 1,823 MB with (1), 1,522 MB with (1) and (2) at the same speed, and (with
attention's masks and output rows as recipes and the hidden remade a chunk of rows at a time) 1,157 MB with (3) in
every block ("feed_forward"), at about the same speed. (The demo's tiny BLT, where little is kept, runs ~4% slower
with (2): remaking costs it more than it saves.) On the CPU, forward results are bitwise those of torch's operations;
gradients agree to rounding (with recipes, bitwise); second derivatives raise. Without gradients the modules take
torch's own paths and nothing is marked.
"""

import functools
import threading
import weakref
from collections.abc import Callable
from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm over the last dimension (the same weight and eps) whose backward keeps x and 1 / rms only,
    and whose output, kept by the product that reads it, is remade from them."""

    def __init__(self, dim: int, eps: float | None = None):
        super().__init__(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return super().forward(x)
        normalised, inverse_rms = _RMSNorm.apply(x, self.weight, self.eps)
        return remade_in_backward(normalised, functools.partial(_normalise, x.detach(), inverse_rms,
                                                                self.weight.detach()))


def _inverse_rms(x: torch.Tensor, eps: float | None) -> torch.Tensor:
    """torch's own steps (F.rms_norm): in at least float32; eps by default that of the computing dtype."""
    wide = x.to(torch.promote_types(x.dtype, torch.float32))
    eps = torch.finfo(wide.dtype).eps if eps is None else eps
    return torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + eps)


def _normalise(x: torch.Tensor, inverse_rms: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The norm's output, in x's dtype."""
    return (x.to(inverse_rms.dtype) * inverse_rms * weight).to(x.dtype)


class _RMSNorm(torch.autograd.Function):
    """(the norm's output, 1 / rms): the second for a recipe of the first, without a gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float | None) -> tuple[torch.Tensor, torch.Tensor]:
        inverse_rms = _inverse_rms(x, eps)
        ctx.save_for_backward(x, inverse_rms, weight)
        ctx.mark_non_differentiable(inverse_rms)
        return _normalise(x, inverse_rms, weight), inverse_rms

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor, _: torch.Tensor):
        x, inverse_rms, weight = ctx.saved_tensors
        normalised = x.to(inverse_rms.dtype) * inverse_rms
        grad = grad.to(inverse_rms.dtype)
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad * normalised).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        grad_normalised = grad * weight
        # d/dx of x / rms(x): the component of the incoming gradient along the normalised input is removed.
        projection = (grad_normalised * normalised).mean(-1, keepdim=True)
        grad_x = inverse_rms * (grad_normalised - normalised * projection)
        return grad_x.to(x.dtype), grad_weight, None


def swiglu_down(gate_up: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """F.linear(silu(gate) * up, w2) of gate_up = [gate, up] (halves of the last dimension), keeping only
    gate_up (and w2) for backward."""
    return _SwiGLUDown.apply(gate_up, w2)


class _SwiGLUDown(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate_up, w2)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, w2.to(gate_up.dtype))  # w2 cast as autocast would (bf16-mixed)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        gate_up, w2 = ctx.saved_tensors
        grad = grad.to(gate_up.dtype)  # bf16 from the autocast product even of a float32 gate_up
        # into a tensor of its own: gate_up stays as saved (a second backward with retain_graph reads it)
        grad_gate_up, grad_w2 = _swiglu_gradients(gate_up, w2.to(grad.dtype), grad, ctx.needs_input_grad[1],
                                                  torch.empty_like(gate_up))
        return grad_gate_up, grad_w2.to(w2.dtype) if grad_w2 is not None else None


def _swiglu_gradients(gate_up: torch.Tensor, w2: torch.Tensor, grad: torch.Tensor, w2_needs_grad: bool,
                      out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The gradients of [gate, up] (written into `out`, which may be gate_up itself) and of w2 (None unless
    needed), given the gradient of F.linear(silu(gate) * up, w2); all in one dtype, the result's too."""
    gate, up = gate_up.chunk(2, dim=-1)
    silu = F.silu(gate)
    grad_w2 = _rows(grad).t() @ _rows(silu * up) if w2_needs_grad else None
    grad_hidden = grad @ w2
    grad_up = silu.mul_(grad_hidden)
    grad_hidden.mul_(up)  # the gradient of silu(gate); up is not read again
    out_gate, out_up = out.chunk(2, dim=-1)
    out_up.copy_(grad_up)
    del silu, grad_up
    out_gate.copy_(torch.ops.aten.silu_backward(grad_hidden, gate))
    return out, grad_w2


# Marked tensors by the device and address of their storage: an operation may save a view of one (F.linear
# saves its input as rows). An entry goes when its tensor does. Tensors are marked only in a thread inside
# keeping_recipes(), where the hooks that use the marks are on.
_recipes: dict[tuple[torch.device, int], "_Mark"] = {}
_inside = threading.local()


class _Mark(NamedTuple):
    tensor: weakref.ref
    version: int  # the tensor's when marked: changed in place since, it is kept itself
    recipe: functools.partial
    source_versions: tuple[int, ...]  # those of the recipe's tensors, checked when it runs


def remade_in_backward(tensor: torch.Tensor, recipe: functools.partial) -> torch.Tensor:
    """Mark `tensor`, the result of an operation: saved for backward inside keeping_recipes(), it is kept as
    `recipe`, a partial over tensors kept anyway that makes it again (the same values and layout). Returns it."""
    if (not torch.compiler.is_compiling() and getattr(_inside, "depth", 0) and torch.is_grad_enabled()
            and _markable(tensor) and _owns_its_storage(tensor)):
        key = _address(tensor)

        def forget(ref: weakref.ref) -> None:
            if key in _recipes and _recipes[key].tensor is ref:
                del _recipes[key]

        sources = tuple(a._version for a in recipe.args if isinstance(a, torch.Tensor))
        _recipes[key] = _Mark(weakref.ref(tensor, forget), tensor._version, recipe, sources)
    return tensor


def remade(fn: Callable[..., torch.Tensor], *args) -> torch.Tensor:
    """fn(*args), marked with fn over the same arguments (detached) as its recipe: for a cheap function of
    tensors backward keeps anyway."""
    detached = (a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    return remade_in_backward(fn(*args), functools.partial(fn, *detached))


def _markable(t: torch.Tensor) -> bool:
    """Plain dense tensors with memory: sparse, meta (address 0) and subclassed ones are kept as they are."""
    return type(t) is torch.Tensor and t.layout == torch.strided and t.device.type != "meta" and t.numel() > 0


def _owns_its_storage(t: torch.Tensor) -> bool:
    """Whether t is all of its storage, contiguous: then a view of it is a view of the remade tensor too."""
    return (t.is_contiguous() and t.storage_offset() == 0
            and t.untyped_storage().nbytes() == t.numel() * t.element_size())


def _address(t: torch.Tensor) -> tuple[torch.device, int]:
    return t.device, t.untyped_storage().data_ptr()


def _modified() -> RuntimeError:
    return RuntimeError("one of the variables needed for gradient computation has been modified by an inplace "
                        "operation (a tensor kept for backward inside keeping_recipes, or one a recipe reads)")


class _Kept(NamedTuple):
    """A saved tensor kept as it is, with its version: autograd checks none once hooks are on, so _unpack does."""

    tensor: torch.Tensor
    version: int

    def make(self) -> torch.Tensor:
        if self.tensor._version != self.version:
            raise _modified()
        return self.tensor


class _Remade(NamedTuple):
    """A saved view of a marked tensor: the mark, and where the view lies in the remade tensor."""

    mark: _Mark
    size: torch.Size
    stride: tuple[int, ...]
    offset: int

    def make(self) -> torch.Tensor:
        sources = [a for a in self.mark.recipe.args if isinstance(a, torch.Tensor)]
        if tuple(a._version for a in sources) != self.mark.source_versions:
            raise _modified()
        return self.mark.recipe().as_strided(self.size, self.stride, self.offset)


def _pack(t: torch.Tensor) -> _Kept | _Remade:
    mark = _recipes.get(_address(t)) if _markable(t) else None
    marked = mark.tensor() if mark is not None else None
    if marked is None or marked.dtype != t.dtype or t._version != mark.version:  # a view shares the version
        return _Kept(t, t._version)
    return _Remade(mark, t.size(), t.stride(), t.storage_offset())


def _unpack(kept: _Kept | _Remade) -> torch.Tensor:
    return kept.make()


@contextmanager
def keeping_recipes():
    """The context in which tensors are marked and saved marked tensors kept as their recipes (the models'
    forward). Off without gradients, under torch.compile (inside a compiled block nothing is marked: the
    compiler decides what to keep), and where saved-tensor hooks may not be set (see _hooks_are_free)."""
    if not torch.is_grad_enabled() or torch.compiler.is_compiling() or not _hooks_are_free():
        yield
        return
    _inside.depth = getattr(_inside, "depth", 0) + 1
    try:
        with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
            yield
    finally:
        _inside.depth -= 1


def _hooks_are_free() -> bool:
    """Whether hooks are enabled (torch.func's transforms disable them) and none are set already (offloading,
    a count of what is kept: they would no longer see what is saved inside). torch has only private queries
    for these; without them (torch < 2.8) recipes stay off."""
    queries = torch._C._autograd
    top = getattr(queries, "_top_saved_tensors_default_hooks", None)
    enabled = getattr(queries, "_saved_tensors_hooks_is_enabled", None)
    return top is not None and enabled is not None and enabled() and top(True) is None


def swiglu_recomputed(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """F.linear(silu(gate) * up, w2) of [gate, up] = F.linear(x, w13), keeping only x and the weights for
    backward, which computes [gate, up] again."""
    return _SwiGLURecomputed.apply(x, w13, w2)


# Elements of [gate, up] _SwiGLURecomputed's backward makes at a time (16 MB in float32): it takes the rows in
# chunks, as with the hidden of a 1 x 8192-byte row and 768 wide it would otherwise hold that hidden, its
# gradient and silu(gate) * up at once (96 MB), the peak of a training step.
RECOMPUTE_CHUNK_ELEMENTS = 1 << 22


class _SwiGLURecomputed(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        gate_up = F.linear(x, w13)  # under autocast, in its dtype: backward casts to that
        ctx.save_for_backward(x, w13, w2)
        ctx.dtype = gate_up.dtype
        gate, up = gate_up.chunk(2, dim=-1)
        return F.linear(F.silu(gate, inplace=True).mul_(up), w2.to(gate_up.dtype))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, w13, w2 = ctx.saved_tensors
        needs_x, needs_w13, needs_w2 = ctx.needs_input_grad
        x_, w13_, w2_, grad = (_rows(t.to(ctx.dtype)) for t in (x, w13, w2, grad))
        grad_x = torch.empty_like(x_) if needs_x else None
        grad_w13 = grad_w2 = None  # the sums over chunks, in the weights' dtypes
        n = x_.shape[0]
        chunks = max(1, -(-n * w13_.shape[0] // RECOMPUTE_CHUNK_ELEMENTS))
        size = max(1, -(-n // chunks))  # equal chunks, the last maybe shorter
        for start in range(0, n, size):
            rows = slice(start, start + size)
            gate_up = F.linear(x_[rows], w13_)
            grad_gate_up, part_w2 = _swiglu_gradients(gate_up, w2_, grad[rows], needs_w2, gate_up)  # in place
            if needs_w2:
                grad_w2 = _sum(grad_w2, part_w2.to(w2.dtype))
            if needs_w13:
                grad_w13 = _sum(grad_w13, (grad_gate_up.t() @ x_[rows]).to(w13.dtype))
            if needs_x:
                torch.mm(grad_gate_up, w13_, out=grad_x[rows])
        grad_x = grad_x.to(x.dtype).view(x.shape) if needs_x else None
        return grad_x, grad_w13, grad_w2


def _sum(total: torch.Tensor | None, part: torch.Tensor) -> torch.Tensor:
    return part if total is None else total.add_(part)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., n] as [rows, n]: a weight's gradient is a product over them."""
    return t.reshape(-1, t.shape[-1])
