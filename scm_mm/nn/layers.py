"""Linear and convolution layers whose forward-mode derivative costs one matmul / convolution, not two.

Under torch.func.jvp over a network's inputs, the weights have no tangent, but functorch hands the
forward-mode rules of linear and convolution a materialised zero tangent for them, and the rules
multiply by it (torch 2.14): a profile of a U-Net JVP showed 150 convolution calls for 50
convolutions (62% of the JVP time) and 50 matmuls for 25 linears. While a tangent is live, these
layers route to a Function that is told at dispatch which of weight and bias really carry a tangent,
so its `jvp` computes only those terms; otherwise they are the stock layers. Backwards are aten's.

A Function's tensor inputs without a tangent still get a zero tangent made for them (zeros_like of
every weight and bias, per call, with dual tensors too), so under no_grad, where nothing needs their
gradient either, weight and bias without a tangent ride in a tuple that autograd does not see.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .attention import tangent_is_live


class _ConvJVP(torch.autograd.Function):
    @staticmethod
    def forward(
        x: Tensor,
        weight: Tensor | None,  # None: in `const`
        bias: Tensor | None,
        stride: Any,
        padding: Any,
        dilation: Any,
        groups: int,
        live: tuple[bool, bool],  # whether weight and bias carry a tangent (zeros otherwise)
        const: tuple[Tensor, Tensor | None] | None = None,  # (weight, bias) without tangent or gradient
    ) -> Tensor:
        if const is not None:
            weight, bias = const
        return torch.ops.aten.convolution(x, weight, bias, stride, padding, dilation, False, [0] * len(stride), groups)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        x, weight, bias, stride, padding, dilation, groups, ctx.live, const = inputs
        if const is not None:
            weight, bias = const
        ctx.save_for_backward(x, weight)
        ctx.save_for_forward(x, weight)
        ctx.bias_shape = None if bias is None else list(bias.shape)
        ctx.out_shape = output.shape
        ctx.dtype = output.dtype  # autocast's on CUDA; CPU autocast does not cast aten.convolution
        ctx.args = (stride, padding, dilation, groups)

    @staticmethod
    def jvp(ctx: Any, tx: Tensor | None, tw: Tensor | None, tb: Tensor | None, *_: None) -> Tensor:
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.args

        def conv(a: Tensor, w: Tensor) -> Tensor:
            return torch.ops.aten.convolution(a, w, None, stride, padding, dilation, False, [0] * len(stride), groups)

        tw, tb = (tw if ctx.live[0] else None), (tb if ctx.live[1] else None)
        parts = [conv(a, w) for a, w in ((tx, weight), (x, tw)) if a is not None and w is not None]
        out = sum(parts[1:], parts[0]) if parts else x.new_zeros(ctx.out_shape)
        if tb is not None:
            out = out + tb.reshape(1, -1, *([1] * (out.ndim - 2)))
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple:
        grad, x, weight = (a.to(ctx.dtype) for a in (grad, *ctx.saved_tensors))  # as `_LinearJVP.backward`
        stride, padding, dilation, groups = ctx.args
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]]
        gx, gw, gb = torch.ops.aten.convolution_backward(
            grad, x, weight, ctx.bias_shape, stride, padding, dilation, False, [0] * len(stride), groups, mask
        )
        return gx, gw, gb, None, None, None, None, None, None


def _constants(weight: Tensor, bias: Tensor | None, live: tuple[bool, bool]) -> tuple[Tensor, Tensor | None] | None:
    """(weight, bias) to pass outside autograd's view, or None when autograd must see them."""
    return (weight, bias) if not any(live) and not torch.is_grad_enabled() else None


class _JVPConvMixin:
    """Replaces `_conv_forward` of nn.ConvNd while a tangent is live (zero padding only)."""

    padding_mode: Any
    padding: Any
    stride: Any
    dilation: Any
    groups: int

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if self.padding_mode == "zeros" and not isinstance(self.padding, str) and tangent_is_live(input, weight):
            live = (tangent_is_live(weight), bias is not None and tangent_is_live(bias))
            const = _constants(weight, bias, live)
            args = (self.stride, self.padding, self.dilation, self.groups, live, const)
            if const is not None:
                return _ConvJVP.apply(input, None, None, *args)
            return _ConvJVP.apply(input, weight, bias, *args)
        return super()._conv_forward(input, weight, bias)  # type: ignore[misc]


