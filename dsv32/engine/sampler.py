"""Turn a batch of next-token logits into tokens, one row per sequence, each with its own params.

Per row, in order:
  1. logits processors, 2. logit_bias, 3. min_tokens (eos / stop ids masked),
  4. penalties: repetition over prompt + output, frequency and presence over output (vLLM rules),
  5. logprobs: log_softmax of the logits *after* 1-4 and *before* temperature and truncation, so
     they describe the model as adjusted by the request (as vLLM reports them), not the truncated
     distribution actually sampled from,
  6. greedy rows (temperature 0): argmax, ties to the lowest token id,
  7. other rows: temperature, then top_k, top_p and min_p (each a per-row logit threshold), then
     inverse-CDF sampling with one uniform per row, drawn from the row's own generator when it has
     a seed: the same seed gives the same tokens whatever else is in the batch.

One uniform per row (instead of V exponentials for an exponential race, or torch.multinomial)
keeps the draw cheap on the CPU and lets the sequences' CPU generators drive any device. Batch
independence needs every reduction to give a row the same bits in any batch: the CPU kernels used
here are row-local; on a GPU the sampling math runs in fp64, where shape-dependent reduction order
no longer moves a cutoff or a draw (checked on an H100). Top-p looks at the
`top_p_candidates` best tokens first, widening (16x, then a full sort) only for rows whose
nucleus reaches past them. Everything but logits processors and the per-row draws is batched.

One row's failure is that row's alone: a logits processor that raises (processors run row by row),
or a row that makes the batched steps raise (the batch is then redone one row at a time, with the
uniforms already drawn), is reported in `SamplerOutput.failed` and the other rows are sampled.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .sequence import Failure, Sequence, TokenLogprob


@dataclass
class SamplerOutput:
    """Sampled token, optional logprobs and optional kept-token mask [V] for every row; the rows
    that failed (their token means nothing)."""

    token_ids: list[int]
    logprobs: list[TokenLogprob | None]
    kept: list[Tensor | None]
    failed: dict[int, Failure] = field(default_factory=dict)


def _padded(rows: list[list[int]], device) -> tuple[Tensor, Tensor]:
    """Non-empty ragged token lists as [len(rows), max_len] ids, each row padded with its own first
    token (so scattering a per-token value back is harmless), and the mask of real entries."""
    n = max(map(len, rows))
    ids = torch.tensor([r + r[:1] * (n - len(r)) for r in rows], dtype=torch.long)
    real = torch.arange(n)[None] < torch.tensor([len(r) for r in rows])[:, None]
    return ids.to(device), real.to(device)


def token_logprobs(logprobs: Tensor, token_ids: list[int], ks: list[int]) -> list[TokenLogprob]:
    """Rows of log-probabilities [N, V] -> each row's logprob of token_ids[i] and its ks[i] most
    likely alternatives."""
    chosen = logprobs.gather(1, torch.tensor(token_ids, device=logprobs.device)[:, None])[:, 0].tolist()
    k = max(ks)
    top_v, top_i = logprobs.topk(k, dim=-1) if k else (logprobs[:, :0], logprobs[:, :0].long())
    return [TokenLogprob(t, c, list(zip(i[:n], v[:n])))
            for t, c, i, v, n in zip(token_ids, chosen, top_i.tolist(), top_v.tolist(), ks)]


def _take(x: Tensor, rows: list[int]) -> Tensor:
    """Rows of x (x itself, not a copy, when that is all of them in order)."""
    if rows == list(range(x.shape[0])):
        return x
    return x[torch.tensor(rows, device=x.device)]


def first_argmax(x: Tensor) -> Tensor:
    """x [B, V] -> the index of each row's first maximum [B] (the lowest id on ties; a NaN counts as
    the maximum). On the CPU through numpy: torch's argmax reads a 129280-wide row in ~170 us on
    this host, numpy's in ~6 us (bench/README.md, "Decode step")."""
    if x.device.type == "cpu" and x.dtype == torch.float32:
        return torch.from_numpy(x.detach().numpy().argmax(-1))
    return x.argmax(-1)


def _adjusts(s: Sequence) -> bool:
    """Whether steps 2-4 change anything for this sequence now."""
    p = s.params
    return bool(p.logit_bias or s.num_output_tokens < p.min_tokens
                or p.repetition_penalty != 1.0
                or ((p.frequency_penalty or p.presence_penalty) and s.num_output_tokens))


def _plain_greedy(s: Sequence) -> bool:
    """Whether this row is greedy and nothing else applies: no processors, logprobs or steps 2-4."""
    return s.params.greedy and not s.logits_processors and s.params.logprobs is None and not _adjusts(s)


