"""Next-token choice for a batch of requests, vectorised over the batch.

A request's random draws come from its own generator, seeded per request, so its samples do not
depend on what else is in the batch."""
import torch

from splitfuse.kernels.ops import argmax_rows
from splitfuse.protocol import Output
from splitfuse.worker.request import Request


class Sampler:
    def __init__(self, eos_token_ids: list[int]):
        self.eos_token_ids = eos_token_ids

    def __call__(self, logits: torch.Tensor, requests: list[Request], generators: list[torch.Generator | None],
                 constrained: list[int] = (), forbidden: torch.Tensor | None = None) -> list[Output]:
        """Each request's Output of this step, with its token (and log-probabilities when it asked); the
        engine adds how it ends. logits: fp32 [len(requests), vocab]; generators[i] is None for a greedy
        request, else on logits.device. Everything built here lives on logits.device too. Rows `constrained`
        follow a grammar: forbidden[j] (bool [vocab]) holds the tokens row constrained[j] may not take."""
        if constrained or any(_adjusts(r) for r in requests):
            logits = logits.clone()  # written below; the caller's stay as they are (a copy costs 13 ms at 256 rows)
        self._apply_penalties(logits, requests)
        self._apply_logit_bias(logits, requests)
        self._block_early_stop(logits, requests, set(constrained))
        if constrained:  # last: whatever else was added, the grammar has the final word
            forbidden = forbidden.to(logits.device)
            for j, i in enumerate(constrained):
                logits[i].masked_fill_(forbidden[j], float("-inf"))
        chosen = argmax_rows(logits)
        sampled = [i for i, g in enumerate(generators) if g is not None]
        if sampled:
            chosen[sampled] = self._sample(logits[sampled], [requests[i] for i in sampled],
                                           [generators[i] for i in sampled])
        outputs = [Output(r.request_id, [token]) for r, token in zip(requests, chosen.tolist())]
        _fill_logprobs(outputs, logits, chosen, requests)
        return outputs

    def _apply_penalties(self, logits: torch.Tensor, requests: list[Request]) -> None:
        rows = [i for i, r in enumerate(requests) if _penalized(r.params)]
        for i in rows:  # only requests that ask pay for this
            p, r = requests[i].params, requests[i]
            if p.repetition_penalty != 1.0:
                seen = torch.tensor(sorted(set(r.token_ids)), dtype=torch.long, device=logits.device)
                vals = logits[i, seen]
                logits[i, seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
            if p.presence_penalty or p.frequency_penalty:
                generated = torch.tensor(r.token_ids[r.prompt_len:], dtype=torch.long, device=logits.device)
                counts = torch.zeros_like(logits[i]).index_add_(0, generated, torch.ones_like(generated, dtype=logits.dtype))
                logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()

    @staticmethod
    def _apply_logit_bias(logits: torch.Tensor, requests: list[Request]) -> None:
        for i, r in enumerate(requests):
            if bias := r.params.logit_bias:
                ids = torch.tensor(list(bias), dtype=torch.long, device=logits.device)
                logits[i, ids] += torch.tensor(list(bias.values()), dtype=logits.dtype, device=logits.device)

    def _block_early_stop(self, logits: torch.Tensor, requests: list[Request], constrained: set[int]) -> None:
        """Before min_new_tokens, EOS and stop tokens cannot be chosen (but where a grammar ends the text)."""
        for i, r in enumerate(requests):
            if r.num_generated < r.params.min_new_tokens and i not in constrained:
                stops = r.params.stop_token_ids + ([] if r.params.ignore_eos else self.eos_token_ids)
                logits[i, stops] = float("-inf")

    def _sample(self, logits: torch.Tensor, requests: list[Request], generators: list[torch.Generator]) -> torch.Tensor:
        temps = _column([r.params.temperature for r in requests], logits)
        probs = torch.softmax(logits / temps, dim=-1)
        if any(r.params.top_k or r.params.top_p < 1 or r.params.min_p for r in requests):
            probs = _filter(probs, requests)
        # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p; E comes from each request's generator.
        noise = torch.stack([torch.empty(probs.shape[1], device=probs.device).exponential_(generator=g)
                             for g in generators])
        return argmax_rows(probs / noise)


def _penalized(p) -> bool:
    return bool(p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty)


def _adjusts(request: Request) -> bool:
    """Whether the request's logits are changed before the choice: penalties, biases, or stops blocked."""
    p = request.params
    return _penalized(p) or bool(p.logit_bias) or request.num_generated < p.min_new_tokens


def _column(values: list, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device).unsqueeze(1)


def _filter(probs: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    """top-k, top-p and min-p, each a no-op for requests that leave it off."""
    vocab = probs.shape[1]
    top_k = _column([min(r.params.top_k or vocab, vocab) for r in requests], probs)
    top_p = _column([r.params.top_p for r in requests], probs)
    min_p = _column([r.params.min_p for r in requests], probs)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    rank = torch.arange(vocab, device=probs.device).unsqueeze(0)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    keep = (rank < top_k) & (mass_before < top_p) & (sorted_probs >= min_p * sorted_probs[:, :1])
    keep[:, 0] = True  # the most likely token always survives
    kept = torch.zeros_like(probs).scatter_(1, order, sorted_probs * keep)
    return kept / kept.sum(dim=-1, keepdim=True)


def _fill_logprobs(outputs: list[Output], logits: torch.Tensor, chosen: torch.Tensor, requests: list[Request]) -> None:
    """Log-probabilities under the model's distribution (after penalties, before temperature), for the
    requests that asked."""
    wanted = [r.params.logprobs for r in requests]
    if all(w is None for w in wanted):
        return
    chosen_lp, tops = token_logprobs(logits, chosen, max(w or 0 for w in wanted))
    for out, w, lp, top in zip(outputs, wanted, chosen_lp, tops):
        if w is not None:
            out.logprobs, out.top_logprobs = [lp], [dict(list(top.items())[:w])]


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top: int) -> tuple[list[float], list[dict[int, float]]]:
    """Per row of fp32 logits: the log-probability of tokens[row], and the `top` most likely tokens' (most first)."""
    logprobs = torch.log_softmax(logits, dim=-1)
    chosen = logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1).tolist()
    if not top:
        return chosen, [{} for _ in chosen]
    values, ids = logprobs.topk(top, dim=-1)
    return chosen, [dict(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
