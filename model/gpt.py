"""GPT-2 in plain PyTorch: config presets, blocks, the model.

Reads top to bottom like nanoGPT's model.py. Parameter names follow GPT-2's
checkpoints (``transformer.h.0.attn.c_attn``...), with ``nn.Linear`` weights
stored (out, in); ``model.weights`` converts to and from the Hub's layout.
Inference with a KV cache lives in ``model.generation``; here attention only
takes an optional cache object so that the training path stays plain.
"""
from __future__ import annotations

import contextlib
import math
import platform
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


@dataclass
class GPTConfig:
    name: str = "gpt2"
    vocab_size: int = 50257
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    layer_norm_epsilon: float = 1e-5

    @classmethod
    def from_name(cls, name: str, **overrides) -> "GPTConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], "name": name, **overrides})

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def num_params(self) -> int:
        """Parameter count with the LM head tied to the token embedding."""
        d, layers = self.n_embd, self.n_layer
        block = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
        return self.vocab_size * d + self.block_size * d + layers * block + 2 * d

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, dict] = {
    "tiny": dict(n_layer=4, n_head=4, n_embd=128),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
}


# x86 only: measured there; on Arm the default BLAS may well be the faster one.
ONEDNN = (platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available()
          and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def uses_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """fp32 on the CPU, where oneDNN's matmul beats the default BLAS (MKL) at ``x @ weight.T``.

    Measured on an AMD EPYC: ~1.2x MKL's speed restricted to AVX2 at a training
    step's shapes, ~2x with AVX-512 (MKL keeps to its AVX2 code on AMD CPUs), ~3.5x
    for one token through the LM head. The backward's two matmuls (``g @ W`` and
    ``g.T @ x``) gain nothing there without a transposed copy of the weight, so
    they stay with MKL.
    """
    return ONEDNN and x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, through oneDNN where ``uses_onednn``; no autograd (``Linear`` adds it)."""
    if not uses_onednn(x, weight):
        return F.linear(x, weight, bias)
    y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), weight, bias, "none", [], "")
    return y.view(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """``nn.Linear`` whose forward is ``linear``: training, evaluation and generation take the same matmul."""

    def forward(self, x):
        needs_graph = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, self.weight, self.bias))
        if needs_graph and uses_onednn(x, self.weight):
            return OneDNNLinear.apply(x, self.weight, self.bias)
        return linear(x, self.weight, self.bias)


class OneDNNLinear(torch.autograd.Function):
    """``linear`` for autograd; the gradients are the default BLAS's matmuls, as ``F.linear``'s backward makes them."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        grad_x = (g @ weight).view(x.shape) if ctx.needs_input_grad[0] else None
        grad_w = g.t() @ x.reshape(-1, x.shape[-1]) if ctx.needs_input_grad[1] else None
        grad_b = g.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


def norm_linear(norm: nn.LayerNorm | None, lin: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``lin(norm(x))``; when it trains a plain ``Linear`` in fp32, through ``LayerNormLinear``, which keeps less for
    backward. In bf16 (CPU) the recomputed LayerNorm cost ~3 % of a step for half the saving, so autograd keeps both."""
    if norm is None:
        return lin(x)
    if (type(lin) is Linear and x.dtype == torch.float32 and torch.is_grad_enabled()
            and any(t.requires_grad for t in (x, norm.weight, lin.weight))):
        return LayerNormLinear.apply(x, norm.weight, norm.bias, norm.eps, lin.weight, lin.bias)
    return lin(norm(x))


class LayerNormLinear(torch.autograd.Function):
    """``linear(layer_norm(x), weight, bias)`` that keeps ``x`` (with its mean and 1/std) alone for backward.

    Left to autograd, both ``x`` (for the LayerNorm's backward) and its output
    (for the weight's gradient) stay alive until backward: two (tokens x d)
    tensors for each of a block's two LayerNorms. Recomputing the LayerNorm in
    backward costs one pass over ``x`` and saves one of them; the gradients are
    the same to the bit.
    """

    @staticmethod
    def forward(ctx, x, ln_weight, ln_bias, eps, weight, bias):
        y, mean, rstd = torch.native_layer_norm(x, [x.shape[-1]], ln_weight, ln_bias, eps)
        ctx.save_for_backward(x, mean, rstd, ln_weight, ln_bias, weight)
        ctx.eps, ctx.has_bias = eps, bias is not None
        return linear(y, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, mean, rstd, ln_weight, ln_bias, weight = ctx.saved_tensors
        need_x, need_ln_w, need_ln_b, _, need_w, need_b = ctx.needs_input_grad
        g = grad.reshape(-1, grad.shape[-1])
        grad_w = grad_b = None
        if need_w:
            y = torch.native_layer_norm(x, [x.shape[-1]], ln_weight, ln_bias, ctx.eps)[0]
            grad_w = g.t() @ y.reshape(-1, y.shape[-1])
            del y
        if ctx.has_bias and need_b:
            grad_b = g.sum(0)
        grad_x = grad_ln_w = grad_ln_b = None
        if need_x or need_ln_w or need_ln_b:
            grad_y = (g @ weight).view(x.shape)
            grad_x, grad_ln_w, grad_ln_b = torch.ops.aten.native_layer_norm_backward(
                grad_y, x, [x.shape[-1]], mean, rstd, ln_weight, ln_bias, [need_x, need_ln_w, need_ln_b])
        return grad_x, grad_ln_w, grad_ln_b, None, grad_w, grad_b


# Training on the CPU, SDPA's flash kernel is the default; in bf16 its backward is slower than the math path's
# at instruction lengths (a GPT-2 step of 8 x 96 tokens took ~7 % longer on flash, 8 x 192 ~5 %; about even at 320;
# 6-12 % faster at 512), so shorter bf16 batches take the math path. In fp32 flash was as fast at instruction
# lengths and 16 % faster at 8 x 512, where the math path's T x T attention weights added 1.2 GB to the peak.
MATH_ATTENTION_BELOW = 384


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = Linear(config.n_embd, config.n_embd)
        self.dropout = config.dropout

    def forward(self, x, cache=None, layer: int = 0, mask=None, packing=None, norm=None):
        """``x``: the block's input, normalized here by ``norm`` (the block's ``ln_1``) on the way into ``c_attn``."""
        qkv = norm_linear(norm, self.c_attn, x)
        if packing is not None:
            qkv = packing.unpack(qkv)
        B, T, C = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
        q, k, v = qkv.split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        # Without an explicit mask: causal over a full sequence, or one new token that sees everything cached.
        causal = mask is None and T > 1
        dropout = self.dropout if self.training else 0.0
        math = self.training and x.device.type == "cpu" and q.dtype == torch.bfloat16 and T < MATH_ATTENTION_BELOW
        backend = sdpa_kernel(SDPBackend.MATH) if math else contextlib.nullcontext()
        with backend:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.c_proj(packing.pack(y) if packing is not None else y)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x, norm=None):
        """``x``: the residual stream, normalized here by ``norm`` (the block's ``ln_2``) on the way into ``c_fc``."""
        h = norm_linear(norm, self.c_fc, x)
        if torch.is_grad_enabled() and type(self.c_proj) is Linear and self.c_proj.weight.requires_grad:
            return GeluLinear.apply(h, self.c_proj.weight, self.c_proj.bias)
        return self.c_proj(gelu_tanh(h))


GELU_K = 2 * math.sqrt(2 / math.pi)  # GPT-2's tanh GELU: x * sigmoid(K * (x + A x^3))
GELU_A = 0.044715


def gelu_tanh(h: torch.Tensor) -> torch.Tensor:
    """GPT-2's tanh GELU; on CPU in fp32 as ``x * sigmoid(2z)``, the same function, since 0.5 (1 + tanh z) = sigmoid(2z).

    ATen's vectorized tanh is slow on AVX2: its GELU took 1.7 ms on a (464 x
    3,072) block where this takes 0.6 ms, within ~1e-7 of it, and it is no
    slower on one token's 3,072. Training, evaluation and generation all use it,
    so they agree to the bit. Elsewhere (bf16, GPUs) ATen's fused kernel is the
    faster one and rounds only once.
    """
    if not _sigmoid_form(h):
        return F.gelu(h, approximate="tanh")
    if torch.is_grad_enabled() and h.requires_grad:
        return GeluTanh.apply(h)
    z = h * h
    return z.mul_(GELU_A * GELU_K).add_(GELU_K).mul_(h).sigmoid_().mul_(h)


def gelu_tanh_and_backward(h: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(gelu(h), grad * gelu'(h))`` sharing one sigmoid: gelu' = s + h z' s (1 - s), s = sigmoid(z), z' = K (1 + 3 A h^2)."""
    if not _sigmoid_form(h):
        return F.gelu(h, approximate="tanh"), torch.ops.aten.gelu_backward(grad, h, approximate="tanh")
    s = h * h
    d = s.mul(3 * GELU_A * GELU_K).add_(GELU_K)  # z'
    s.mul_(GELU_A * GELU_K).add_(GELU_K).mul_(h).sigmoid_()
    d.mul_(h).mul_(s)
    d.addcmul_(d, s, value=-1).add_(s)  # h z' s (1 - s) + s
    d.mul_(grad)
    return s.mul_(h), d


def _sigmoid_form(h: torch.Tensor) -> bool:
    return h.dtype == torch.float32 and h.device.type == "cpu"


class GeluTanh(torch.autograd.Function):
    """``gelu_tanh`` for autograd (the MLP of a LoRA model), keeping only its input for backward."""

    @staticmethod
    def forward(ctx, h):
        ctx.save_for_backward(h)
        return gelu_tanh(h)

    @staticmethod
    def backward(ctx, grad):
        (h,) = ctx.saved_tensors
        return gelu_tanh_and_backward(h, grad)[1]


class GeluLinear(torch.autograd.Function):
    """``linear(gelu(h), weight, bias)`` that keeps ``h`` alone for backward and recomputes the GELU there.

    Left to autograd, both ``h`` (for GELU's backward) and ``gelu(h)`` (for the
    weight's gradient) stay alive until backward: two (tokens x 4 d) tensors a
    layer. Recomputing the GELU costs one elementwise pass and saves one of them.
    """

    @staticmethod
    def forward(ctx, h, weight, bias):
        ctx.save_for_backward(h, weight)
        return linear(gelu_tanh(h), weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        h, weight = ctx.saved_tensors
        grad_g = grad_out @ weight if ctx.needs_input_grad[0] else None
        if grad_g is not None:
            g, grad_h = gelu_tanh_and_backward(h, grad_g)
            del grad_g
        else:
            g, grad_h = gelu_tanh(h), None
        grad_2d = grad_out.reshape(-1, grad_out.shape[-1])
        grad_w = grad_2d.t() @ g.reshape(-1, g.shape[-1]) if ctx.needs_input_grad[1] else None
        del g
        grad_b = grad_2d.sum(0) if ctx.needs_input_grad[2] else None
        return grad_h, grad_w, grad_b


@dataclass
class Packing:
    """The positions of a (B, T) batch that can change the loss, packed into one (N, C) matrix.

    Attention is causal, so positions after a row's last target change nothing
    that is scored: padding at the end of a row only costs time. Training runs
    the per-token layers (LayerNorms, projections, MLPs: nearly all the FLOPs)
    on each row's prefix up to its last target, and goes back to (B, T) only
    around attention, where the dropped positions are zeros that no kept
    position can see.
    """

    index: torch.Tensor  # (N,) kept positions, flat in B * T
    B: int
    T: int

    @classmethod
    def of(cls, targets: torch.Tensor, ignore_index: int = -100) -> "Packing | None":
        """The packing for ``targets``, or None when every position counts."""
        B, T = targets.shape
        scored = targets != ignore_index
        lengths = torch.where(scored.any(1), T - scored.flip(1).int().argmax(1), 0)
        kept = torch.arange(T, device=targets.device) < lengths[:, None]
        if kept.all() or not kept.any():
            return None
        return cls(kept.flatten().nonzero().squeeze(1), B, T)

    @classmethod
    def tokens(cls, targets: torch.Tensor, ignore_index: int = -100) -> int:
        """How many positions of the batch the blocks run on."""
        packing = cls.of(targets, ignore_index)
        return targets.numel() if packing is None else len(packing.index)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, ...) -> (N, ...)"""
        return x.reshape(self.B * self.T, *x.shape[2:]).index_select(0, self.index)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C) -> (B, T, C), zeros at the dropped positions."""
        return x.new_zeros(self.B * self.T, x.shape[-1]).index_copy_(0, self.index, x).view(self.B, self.T, -1)


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x, cache=None, layer: int = 0, mask=None, packing=None):
        x = x + self.drop(self.attn(x, cache, layer, mask, packing, norm=self.ln_1))  # attn(ln_1(x))
        return x + self.drop(self.mlp(x, norm=self.ln_2))  # mlp(ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
                ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon),
            )
        )
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight
        self.tied_grad_buffer: TiedGradBuffer | None = None  # lent by the optimizer while the model trains
        if not any(p.is_meta for p in self.parameters()):
            self.apply(self._init_weights)
            for name, p in self.named_parameters():
                if name.endswith("c_proj.weight"):
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def hidden_states(self, idx, positions=None, cache=None, mask=None, tied_grad=None, packing=None):
        """Final-LayerNorm hidden states (B, T, C); the LM head is left to the caller.

        ``tied_grad``: the list through which ``loss`` hands the head's weight gradient to the embedding.
        With ``packing``, ``idx`` and ``positions`` are the packed (N,) tokens and the result is (N, C).
        """
        if positions is None:
            T = idx.shape[1]
            start = cache.length if cache is not None else 0
            if start + T > self.config.block_size:
                raise ValueError(f"sequence of {start + T} tokens exceeds the context window of {self.config.block_size}")
            positions = torch.arange(start, start + T, device=idx.device)
        wte = self.transformer.wte
        tok = TiedEmbedding.apply(idx, wte.weight, tied_grad) if tied_grad is not None else wte(idx)
        x = tok + self.transformer.wpe(positions)
        x = self.transformer.drop(x)
        for i, block in enumerate(self.transformer.h):
            x = block(x, cache, i, mask, packing)
        return self.transformer.ln_f(x)

    def forward(self, idx):
        """Logits (B, T, vocab) for every position."""
        return self.lm_head(self.hidden_states(idx))

    def loss(self, idx, targets, ignore_index: int = -100):
        """Mean cross-entropy over the targets that count.

        The same value as the book's ``cross_entropy(logits.flatten(0, 1), targets.flatten())``,
        with less work: the 50,257-wide LM head runs only where a target exists,
        not on padding or masked prompt tokens, and when training the head's
        gradients are made in the same pass (``TiedHeadCrossEntropy``). The
        blocks skip each row's end after its last target (``Packing``).
        """
        weight = self.lm_head.weight
        training = torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())
        tied_grad = [] if training and weight.requires_grad else None
        packing = Packing.of(targets, ignore_index)
        if packing is None:
            h = self.hidden_states(idx, tied_grad=tied_grad)
        else:
            idx, targets = packing.pack(idx), packing.pack(targets)
            h = self.hidden_states(idx, packing.index % packing.T, tied_grad=tied_grad, packing=packing)
        keep = targets != ignore_index
        h, targets = h[keep], targets[keep]
        if training:
            return TiedHeadCrossEntropy.apply(h, weight, targets, tied_grad, self.tied_grad_buffer)
        return TiedHeadCrossEntropy.run(h, weight, targets, False, False, self.tied_grad_buffer)[0]


class TiedHeadCrossEntropy(torch.autograd.Function):
    """Cross-entropy of ``h @ weight.T``, with both gradients computed in the forward pass.

    The loss is the graph's last node, so its gradient is known up to the
    incoming scalar. Making the gradients here skips what autograd would do
    around a (tokens x 50,257) logits tensor: an fp32 copy, its log-softmax, and
    their three backward buffers. Rows go through in blocks, softmax in place
    (fp32 inside), so the largest temporary stays ~50 MB in fp32 however long
    the batch.
    """

    BLOCK_ROWS = 256  # logits of a block: ~50 MB in fp32, ~25 MB in bf16; softmax overwrites them
    LOSS_ROWS = 128  # for a loss alone (evaluation, while training's memory is held): its fp32 log-softmax ~25 MB

    @staticmethod
    def run(h, weight, targets, want_grad_h: bool = True, want_grad_w: bool = True,
            grad_buffer: "TiedGradBuffer | None" = None):
        """(mean loss, gradient of h or None, gradient of weight or None)."""
        n = h.shape[0]
        grad_h = torch.empty_like(h) if want_grad_h else None
        grad_w = None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        block = TiedHeadCrossEntropy.BLOCK_ROWS if want_grad_h or want_grad_w else TiedHeadCrossEntropy.LOSS_ROWS
        for start in range(0, n, block):
            hb = h[start : start + block]
            cols = targets[start : start + len(hb)]
            if uses_onednn(hb, weight):
                logits = linear(hb, weight)
            else:
                logits = torch.mm(hb, weight.t(), out=grad_buffer.logits(len(hb)) if grad_buffer else None)
            if not (want_grad_h or want_grad_w):
                logp = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
                total -= logp[torch.arange(len(cols), device=h.device), cols].sum()
                continue
            # softmax - one_hot is the gradient of the summed loss. One softmax pass (fp32 inside), in place,
            # gives it and the loss; the loss's rounding to the logits' dtype is ~0.002 per token.
            rows = torch.arange(len(cols), device=h.device)
            probs = torch.ops.aten._softmax.out(logits, -1, False, out=logits)
            total -= probs[rows, cols].float().clamp_min(torch.finfo(torch.float32).tiny).log().sum()
            probs[rows, cols] -= 1
            if want_grad_h:
                torch.mm(probs, weight, out=grad_h[start : start + len(hb)])
            if want_grad_w and grad_w is None:
                grad_w = torch.mm(probs.t(), hb.div(n), out=grad_buffer.take() if grad_buffer else None)
            elif want_grad_w:
                grad_w.addmm_(probs.t(), hb.div(n))
            del logits, probs
        if grad_h is not None:
            grad_h.div_(n)
        return total / n, grad_h, grad_w

    @staticmethod
    def forward(ctx, h, weight, targets, tied_grad=None, grad_buffer=None):
        loss, grad_h, grad_w = TiedHeadCrossEntropy.run(h, weight, targets, h.requires_grad, weight.requires_grad, grad_buffer)
        if tied_grad is not None and grad_w is not None:
            tied_grad.append(grad_w)  # the embedding's backward adds its rows and returns the sum
            grad_w = None
        ctx.grads = (grad_h, grad_w)  # not save_for_backward: autograd may then take them over without a copy
        ctx.tied_grad = tied_grad
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.grads
        del ctx.grads
        if grad_loss.item() != 1.0:
            grad_h = None if grad_h is None else grad_h * grad_loss
            grad_w = None if grad_w is None else grad_w * grad_loss
            if ctx.tied_grad:
                ctx.tied_grad[0].mul_(grad_loss)
        return grad_h, grad_w, None, None, None


class TiedGradBuffer:
    """The tied weight's gradient buffer and the head's logits block, kept from one training step to the next.

    glibc takes a block this large (150 MB in fp32 for GPT-2, ~50 MB for 256
    rows of logits) straight from the OS and gives it back when it is freed, so
    a fresh one faults in every page again each step: the head's matmuls wrote
    into them at ~100-180 GFLOP/s instead of ~200, slower on some steps than
    others. The optimizer lends a model one of these while it steps inside
    backward, and hands the gradient back once it has been applied and nothing
    else holds it.
    """

    def __init__(self, weight: torch.Tensor):
        self.weight = weight
        self.grad = None
        self.lent = False
        self.block = None

    def take(self) -> torch.Tensor | None:
        """The last gradient, to overwrite, or None (the first step, or none came back)."""
        grad, self.grad = self.grad, None
        self.lent = True
        ok = grad is not None and grad.shape == self.weight.shape and grad.dtype == self.weight.dtype
        return grad if ok else None

    def give_back(self, param: torch.Tensor, grad: torch.Tensor) -> None:
        """Called by the optimizer once ``grad`` is applied; kept only when the head took the last one."""
        if param is self.weight and self.lent:
            self.grad, self.lent = grad, False

    def logits(self, rows: int) -> torch.Tensor:
        """A (rows x vocab) buffer for one block of the head's logits, in the weight's dtype, where ``torch.mm``
        makes them (bf16, GPUs); oneDNN's matmul (fp32 on the CPU) writes its own, at ~220 GFLOP/s all the same."""
        need = rows * self.weight.shape[0]
        if self.block is None or self.block.numel() < need or self.block.dtype != self.weight.dtype:
            self.block = None
            self.block = torch.empty(need, dtype=self.weight.dtype, device=self.weight.device)
        return self.block[:need].view(rows, -1)


class TiedEmbedding(torch.autograd.Function):
    """Token embedding lookup whose weight gradient joins the tied LM head's, in place.

    Left to autograd, the weight would get two gradients, the head's dense one
    and the lookup's, summed into a third vocab-sized buffer at the end of
    backward. Here the lookup adds its rows into the head's gradient and
    returns it as the one gradient of the shared weight.
    """

    @staticmethod
    def forward(ctx, idx, weight, tied_grad):
        ctx.save_for_backward(idx)
        ctx.tied_grad, ctx.shape = tied_grad, weight.shape
        return F.embedding(idx, weight)

    @staticmethod
    def backward(ctx, grad_out):
        (idx,) = ctx.saved_tensors
        if not ctx.needs_input_grad[1]:
            return None, None, None
        grad_w = ctx.tied_grad.pop() if ctx.tied_grad else grad_out.new_zeros(ctx.shape)
        grad_w.index_add_(0, idx.flatten(), grad_out.reshape(-1, ctx.shape[1]).to(grad_w.dtype))
        return None, grad_w, None
