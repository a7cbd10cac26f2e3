"""BiT-HyperRule numbers against REFERENCE.md section 4 and the authors' get_lr, for both variants."""

import pytest

from bigtransfer import hyperrule
from bigtransfer.hyperrule import Schedule, learning_rate, mixup_alpha, resolution, schedule

RELEASE = {  # N -> the authors' boundaries (warmup, decays..., end)
    1_000: (100, 200, 300, 400, 500),
    19_999: (100, 200, 300, 400, 500),
    20_000: (500, 3000, 6000, 9000, 10_000),
    499_999: (500, 3000, 6000, 9000, 10_000),
    500_000: (500, 6000, 12_000, 18_000, 20_000),
    1_000_000: (500, 6000, 12_000, 18_000, 20_000),
}
PAPER = {1_000: 500, 19_999: 500, 20_000: 10_000, 499_999: 10_000, 500_000: 20_000, 1_000_000: 20_000}


@pytest.mark.parametrize("n", RELEASE)
def test_schedules(n):
    warmup, *decays, end = RELEASE[n]
    assert schedule(n) == Schedule(warmup, tuple(decays), end)
    total = PAPER[n]
    assert schedule(n, "paper") == Schedule(0, (int(0.3 * total), int(0.6 * total), int(0.9 * total)), total)


@pytest.mark.parametrize("size,release,paper", [
    ((32, 32), (160, 128), (160, 128)),
    ((95, 95), (160, 128), (160, 128)),
    ((96, 96), (512, 480), (448, 384)),
    ((224, 224), (512, 480), (448, 384)),
    ((48, 200), (512, 480), (448, 384)),  # by area: 9,600 >= 96*96
])
def test_resolutions(size, release, paper):
    assert resolution(size) == release
    assert resolution(size, "paper") == paper


def reference_get_lr(step, supports, base_lr=0.003):
    """The authors' released rule, transcribed from REFERENCE.md (linear warmup, /10 per passed boundary)."""
    if step < supports[0]:
        return base_lr * step / supports[0]
    for s in supports[1:]:
        if s < step:
            base_lr /= 10
    return base_lr


def test_learning_rate_matches_the_authors_rule_at_every_step():
    for n, supports in ((1_000, RELEASE[1_000]), (100_000, RELEASE[499_999])):
        sched = schedule(n)
        for step in range(sched.total_steps):
            assert learning_rate(step, sched) == pytest.approx(reference_get_lr(step, supports), rel=1e-12), step
    sched = schedule(1_000)
    assert learning_rate(0, sched) == 0.0 and learning_rate(50, sched) == pytest.approx(0.0015)
    assert learning_rate(200, sched) == pytest.approx(0.003) and learning_rate(201, sched) == pytest.approx(3e-4)
    assert learning_rate(499, sched) == pytest.approx(3e-6)
    for step in (500, -1):
        with pytest.raises(ValueError, match=f"step {step} is outside the schedule's steps 0..499"):
            learning_rate(step, sched)
    with pytest.raises(ValueError, match="a training set of 0 examples has no schedule"):
        schedule(0)
    paper = schedule(1_000, "paper")
    lrs = [learning_rate(s, paper, 0.01) for s in (0, 150, 151, 301, 451)]
    assert lrs == pytest.approx([0.01, 0.01, 1e-3, 1e-4, 1e-5])


def test_mixup_and_constants():
    assert mixup_alpha(19_999) == 0.0 and mixup_alpha(20_000) == 0.1 and mixup_alpha(10**6) == 0.1
    assert (hyperrule.BASE_LR, hyperrule.BATCH_SIZE, hyperrule.MOMENTUM) == (0.003, 512, 0.9)


def test_scaled_schedule_keeps_its_shape():
    assert schedule(1_000).scaled(100) == Schedule(20, (40, 60, 80), 100)
    assert schedule(1_000, "paper").scaled(1000) == Schedule(0, (300, 600, 900), 1000)


def test_unknown_variant():
    with pytest.raises(ValueError, match="release, paper"):
        schedule(10, "fast")