class Sampler:
    """Batched sampler implementing `SamplingParams` (see the module docstring for the order)."""

    top_p_candidates = 256

    def __init__(self, seed: int | None = None):
        self.generator = torch.Generator()       # for rows without a seed of their own
        if seed is not None:
            self.generator.manual_seed(seed)
        else:
            self.generator.seed()

    # ---- steps 1-4: the request's adjustments to the model's logits
    @staticmethod
    def process(logits: Tensor, seqs: list[Sequence]) -> dict[int, Failure]:
        """Step 1 in place, row by row: each sequence's logits processors. A row whose processor
        raises is zeroed and reported (row -> Failure); the other rows go on."""
        failed = {}
        for i, s in enumerate(seqs):
            if not s.logits_processors:
                continue
            out = s.output_token_ids
            try:
                for proc in s.logits_processors:
                    logits[i] = proc(out, logits[i])
            except Exception as e:
                failed[i] = Failure("logits processor", e)
                logits[i] = 0.0
        return failed

    def adjust(self, logits: Tensor, seqs: list[Sequence], eos_token_id: int | list[int]) -> Tensor:
        """Apply logits processors, logit_bias, min_tokens and penalties (in place; returns logits);
        a failing processor raises."""
        failed = self.process(logits, seqs)
        if failed:
            raise next(iter(failed.values())).exc
        return self._bias(logits, seqs, eos_token_id)

    def _bias(self, logits: Tensor, seqs: list[Sequence], eos_token_id: int | list[int]) -> Tensor:
        """Steps 2-4 in place: logit_bias, min_tokens, penalties; returns logits."""
        B, V = logits.shape
        dev = logits.device
        eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])

        r, c, v = [], [], []
        for i, s in enumerate(seqs):
            for tok, bias in (s.params.logit_bias or {}).items():
                if 0 <= int(tok) < V:   # out-of-vocabulary ids are skipped (validate them on add)
                    r.append(i), c.append(int(tok)), v.append(float(bias))
        if r:
            logits.index_put_((torch.tensor(r, device=dev), torch.tensor(c, device=dev)),
                              torch.tensor(v, dtype=logits.dtype, device=dev), accumulate=True)

        r, c = [], []
        for i, s in enumerate(seqs):
            if s.num_output_tokens < s.params.min_tokens:
                banned = set(s.params.stop_token_ids) | (set() if s.params.ignore_eos else set(eos))
                for tok in banned:
                    if 0 <= tok < V:
                        r.append(i), c.append(tok)
        if r:
            logits[torch.tensor(r, device=dev), torch.tensor(c, device=dev)] = float("-inf")

        self._penalize(logits, seqs)
        return logits

    @staticmethod
    def _penalize(logits: Tensor, seqs: list[Sequence]) -> None:
        """Penalties, touching only the logits of tokens that occurred (no full-vocabulary passes)."""
        V, dev, dt = logits.shape[1], logits.device, logits.dtype
        rows = [i for i, s in enumerate(seqs) if s.params.repetition_penalty != 1.0 and s.token_ids]
        if rows:
            ids, _ = _padded([seqs[i].token_ids for i in rows], dev)
            r = torch.tensor(rows, device=dev)[:, None].expand_as(ids)
            p = torch.tensor([seqs[i].params.repetition_penalty for i in rows], dtype=dt, device=dev)
            x = logits[r, ids]
            logits[r, ids] = torch.where(x > 0, x / p[:, None], x * p[:, None])

        rows = [i for i, s in enumerate(seqs)
                if (s.params.frequency_penalty or s.params.presence_penalty) and s.num_output_tokens]
        if rows:
            ids, real = _padded([seqs[i].output_token_ids for i in rows], dev)
            r = torch.tensor(rows, device=dev)[:, None].expand_as(ids)
            counts = torch.zeros(len(rows), V, dtype=dt, device=dev)
            counts.index_put_((torch.arange(len(rows), device=dev)[:, None].expand_as(ids), ids),
                              real.to(dt), accumulate=True)
            c = counts.gather(1, ids)
            freq = torch.tensor([seqs[i].params.frequency_penalty for i in rows], dtype=dt, device=dev)
            pres = torch.tensor([seqs[i].params.presence_penalty for i in rows], dtype=dt, device=dev)
            logits[r, ids] = logits[r, ids] - (freq[:, None] * c + pres[:, None] * (c > 0).to(dt))

    # ---- step 7: truncation and the draw
    def _cutoffs(self, x: Tensor, k: Tensor, p: Tensor, K: int) -> tuple[Tensor, Tensor]:
        """Top-k / top-p logit thresholds [b] from the K best entries of each row of `x`, and the
        rows whose top-p set might reach past those K (to redo with more)."""
        V = x.shape[1]
        vals, ids = x.sort(dim=-1, descending=True) if K == V else x.topk(K, dim=-1)
        within = k <= K
        kth = torch.where(within, vals.gather(1, (k.clamp(max=K) - 1)[:, None])[:, 0], float("-inf"))
        vals = vals.masked_fill(vals < kth[:, None], float("-inf"))
        # softmax, not logsumexp: its CPU kernel is row-local, so a row's result never depends on
        # the batch around it (a plain CPU sum of a single row is split across threads)
        probs = vals.softmax(-1)
        if not within.all():                                  # top-k leaves tokens outside the K
            probs = torch.where(within[:, None], probs, x.softmax(-1).gather(1, ids))
        before = torch.cat([torch.zeros_like(probs[:, :1]), probs.cumsum(-1)[:, :-1]], 1)
        n = (before < p[:, None]).sum(-1).clamp_min(1)        # smallest prefix with mass >= p
        thr = torch.maximum(kth, vals.gather(1, (n - 1)[:, None])[:, 0])
        return thr, (n == K) & (p < 1.0) & ~within & (K < V)

    def _keep_mask(self, x: Tensor, seqs: list[Sequence]) -> Tensor | None:
        """Bool [b, V] of the tokens of temperature-scaled `x` kept by top_k, top_p and min_p (None
        when no row truncates).

        Each filter is a logit threshold, so ties at a boundary are all kept: top_k keeps every token
        at least as likely as the k-th; top_p the most likely tokens down to the first one at which
        the mass (renormalised after top_k) reaches top_p; min_p those with p >= min_p * max p.
        Tokens at -inf are never kept.
        """
        b, V = x.shape
        dev = x.device
        if not any(0 < s.params.top_k < V or s.params.top_p < 1.0 or s.params.min_p > 0.0 for s in seqs):
            return None
        thr = torch.full((b,), torch.finfo(x.dtype).min, dtype=x.dtype, device=dev)
        rows = [i for i, s in enumerate(seqs) if 0 < s.params.top_k < V or s.params.top_p < 1.0]
        if rows:
            ps = [seqs[i].params for i in rows]
            k = torch.tensor([q.top_k if 0 < q.top_k < V else V for q in ps], device=dev)
            p = torch.tensor([q.top_p if q.top_p < 1.0 else 2.0 for q in ps], dtype=x.dtype, device=dev)
            K = min(V, max([self.top_p_candidates if q.top_p < 1.0 else 1 for q in ps]
                           + [q.top_k for q in ps if 0 < q.top_k < V]))
            xr = _take(x, rows)
            cut, redo = self._cutoffs(xr, k, p, K)
            while redo.any():                                 # widen: 16x the candidates, then all
                r, K = redo.nonzero()[:, 0], min(V, 16 * K)
                cut[r], redo[r] = self._cutoffs(xr[r], k[r], p[r], K)
            idx = torch.tensor(rows, device=dev)
            thr[idx] = torch.maximum(thr[idx], cut)
        rows = [i for i, s in enumerate(seqs) if s.params.min_p > 0.0]
        if rows:
            m = torch.tensor([math.log(seqs[i].params.min_p) for i in rows], dtype=x.dtype, device=dev)
            idx = torch.tensor(rows, device=dev)
            thr[idx] = torch.maximum(thr[idx], _take(x, rows).amax(-1) + m)
        return x >= thr[:, None]

    def _uniforms(self, seqs: list[Sequence]) -> Tensor:
        """One U[0, 1) per sampled (not greedy) row, 0 for greedy rows (CPU): from the row's own
        generator when seeded, else the sampler's."""
        u = torch.zeros(len(seqs))
        rest = [i for i, s in enumerate(seqs) if s.generator is None and not s.params.greedy]
        for i, s in enumerate(seqs):
            if s.generator is not None and not s.params.greedy:
                u[i] = torch.rand(1, generator=s.generator)[0]
        if rest:
            u[torch.tensor(rest)] = torch.rand(len(rest), generator=self.generator)
        return u

    @staticmethod
    def _inverse_cdf(probs: Tensor, u: Tensor) -> Tensor:
        """Token ids [b]: the first index whose cumulative probability exceeds u * total."""
        cdf = probs.cumsum(-1)
        total = cdf[:, -1:]
        # strictly below the total, so the search lands on a token with non-zero probability
        u = u.to(cdf.device, cdf.dtype)[:, None]
        v = torch.minimum(u * total, total.nextafter(torch.zeros_like(total)))
        # (a row with no finite logit at all has a NaN cdf: it still gets an id inside the vocabulary)
        return torch.searchsorted(cdf, v, right=True)[:, 0].clamp_(0, probs.shape[1] - 1)

    # ---- the whole step
    @torch.no_grad()
    def __call__(self, logits: Tensor, seqs: list[Sequence], eos_token_id: int | list[int],
                 return_kept: bool | list[bool] = False) -> SamplerOutput:
        """Sample one token per row of `logits` [B, V] (not modified); `return_kept` (for all rows
        or per row) asks for the bool mask [V] of tokens the row could have been sampled from.
        Rows that failed are in `failed` (see the module docstring); the others are sampled."""
        B = logits.shape[0]
        assert B == len(seqs), (B, len(seqs))
        want_kept = [return_kept] * B if isinstance(return_kept, bool) else list(return_kept)
        if not any(want_kept) and all(_plain_greedy(s) for s in seqs):
            # steps 1-5 and 7 have nothing to do and no uniform is drawn: step 6 alone, without the
            # general path's bookkeeping (0-3% of the bench model's 1K decode step, bench/README.md)
            return SamplerOutput(first_argmax(logits.float()).tolist(), [None] * B, [None] * B)
        u = self._uniforms(seqs)                 # [B], drawn once whatever fails below
        logits, failed = logits.float(), {}
        if any(s.logits_processors for s in seqs):
            logits = logits.clone()
            failed = self.process(logits, seqs)
        try:
            out = self._sample(logits, seqs, eos_token_id, want_kept, u)
        except Exception:
            out = self._alone(logits, seqs, eos_token_id, want_kept, u)
        out.failed.update(failed)
        return out

    def _alone(self, logits: Tensor, seqs: list[Sequence], eos_token_id, want_kept: list[bool],
               u: Tensor) -> SamplerOutput:
        """The batch again one row at a time (after it raised): only rows that fail alone are lost."""
        out = SamplerOutput([], [], [])
        for i in range(len(seqs)):
            try:
                one = self._sample(logits[i:i + 1], seqs[i:i + 1], eos_token_id, want_kept[i:i + 1], u[i:i + 1])
            except Exception as e:
                one = SamplerOutput([0], [None], [None])
                out.failed[i] = Failure("sampling", e)
            out.token_ids += one.token_ids
            out.logprobs += one.logprobs
            out.kept += one.kept
        return out

    def _sample(self, logits: Tensor, seqs: list[Sequence], eos_token_id, want_kept: list[bool],
                u: Tensor) -> SamplerOutput:
        """Steps 2-7 for fp32 `logits` [B, V] (not modified) with the rows' uniforms `u` [B]."""
        B, V = logits.shape
        dev = logits.device
        if any(_adjusts(s) for s in seqs):
            logits = self._bias(logits.clone(), seqs, eos_token_id)

        lp_rows = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        logprobs = _take(logits, lp_rows).log_softmax(-1) if lp_rows else None

        kept = torch.zeros(B, V, dtype=torch.bool, device=dev) if any(want_kept) else None
        greedy = [i for i, s in enumerate(seqs) if s.params.greedy]
        rand = [i for i, s in enumerate(seqs) if not s.params.greedy]
        tokens = torch.empty(B, dtype=torch.long, device=dev) if rand else None
        if greedy:
            idx = torch.tensor(greedy, device=dev)
            g = first_argmax(_take(logits, greedy))
            tokens = g if tokens is None else tokens.index_put_((idx,), g)    # all greedy: no scatter
            if kept is not None:
                kept[idx, g] = True
        if rand:
            idx = torch.tensor(rand, device=dev)
            rs = [seqs[i] for i in rand]
            x = _take(logits, rand)
            if any(s.params.temperature != 1.0 for s in rs):
                x = x / torch.tensor([s.params.temperature for s in rs], device=dev)[:, None]
            if dev.type != "cpu":   # GPU reductions vary with the batch shape: in fp64 the
                x = x.double()      # differences are far too small to move a cutoff or a draw
            keep = self._keep_mask(x, rs)                    # None: nothing truncated
            if keep is not None:
                x = x.masked_fill(~keep, float("-inf"))
            tokens[idx] = self._inverse_cdf(x.softmax(-1), u[rand])
            if kept is not None:
                kept[idx] = keep if keep is not None else x > float("-inf")

        token_ids = tokens.tolist()
        out_lp: list[TokenLogprob | None] = [None] * B
        if lp_rows:
            rows = token_logprobs(logprobs, [token_ids[i] for i in lp_rows], [seqs[i].params.logprobs for i in lp_rows])
            for i, row in zip(lp_rows, rows):
                out_lp[i] = row
        return SamplerOutput(token_ids, out_lp, [kept[i] if want_kept[i] else None for i in range(B)])
