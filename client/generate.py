"""Sampling and the generation loop: the prompt as one batch, then one token per forward pass."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from client.errors import UserError


def sample(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """logits [V] -> a token id. temperature 0 is greedy; else softmax(logits / T) restricted to
    the smallest set of most likely tokens whose probability reaches top_p."""
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        keep = np.searchsorted(np.cumsum(p[order]), top_p) + 1
        order = order[:keep]
        return int(order[rng.choice(len(order), p=p[order] / p[order].sum())])
    return int(rng.choice(len(p), p=p))


@dataclass
class Result:
    prompt_ids: list[int]
    new_ids: list[int] = field(default_factory=list)
    prompt_seconds: float = 0.0
    gen_seconds: float = 0.0     # the forward passes after the prompt's
    gen_passes: int = 0

    @property
    def prompt_tok_s(self) -> float:
        return len(self.prompt_ids) / self.prompt_seconds if self.prompt_seconds else 0.0

    @property
    def gen_tok_s(self) -> float:
        return self.gen_passes / self.gen_seconds if self.gen_seconds else 0.0


def generate(model, prompt_ids: list[int], n: int, temperature=0.0, top_p=1.0, seed=None,
             on_token=None) -> Result:
    """Generate up to n tokens after prompt_ids (stopping at EOS or the context end);
    on_token(id) is called as each arrives."""
    if n < 1:
        raise UserError(f"-n {n}: the number of tokens to generate must be at least 1")
    if not prompt_ids:
        raise UserError("the prompt is empty and the model adds no BOS; give a prompt")
    if len(prompt_ids) >= model.ctx:
        raise UserError(f"the prompt is {len(prompt_ids)} tokens; the context is {model.ctx}: "
                        "shorten the prompt")
    rng = np.random.default_rng(seed)
    res = Result(list(prompt_ids))
    t0 = time.perf_counter()
    logits = model.forward(prompt_ids, 0)[-1]
    res.prompt_seconds = time.perf_counter() - t0
    pos = len(prompt_ids)
    t0 = time.perf_counter()
    while True:
        tok = sample(logits, temperature, top_p, rng)
        if tok in model.cfg.eos_ids:
            break
        res.new_ids.append(tok)
        if on_token:
            on_token(tok)
        if len(res.new_ids) >= n or pos >= model.ctx:
            break
        logits = model.forward([tok], pos)[-1]
        res.gen_passes += 1
        pos += 1
    res.gen_seconds = time.perf_counter() - t0
    return res


def perplexity(model, ids: list[int]) -> tuple[float, int]:
    """exp(mean -log p(ids[i] | ids[:i])) over i >= 1, in one pass of at most the context."""
    ids = ids[: model.ctx]
    if len(ids) < 2:
        raise UserError("the text has no tokens to score")
    logits = model.forward(ids, 0, all_logits=True).astype(np.float64)     # [T, V]
    z = logits[:-1] - logits[:-1].max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    nll = -logp[np.arange(len(ids) - 1), ids[1:]]
    return float(np.exp(nll.mean())), len(ids) - 1
