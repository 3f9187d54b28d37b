"""Bytes one rank sends per micro-batch for the sequence split (launcher.ulysses_degree × ring_degree = N),
from the forwards of each phase (helios_train/planning/activation_memory.py) — what the planner reports next to memory.

Per block and pass over a sequence of S tokens (S_n of them noisy), hidden size D, per rank
(helios_train/model/sequence_parallel.py):
  Ulysses      4 all-to-alls of the local S/N × D in self-attention (q, k, v before, the output after), each
               keeping 1/N at home: 4 · S·D · (N − 1) / N²   (both plans; cross-attention reads the whole
               text on every rank: no traffic)
  per_branch   + the attn1 and FFN outputs (S) and the cross-attention's (S_n) all-gathered, each rank
               sending its S/N slice to the N − 1 others: (N − 1) / N · (2·S + S_n) · D per block
  split_once   + one gather of the last block's output per pass: (N − 1) / N · S · D
The backward sends the same again (the adjoint all-to-alls and reduce-scatters); gradient checkpointing
runs each forward once more. So a forward with grad is 3 passes (2 without checkpointing), a forward
without grad 1. Not counted: ring attention's K/V rotation (instead of the all-to-alls) and the GAN taps'
gathers of a few blocks' noisy features.
"""
from __future__ import annotations


def pass_elements(tokens: int, noisy: int, hidden: int, degree: int, layers: int, plan: str = "split_once") -> float:
    """Elements one rank sends in one pass of the whole transformer."""
    n = degree
    per_block = 4 * tokens * hidden * (n - 1) / n**2
    if plan == "per_branch":
        return layers * (per_block + (n - 1) / n * (2 * tokens + noisy) * hidden)
    return layers * per_block + (n - 1) / n * tokens * hidden


def step_bytes(phases: dict, history_tokens: int, model, degree: int, checkpointing: bool,
               act_bytes: int = 2, plan: str = "split_once") -> dict[str, float]:
    """{phase: bytes one rank sends for the split per micro-batch}; 0 at degree 1. A forward's noisy tokens are its
    tokens minus the history (the planner's forwards are history + noisy at every level; for the GAN's crop, whose
    history is smaller, this undercounts its cross-attention gather)."""
    c = model.config
    hidden, layers = c.num_attention_heads * c.attention_head_dim, c.num_layers
    grad_passes = 3 if checkpointing else 2
    out = {}
    for name, phase in phases.items():
        total = 0.0
        for forwards, passes in ((phase.grad, grad_passes), (phase.input_only, grad_passes), (phase.no_grad, 1)):
            for tokens, batch in forwards:
                noisy = max(tokens - history_tokens, 0)
                total += passes * batch * pass_elements(tokens, noisy, hidden, degree, layers, plan) * act_bytes
        out[name] = total if degree > 1 else 0.0
    return out