class Conv1d(_JVPConvMixin, nn.Conv1d):
    pass


class Conv2d(_JVPConvMixin, nn.Conv2d):
    pass


class Conv3d(_JVPConvMixin, nn.Conv3d):
    pass


CONV: dict[int, type[nn.Module]] = {1: Conv1d, 2: Conv2d, 3: Conv3d}


class _LinearJVP(torch.autograd.Function):
    @staticmethod
    def forward(
        x: Tensor,
        weight: Tensor | None,  # None: in `const`
        bias: Tensor | None,
        live: tuple[bool, bool],  # whether weight and bias carry a tangent (zeros otherwise)
        const: tuple[Tensor, Tensor | None] | None = None,  # (weight, bias) without tangent or gradient
    ) -> Tensor:
        if const is not None:
            weight, bias = const
        assert weight is not None
        return nn.functional.linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        x, weight, bias, ctx.live, const = inputs
        if const is not None:
            weight, bias = const
        ctx.save_for_backward(x, weight)
        ctx.save_for_forward(x, weight)
        ctx.has_bias, ctx.out_shape = bias is not None, output.shape
        ctx.dtype = output.dtype  # the forward's compute dtype: autocast's, when it is on

    @staticmethod
    def jvp(ctx: Any, tx: Tensor | None, tw: Tensor | None, tb: Tensor | None, *_: None) -> Tensor:
        x, weight = ctx.saved_tensors
        tw, tb = (tw if ctx.live[0] else None), (tb if ctx.live[1] else None)
        parts = [nn.functional.linear(a, w) for a, w in ((tx, weight), (x, tw)) if a is not None and w is not None]
        out = sum(parts[1:], parts[0]) if parts else x.new_zeros(ctx.out_shape)
        return out + tb if tb is not None else out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple:
        # In the forward's dtype, as autocast's own backward would (autograd casts each gradient to its input's).
        grad, x, weight = (a.to(ctx.dtype) for a in (grad, *ctx.saved_tensors))
        gx = grad @ weight if ctx.needs_input_grad[0] else None
        gw = grad.reshape(-1, grad.shape[-1]).T @ x.reshape(-1, x.shape[-1]) if ctx.needs_input_grad[1] else None
        gb = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb, None, None


def linear(input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """nn.functional.linear with the cheaper forward-mode rule while a tangent is live."""
    if tangent_is_live(input, weight):
        live = (tangent_is_live(weight), bias is not None and tangent_is_live(bias))
        const = _constants(weight, bias, live)
        if const is not None:
            return _LinearJVP.apply(input, None, None, live, const)
        return _LinearJVP.apply(input, weight, bias, live)
    return nn.functional.linear(input, weight, bias)


class Linear(nn.Linear):
    """nn.Linear with the cheaper forward-mode rule while a tangent is live."""

    def forward(self, input: Tensor) -> Tensor:
        return linear(input, self.weight, self.bias)


class Linear32(Linear):
    """`Linear` computed in at least float32 whatever autocast says; the output is float32 (float64 for a
    float64 input or weight), so its consumer casts it where it meets bf16/fp16 activations.

    For the condition path: the embedding MLP and the scale, shift and gate projections of the embedding.
    rCM and Wan keep the time embedding and the modulation in fp32 (reference/scm.md §5), and sCM's time
    tangent (up to 1000·cos t sin t per sinusoid channel) flows through exactly these layers: in bf16,
    d emb/dt was off by 0.45% (review of scm_mm/nn, finding 4). They see (B, emb_dim) rows, not tokens, so
    fp32 costs little. Inside, autocast is off, so the forward and the `_LinearJVP` tangent (run in the same
    context) stay in this dtype, as does the backward when it runs outside autocast (as the training loop
    runs it; under autocast the stock backward and `_LinearJVP.backward` both drop to autocast's dtype).
    """

    def forward(self, input: Tensor) -> Tensor:
        dtype = torch.promote_types(torch.promote_types(input.dtype, self.weight.dtype), torch.float32)
        bias = None if self.bias is None else self.bias.to(dtype)
        with torch.autocast(input.device.type, enabled=False):
            return linear(input.to(dtype), self.weight.to(dtype), bias)
