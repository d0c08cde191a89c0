"""Sampler: every SamplingParams knob on a small vocabulary, against hand-computed expectations."""
import math

import pytest
import torch

from dsv32.engine.sampler import Sampler, first_argmax
from dsv32.engine.sequence import SamplingParams, Sequence

EOS = 9
NEG = float("-inf")


def seq(prompt=(0,), out=(), **params) -> Sequence:
    s = Sequence("r", list(prompt), SamplingParams(**params))
    s.token_ids += list(out)
    return s


def logits_of(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def log_probs(p, V=10) -> list[float]:
    """Logits whose softmax is `p` followed by zeros (padded to V with -inf)."""
    return [math.log(x) for x in p] + [NEG] * (V - len(p))


P4 = [0.4, 0.3, 0.2, 0.1]


def kept_ids(sampler, row, s, **kw) -> set[int]:
    out = sampler(logits_of(row), [s], EOS, return_kept=True, **kw)
    assert out.kept[0][out.token_ids[0]]
    return set(out.kept[0].nonzero()[:, 0].tolist())


# ---- greedy, bias, min_tokens, processors
def test_greedy_argmax_and_ties_to_lowest_id():
    s = Sampler(seed=0)
    out = s(logits_of([1, 3, 0, 3, 2], [5, 5, 5, 5, 5], [0, 0, 0, 0, 1]),
            [seq(temperature=0) for _ in range(3)], EOS)
    assert out.token_ids == [1, 0, 4]
    assert out.logprobs == [None] * 3 and out.kept == [None] * 3


def test_plain_greedy_rows_take_the_argmax_alone_with_the_same_tokens_and_draws():
    """A batch of greedy rows with nothing else to apply skips the general path's bookkeeping: the
    same tokens as that path (asked for the kept masks, which forces it), ties and NaN included,
    and no uniform drawn (a later sampled row draws what a fresh sampler would)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 3, (6, 50), generator=g).float()
    x[2, 7] = float("nan")
    rows = [seq(temperature=0) for _ in range(6)]
    fast, general = Sampler(seed=3), Sampler(seed=3)
    out = fast(x, rows, EOS)
    assert out.token_ids == general(x, rows, EOS, return_kept=True).token_ids == [first_max(r) for r in x.tolist()]
    assert out.logprobs == [None] * 6 and out.kept == [None] * 6 and not out.failed
    fresh = Sampler(seed=3)
    hot = logits_of(log_probs(P4))
    assert fast(hot, [seq(temperature=1.0)], EOS).token_ids == fresh(hot, [seq(temperature=1.0)], EOS).token_ids
    # a greedy row that asks for logprobs (or has a bias) takes the general path and gets them
    mixed = general(x[:2], [seq(temperature=0), seq(temperature=0, logprobs=2)], EOS)
    assert mixed.token_ids == out.token_ids[:2] and mixed.logprobs[0] is None and mixed.logprobs[1] is not None
    biased = general(x[:1], [seq(temperature=0, logit_bias={5: 100.0})], EOS)
    assert biased.token_ids == [5]


def test_first_argmax_matches_torch_with_ties_and_nan():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 4, (64, 1000), generator=g).float()        # many tied maxima per row
    x[3, 17] = float("nan")
    x[5, [2, 900]] = float("nan")
    for rows in (x, x[::2], x[:, :500], x.t().contiguous().t()):   # strided views too
        assert torch.equal(first_argmax(rows), rows.argmax(-1))
        assert first_argmax(rows).tolist() == [first_max(r) for r in rows.tolist()]


def first_max(row: list[float]) -> int:
    """The slow obvious answer: the first NaN if any, else the first maximum."""
    nans = [j for j, v in enumerate(row) if v != v]
    return nans[0] if nans else row.index(max(row))


def test_input_logits_not_modified():
    x = logits_of([1.0, 2.0, 3.0, 0.5])
    before = x.clone()
    Sampler(seed=0)(x, [seq(out=[2, 2], temperature=0, logit_bias={0: 5.0}, repetition_penalty=2.0,
                            frequency_penalty=1.0, logprobs=2)], EOS)
    assert torch.equal(x, before)
    Sampler(seed=0)(x, [seq(temperature=0.7, top_p=0.5, min_p=0.1, logprobs=1)], EOS, return_kept=True)
    assert torch.equal(x, before)


def test_logit_bias_forces_and_bans():
    s = Sampler(seed=0)
    row = [5.0, 1.0, 0.0, 0.0]
    assert s(logits_of(row), [seq(temperature=0, logit_bias={3: 100.0})], EOS).token_ids == [3]
    seqs = [seq(temperature=1.0, logit_bias={2: 100.0}) for _ in range(32)]
    assert s(logits_of(*[row] * 32), seqs, EOS).token_ids == [2] * 32
    seqs = [seq(temperature=1.0, logit_bias={0: -100.0, 1: -100.0}) for _ in range(32)]
    assert set(s(logits_of(*[row] * 32), seqs, EOS).token_ids) <= {2, 3}


def test_min_tokens_masks_eos_and_stop_ids():
    row = [0.0] * 10
    row[EOS], row[7], row[3] = 10.0, 9.0, 8.0
    s = Sampler(seed=0)
    params = dict(temperature=0, min_tokens=2, stop_token_ids=[7])
    out = s(logits_of(row, row, row), [seq(out=[], **params), seq(out=[1], **params),
                                       seq(out=[1, 1], **params)], EOS)
    assert out.token_ids == [3, 3, EOS]
    # several eos ids; with ignore_eos the eos token is an ordinary token and is not masked
    row2 = list(row)
    row2[5] = 9.5
    out = s(logits_of(row2, row2), [seq(temperature=0, min_tokens=1),
                                    seq(temperature=0, min_tokens=1, ignore_eos=True)], [EOS, 5])
    assert out.token_ids == [7, EOS]


def test_logits_processors_in_order_see_output_ids():
    calls = []

    def first(ids, x):
        calls.append(("first", list(ids), x.shape))
        x = x.clone()
        x[2] = 50.0
        return x

    def second(ids, x):
        calls.append(("second", list(ids), float(x[2])))
        x[1] = 60.0
        return x

    out = Sampler(seed=0)(logits_of([0.0] * 5, [0.0] * 5),
                          [seq(prompt=[4, 4], out=[3], temperature=0, logits_processors=[first, second]),
                           seq(temperature=0)], EOS)
    assert out.token_ids == [1, 0]
    assert calls == [("first", [3], (5,)), ("second", [3], 50.0)]


# ---- penalties (exact values through adjust())
def test_repetition_penalty_prompt_and_output():
    x = logits_of([2.0, -2.0, 2.0, -2.0, 1.0])
    s = seq(prompt=[0, 1], out=[1, 2], repetition_penalty=2.0)
    got = Sampler().adjust(x, [s], EOS)
    assert got.tolist() == [[1.0, -4.0, 1.0, -2.0, 1.0]]


def test_frequency_and_presence_penalties_output_only():
    x = logits_of([1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0])
    a = seq(prompt=[3, 3, 3], out=[0, 0, 1], frequency_penalty=0.5, presence_penalty=0.25)
    b = seq(prompt=[3], out=[0, 2], frequency_penalty=-1.0)
    got = Sampler().adjust(x, [a, b], EOS)
    assert got.tolist() == [[1 - 2 * 0.5 - 0.25, 1 - 0.5 - 0.25, 1.0, 1.0],
                            [2.0, 1.0, 2.0, 1.0]]


def test_all_adjustments_compose_in_order():
    # bias first (token 0: 1 -> 3), then repetition (3 / 2), then frequency (-1 per output use)
    x = logits_of([1.0, -1.0, 0.5, 0.0])
    s = seq(prompt=[1], out=[0], logit_bias={0: 2.0}, repetition_penalty=2.0, frequency_penalty=1.0)
    assert Sampler().adjust(x, [s], EOS).tolist() == [[0.5, -2.0, 0.5, 0.0]]


# ---- logprobs
def test_logprobs_are_log_softmax_before_temperature_with_sorted_top():
    row = [0.3, 2.0, -1.0, 1.5, 0.0, 2.5]
    ref = torch.tensor(row).log_softmax(-1)
    seqs = [seq(temperature=0, logprobs=3), seq(temperature=0.5, logprobs=0),
            seq(temperature=0), seq(temperature=2.0, top_k=2, logprobs=5, seed=1)]
    out = Sampler(seed=0)(logits_of(*[row] * 4), seqs, EOS)
    g = out.logprobs[0]
    assert g.token_id == 5 and g.logprob == pytest.approx(ref[5].item())
    assert [t for t, _ in g.top] == [5, 1, 3]
    assert [v for _, v in g.top] == pytest.approx(ref[[5, 1, 3]].tolist())
    assert out.logprobs[1].top == [] and out.logprobs[1].logprob == pytest.approx(
        ref[out.token_ids[1]].item())
    assert out.logprobs[2] is None
    lp = out.logprobs[3]
    assert lp.token_id == out.token_ids[3] in (5, 1)
    assert lp.logprob == pytest.approx(ref[lp.token_id].item())
    assert [t for t, _ in lp.top] == [5, 1, 3, 0, 4]
    vals = [v for _, v in lp.top]
    assert vals == sorted(vals, reverse=True)


def test_logprobs_reflect_penalties_and_bias():
    row = [1.0, 1.0, 1.0, 1.0]
    s = seq(out=[0], temperature=0, logprobs=4, presence_penalty=1.0, logit_bias={3: 1.0})
    out = Sampler(seed=0)(logits_of(row), [s], EOS)
    ref = torch.tensor([0.0, 1.0, 1.0, 2.0]).log_softmax(-1)
    assert out.token_ids == [3]
    assert dict(out.logprobs[0].top) == pytest.approx(dict(enumerate(ref.tolist())))


# ---- truncation: kept sets
@pytest.mark.parametrize("params, expected", [
    (dict(), {0, 1, 2, 3}),                                 # nothing truncated; -inf never kept
    (dict(top_k=2), {0, 1}),
    (dict(top_k=1), {0}),
    (dict(top_k=50), {0, 1, 2, 3}),
    (dict(top_p=0.69), {0, 1}),                             # 0.4 + 0.3 >= 0.69
    (dict(top_p=0.71), {0, 1, 2}),
    (dict(top_p=0.35), {0}),                                # always at least the best token
    (dict(top_p=0.95), {0, 1, 2, 3}),
    (dict(min_p=0.5), {0, 1, 2}),                           # p >= 0.2
    (dict(min_p=0.6), {0, 1}),                              # p >= 0.24
    (dict(top_k=3, min_p=0.6), {0, 1}),
    (dict(top_k=3, top_p=0.95), {0, 1, 2}),
    (dict(temperature=0.5, top_p=0.8), {0, 1}),             # p^2 / 0.3 = .533, .3, .133, .033
    (dict(temperature=0.5, top_p=0.9), {0, 1, 2}),
    (dict(temperature=0.5, min_p=0.24), {0, 1, 2}),         # (.2/.4)^2 = .25 survives, .0625 not
    (dict(temperature=2.0, min_p=0.6), {0, 1, 2}),          # sqrt(.2/.4) = .707 >= .6
    (dict(temperature=0), {0}),                             # greedy: only the argmax
])
def test_kept_sets(params, expected):
    assert kept_ids(Sampler(seed=0), log_probs(P4), seq(**params)) == expected


def test_ties_at_a_boundary_are_all_kept_and_kept_is_per_row():
    row = [1.0, 2.0, 2.0, 2.0, 0.0]
    out = Sampler(seed=0)(logits_of(row, row, row, row), [seq(top_k=2), seq(top_k=2), seq(),
                                                          seq(top_p=0.5)], EOS,
                          return_kept=[True, False, True, True])
    assert out.kept[0].tolist() == [False, True, True, True, False]
    assert out.kept[1] is None
    assert out.kept[2].all()
    assert out.kept[3].tolist() == [False, True, True, True, False]


def reference_keep(x: torch.Tensor, top_k: int, top_p: float, min_p: float) -> set[int]:
    """Straightforward per-row top_k -> top_p -> min_p on scaled logits [V] (no ties in x)."""
    order = sorted(range(len(x)), key=lambda i: -x[i].item())
    kept = order[:top_k] if top_k > 0 else order
    p = x[kept].softmax(-1).tolist()
    mass, n = 0.0, 0
    while n < len(kept) and mass < top_p:
        mass, n = mass + p[n], n + 1
    kept, p = kept[:n], p[:n]
    return {t for t, q in zip(kept, p) if q >= min_p * p[0]}


@pytest.mark.parametrize("candidates", [3, 256])
def test_kept_sets_match_reference_on_random_rows(candidates):
    g = torch.Generator().manual_seed(1)
    sampler = Sampler(seed=0)
    sampler.top_p_candidates = candidates      # 3: most nuclei reach past the candidates (full sort)
    cases = [(0, 0.9, 0.0), (5, 1.0, 0.0), (40, 0.8, 0.0), (0, 0.5, 0.05), (7, 0.95, 0.2),
             (0, 1.0, 0.3), (2, 0.3, 0.0), (0, 0.999, 0.0)]
    x = torch.randn(len(cases), 60, generator=g) * 2
    seqs = [seq(temperature=0.8, top_k=k, top_p=p, min_p=m) for k, p, m in cases]
    out = sampler(x, seqs, EOS, return_kept=True)
    for row, (k, p, m), kept in zip(x, cases, out.kept):
        assert set(kept.nonzero()[:, 0].tolist()) == reference_keep(row / 0.8, k, p, m), (k, p, m)


def test_kept_mask_excludes_masked_tokens():
    ban = lambda ids, x: x.index_fill(0, torch.tensor([1]), NEG)
    s = seq(out=[], min_tokens=1, logits_processors=[ban])
    row = [0.0] * 10
    assert kept_ids(Sampler(seed=0), row, s) == set(range(10)) - {1, EOS}


def test_samples_stay_inside_kept_set():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 200, generator=g) * 3
    seqs = [seq(temperature=0.7, top_k=20, top_p=0.8, min_p=0.05) for _ in range(64)]
    out = Sampler(seed=0)(x, seqs, EOS, return_kept=True)
    for t, k in zip(out.token_ids, out.kept):
        assert k[t] and 1 <= k.sum() <= 20


# ---- randomness
def _run(sampler, rows, steps=8):
    """Sample `steps` tokens for each sequence of `rows` (a list of Sequences) on fixed logits."""
    g = torch.Generator().manual_seed(123)
    x = torch.randn(steps, 1, 500, generator=g)
    toks = [[] for _ in rows]
    for t in range(steps):
        out = sampler(x[t].expand(len(rows), -1), rows, EOS)
        for j, (r, tok) in enumerate(zip(rows, out.token_ids)):
            toks[j].append(tok)
            r.token_ids.append(tok)
    return toks


def test_seed_reproducible_and_independent_of_batch():
    mk = lambda seed, **kw: seq(temperature=1.0, seed=seed, **kw)
    alone = _run(Sampler(seed=0), [mk(7)])[0]
    again = _run(Sampler(seed=99), [mk(7)])[0]
    crowded = _run(Sampler(seed=5), [mk(None), mk(3, top_p=0.5), mk(7), seq(temperature=0)])[2]
    assert alone == again == crowded
    other = _run(Sampler(seed=0), [mk(8)])[0]
    assert other != alone


def test_seed_independent_of_batch_at_full_vocab():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 1, 129280, generator=g) * 2
    kinds = [dict(), dict(min_p=0.02), dict(top_k=500, top_p=0.9)]

    def run(batch):
        rows = [seq(seed=sd, **kw) for sd, kw in batch]
        s = Sampler(seed=0)
        return [s(x[t].expand(len(rows), -1), rows, EOS).token_ids for t in range(len(x))]

    alone = [[r[0] for r in run([(20 + j, kw)])] for j, kw in enumerate(kinds)]
    crowd = run([(None, {})] + [(20 + j, kw) for j, kw in enumerate(kinds)] + [(None, dict(top_k=3))] * 5)
    assert [[r[1 + j] for r in crowd] for j in range(len(kinds))] == alone


def test_sequence_index_offsets_seed():
    a = _run(Sampler(), [Sequence("r", [0], SamplingParams(seed=4), index=i) for i in range(2)])
    b = _run(Sampler(), [Sequence("r", [0], SamplingParams(seed=5), index=0)])
    assert a[1] == b[0] != a[0]


def test_unseeded_rows_follow_sampler_seed():
    mk = lambda: [seq(temperature=1.0) for _ in range(3)]
    assert _run(Sampler(seed=1), mk()) == _run(Sampler(seed=1), mk())
    assert _run(Sampler(seed=1), mk()) != _run(Sampler(seed=2), mk())


def _chi2(counts: torch.Tensor, p: torch.Tensor) -> float:
    n = counts.sum()
    exp = n * p
    return float(((counts - exp) ** 2 / exp).sum())


@pytest.mark.parametrize("params, expected", [
    (dict(temperature=1.0), [0.5, 0.25, 0.15, 0.1]),
    # T = 2: p ~ sqrt(.5, .25, .15, .1) = (.7071, .5, .3873, .3162) / 1.9106 = (.370, .262, .203, .166);
    # top_p .7 keeps three (.834), renormalised over their sum 1.5944
    (dict(temperature=2.0, top_p=0.7), [0.44349, 0.31360, 0.24291, 0.0]),
    (dict(temperature=0.5, top_k=2), [0.8, 0.2, 0.0, 0.0]),  # .25 / (.25 + .0625)
    (dict(min_p=0.25), [5 / 9, 2.5 / 9, 1.5 / 9, 0.0]),      # p >= .125, renormalised over .9
])
def test_sampling_distribution(params, expected):
    p = torch.tensor([0.5, 0.25, 0.15, 0.1])
    expected = torch.tensor(expected)
    B, steps = 640, 15
    sampler = Sampler(seed=0)
    x = p.log().expand(B, -1)
    counts = torch.zeros(4)
    seqs = [seq(**params) for _ in range(B)]
    for _ in range(steps):
        toks = torch.tensor(sampler(x, seqs, EOS).token_ids)
        counts += torch.bincount(toks, minlength=4).float()
    assert counts[expected == 0].sum() == 0
    nz = expected > 0
    # 99.9% quantile of chi-square with (#categories - 1) <= 3 degrees of freedom is 16.27
    assert _chi2(counts[nz], expected[nz]) < 16.27, (counts / counts.sum(), expected)
