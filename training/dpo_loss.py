"""The DPO loss and the log-probabilities it compares, as the book's chapter 7 bonus notebook computes them.

``sequence_logprobs`` gives each answer's log-probability under a model from
one forward pass over a preference batch; ``dpo_loss`` is the book's
``compute_dpo_loss``; ``reference_logprobs`` fills the frozen reference's
values once, before training, and ``evaluate_dpo`` scores a set of pairs
against them. ``training.dpo`` runs these in its loop.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from data.preference import PreferenceDataset, collate_preferences
from model import GPT
from model.device import release_free_memory
from model.fused import linear, right_operand


class TokenLogProbs(torch.autograd.Function):
    """log p(target) of each hidden state under the LM head, the vocabulary-wide work done a block of rows at a time.

    Nothing vocabulary-sized outlives a block: backward multiplies the block's
    logits again (one extra matmul over the answers' tokens only) rather than
    keeping every softmax from the forward pass, which at the longest batch
    would be ~100 MB. It scales ``one_hot - softmax`` by each token's incoming
    gradient and makes the head's weight gradient; with ``tied_grad`` it hands
    that gradient to the tied token embedding (``model.loss.TiedEmbedding``),
    as fine-tuning's head does.
    """

    BLOCK_ROWS = 32  # a block's bf16 logits and their fp32 copies: ~16 MB

    @staticmethod
    def run(h, weight, targets):
        out = []
        for hb, tb in zip(h.split(TokenLogProbs.BLOCK_ROWS), targets.split(TokenLogProbs.BLOCK_ROWS)):
            logp = torch.log_softmax(linear(hb, weight), dim=-1, dtype=torch.float32)
            out.append(logp.gather(1, tb[:, None]).squeeze(1))
        return torch.cat(out) if out else h.new_zeros(0, dtype=torch.float32)

    @staticmethod
    def forward(ctx, h, weight, targets, tied_grad=None):
        ctx.save_for_backward(h, weight, targets)
        ctx.tied_grad = tied_grad
        return TokenLogProbs.run(h, weight, targets)

    @staticmethod
    def backward(ctx, grad_logp):
        h, weight, targets = ctx.saved_tensors
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if want_h else None
        grad_w = torch.zeros_like(weight) if want_w else None
        weight_right = right_operand(weight) if want_h else weight
        for start in range(0, len(h), TokenLogProbs.BLOCK_ROWS):
            hb = h[start:start + TokenLogProbs.BLOCK_ROWS]
            n = len(hb)
            g = grad_logp[start:start + n]
            p = torch.softmax(linear(hb, weight), dim=-1, dtype=torch.float32).mul_(-g[:, None]).to(h.dtype)
            p[torch.arange(n, device=p.device), targets[start:start + n]] += g.to(p.dtype)  # one_hot - softmax, scaled
            if want_h:
                torch.mm(p, weight_right, out=grad_h[start:start + n])
            if want_w:
                grad_w.addmm_(p.t(), hb)
        if ctx.tied_grad is not None and grad_w is not None:
            ctx.tied_grad.append(grad_w)
            grad_w = None
        return grad_h, grad_w, None, None


def sequence_logprobs(model: GPT, batch, average: bool = True) -> torch.Tensor:
    """Log-probability of each answer given its prompt, (2 * pairs,): chosen at even, rejected at odd indices.

    Only the answer's tokens and its end token count; ``average`` divides by their number.
    """
    weight = model.lm_head.weight
    training = torch.is_grad_enabled() and any(p.requires_grad for p in model.parameters())
    tied_grad = [] if training and weight.requires_grad else None
    h = model.hidden_states(batch.inputs, batch.positions, mask=batch.mask, tied_grad=tied_grad)
    keep = batch.targets != -100
    h, targets, sequence = h[keep], batch.targets[keep], batch.sequence[keep]
    if training:
        logp = TokenLogProbs.apply(h, weight, targets, tied_grad)
    else:
        logp = TokenLogProbs.run(h, weight, targets)
    n = 2 * batch.pairs
    sums = torch.zeros(n, dtype=torch.float32, device=h.device).index_add(0, sequence, logp)
    if not average:
        return sums
    return sums / torch.bincount(sequence, minlength=n).to(sums.dtype)


def dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta: float = 0.1):
    """(mean loss, per-pair chosen rewards, per-pair rejected rewards), as the book's ``compute_dpo_loss``."""
    logits = (policy_chosen - policy_rejected) - (reference_chosen - reference_rejected)
    loss = -F.logsigmoid(beta * logits).mean()
    chosen_rewards = beta * (policy_chosen - reference_chosen).detach()
    rejected_rewards = beta * (policy_rejected - reference_rejected).detach()
    return loss, chosen_rewards, rejected_rewards


@torch.no_grad()
def reference_logprobs(model: GPT, dataset: PreferenceDataset, batches: list[list[int]], device, packed: bool = True,
                       average: bool = True, on_batch=lambda n: None) -> torch.Tensor:
    """(len(dataset), 2) log-probabilities of each pair's chosen and rejected answer, filled batch by batch.

    Run the model in the mode training runs it in (dropout aside, the same kernels),
    so that a pair seen in the same batch gets exactly the policy's step-0 value.
    """
    reference = torch.full((len(dataset), 2), float("nan"))
    for positions in batches:
        batch = collate_preferences([dataset[i] for i in positions], packed=packed).to(device)
        reference[positions] = sequence_logprobs(model, batch, average).view(-1, 2).cpu()
        if batch.inputs.device.type == "cpu":
            release_free_memory()
        on_batch(len(positions))
    return reference


def figures(loss: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor) -> dict:
    """The logged numbers of one batch or evaluation."""
    return {"loss": float(loss), "chosen_reward": float(chosen.mean()), "rejected_reward": float(rejected.mean()),
            "reward_margin": float((chosen - rejected).mean()), "reward_accuracy": float((chosen > rejected).float().mean())}


@torch.no_grad()
def evaluate_dpo(model: GPT, dataset: PreferenceDataset, batches: list[list[int]], reference: torch.Tensor, device,
                 beta: float = 0.1, packed: bool = True, average: bool = True) -> dict:
    """Loss, rewards, margin and accuracy over the pairs of ``batches`` (each pair weighs the same)."""
    losses, chosen, rejected = [], [], []
    for positions in batches:
        batch = collate_preferences([dataset[i] for i in positions], packed=packed).to(device)
        logp = sequence_logprobs(model, batch, average).view(-1, 2)
        ref = reference[positions].to(device)
        c, r = logp[:, 0], logp[:, 1]
        losses.append(-F.logsigmoid(beta * ((c - r) - (ref[:, 0] - ref[:, 1]))))
        chosen.append(beta * (c - ref[:, 0]))
        rejected.append(beta * (r - ref[:, 1]))
    if not losses:
        return {k: float("nan") for k in ("loss", "chosen_reward", "rejected_reward", "reward_margin", "reward_accuracy")}
    return figures(torch.cat(losses).mean(), torch.cat(chosen), torch.cat(rejected))
