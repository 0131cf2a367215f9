"""OOD score functions on hand-computable logits, dtype handling, and get_score."""

from __future__ import annotations

import math
import pickle

import pytest
import torch

from ash_lightning.scores.functional import energy, gen, max_logit, msp, neg_entropy
from ash_lightning.scores.specs import Score, get_score

# Row 0: uniform over 4 classes. Row 1: softmax = (0.1, 0.2, 0.3, 0.4).
LOGITS = torch.tensor([[0.0, 0.0, 0.0, 0.0], [math.log(1), math.log(2), math.log(3), math.log(4)]])
PROBS = torch.tensor([[0.25] * 4, [0.1, 0.2, 0.3, 0.4]], dtype=torch.float64)


def _gen_reference(probs: torch.Tensor, gamma: float, m: int) -> torch.Tensor:
    top = probs.sort(dim=1, descending=True).values[:, :m]
    return -(top**gamma * (1 - top) ** gamma).sum(dim=1)


def test_scores_by_hand() -> None:
    torch.testing.assert_close(energy(LOGITS), torch.tensor([math.log(4), math.log(10)]))
    torch.testing.assert_close(
        energy(LOGITS, temperature=2.0), torch.tensor([2 * math.log(4), 2 * math.log(1 + 2**0.5 + 3**0.5 + 2)])
    )
    torch.testing.assert_close(msp(LOGITS), torch.tensor([0.25, 0.4]))
    torch.testing.assert_close(max_logit(LOGITS), torch.tensor([0.0, math.log(4)]))
    want_entropy = (PROBS * PROBS.log()).sum(dim=1).float()
    torch.testing.assert_close(neg_entropy(LOGITS), want_entropy)
    torch.testing.assert_close(neg_entropy(LOGITS)[0], torch.tensor(-math.log(4)))
    torch.testing.assert_close(gen(LOGITS), _gen_reference(PROBS, 0.1, 100).float())
    torch.testing.assert_close(gen(LOGITS)[0], torch.tensor(-4 * (0.25 * 0.75) ** 0.1))
    # top-2 of (0.1, 0.2, 0.3, 0.4) are 0.4 and 0.3
    torch.testing.assert_close(gen(LOGITS, gamma=0.5, m=2)[1], torch.tensor(-((0.4 * 0.6) ** 0.5 + (0.3 * 0.7) ** 0.5)))


def test_higher_is_more_in_distribution() -> None:
    confident = torch.tensor([[10.0, 0.0, 0.0]])
    unsure = torch.tensor([[1.0, 0.9, 1.1]])
    for score in (energy, msp, max_logit, gen, neg_entropy):
        assert score(confident) > score(unsure), score.__name__


@pytest.mark.parametrize("score", [energy, msp, max_logit, gen, neg_entropy])
def test_half_input_upcast_without_overflow(score) -> None:
    logits = torch.tensor([[60000.0, 60000.0, -60000.0], [1.0, 2.0, 3.0]], dtype=torch.float16)
    out = score(logits)
    assert out.dtype == torch.float32 and out.shape == (2,)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, score(logits.float()))
    assert score(logits.double()).dtype == torch.float64
    assert score(logits.to(torch.bfloat16)).dtype == torch.float32


def test_energy_temperature_upcast() -> None:
    # 60000 / 0.5 overflows float16; the float32 result is 60000 + 0.5 * log 2.
    logits = torch.tensor([[60000.0, 60000.0]], dtype=torch.float16)
    torch.testing.assert_close(energy(logits, temperature=0.5), torch.tensor([60000.0 + 0.5 * math.log(2)]))
    # large T tends to the mean logit + T log K
    logits = torch.tensor([[1.0, 3.0]])
    torch.testing.assert_close(
        energy(logits, temperature=1000.0), torch.tensor([2.0 + 1000.0 * math.log(2)]), atol=1e-2, rtol=0
    )


def test_score_argument_errors() -> None:
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        energy(LOGITS, temperature=0.0)
    with pytest.raises(ValueError, match="gamma"):
        gen(LOGITS, gamma=-1.0)
    with pytest.raises(ValueError, match="m .* >= 1"):
        gen(LOGITS, m=0)
    with pytest.raises(ValueError, match=r"shape \(batch, classes\)"):
        msp(torch.zeros(4))


def test_get_score_forms() -> None:
    for name, fn in [
        ("energy", energy),
        ("msp", msp),
        ("max_logit", max_logit),
        ("gen", gen),
        ("neg_entropy", neg_entropy),
    ]:
        score = get_score(name)
        assert isinstance(score, Score) and score.name == name
        torch.testing.assert_close(score(LOGITS), fn(LOGITS))
    assert get_score("energy@2.0").name == "energy@2.0"
    assert get_score("energy@2").name == "energy@2.0"
    torch.testing.assert_close(get_score("energy@2.0")(LOGITS), energy(LOGITS, temperature=2.0))
    assert get_score("gen@0.1@100").name == "gen@0.1@100"
    assert get_score("gen@0.5").name == "gen@0.5"
    torch.testing.assert_close(get_score("gen@0.5@2")(LOGITS), gen(LOGITS, gamma=0.5, m=2))
    restored = pickle.loads(pickle.dumps(get_score("gen@0.5@2")))
    assert restored.name == "gen@0.5@2"
    torch.testing.assert_close(restored(LOGITS), gen(LOGITS, gamma=0.5, m=2))


def _mean_logit(logits: torch.Tensor) -> torch.Tensor:
    return logits.mean(dim=1)


def test_get_score_callables() -> None:
    wrapped = get_score(_mean_logit)
    assert wrapped.name == "_mean_logit"
    torch.testing.assert_close(wrapped(LOGITS), _mean_logit(LOGITS))
    assert pickle.loads(pickle.dumps(wrapped)).name == "_mean_logit"
    named = get_score("msp")
    assert get_score(named) is named


@pytest.mark.parametrize(
    "spec, match",
    [
        ("energi", "unknown score name 'energi'"),
        ("msp@2", "msp takes 0 parameter"),
        ("gen@0.1@100@3", r"gen takes 0 to 2 parameter\(s\), got 3"),
        ("energy@hot", "<temperature> must be a number, got 'hot'"),
        ("gen@0.1@1.5", "<m> must be an integer, got '1.5'"),
        ("energy@0", "temperature must be a finite number > 0"),
        ("energy@nan", "temperature must be a finite number > 0"),
        ("gen@0.1@0", "m .* >= 1"),
        (3, "a score spec must be a string, got int"),
    ],
)
def test_get_score_errors(spec, match: str) -> None:
    with pytest.raises(ValueError, match=match) as info:
        get_score(spec)
    assert "Valid forms: energy[@<temperature>=1], msp, max_logit, gen[@<gamma>=0.1][@<m>=100]" in str(info.value)
