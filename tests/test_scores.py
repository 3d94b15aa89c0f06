"""What a validation score can tell apart: standard errors, packed per-image correctness, McNemar's exact test, and
the promotion's choice among candidates within noise of each other."""
import math

import numpy as np
import optuna
import pytest

from mnist_optuna.promotion import WITHIN_NOISE_RULE, choose_within_noise
from mnist_optuna.scores import compare, mcnemar, pack_correct, standard_error, unpack_correct


def test_mcnemar_counts_the_images_each_alone_gets_right_and_gives_the_exact_two_sided_p_value():
    a = [1, 1, 1, 1, 1, 1, 0, 0, 1, 0, 1]
    b = [1, 0, 0, 0, 0, 0, 1, 0, 1, 0, 1]
    only_a, only_b, p_value = mcnemar(a, b)
    assert (only_a, only_b) == (5, 1)
    # by hand: 6 discordant images, split 5/1; P(X <= 1) for X ~ Binomial(6, 1/2) is (1 + 6) / 64, doubled
    assert p_value == pytest.approx(14 / 64)
    assert mcnemar(b, a) == (1, 5, pytest.approx(14 / 64))
    # 10 against 0: 2 / 1024; never disagreeing: 1
    assert mcnemar([1] * 10 + [0] * 5, [0] * 10 + [0] * 5)[2] == pytest.approx(2 / 1024)
    assert mcnemar(a, a) == (0, 0, 1.0)
    with pytest.raises(ValueError):
        mcnemar(a, b[:-1])


def test_the_standard_error_of_an_accuracy_is_binomial():
    assert standard_error(0.99, 10_000) == pytest.approx(math.sqrt(0.99 * 0.01 / 10_000))
    assert 0.00099 < standard_error(0.99, 10_000) < 0.001  # about 0.1 point near 99 % on 10,000 images


def test_correctness_packs_to_a_bit_an_image_and_back():
    rng = np.random.default_rng(0)
    correct = rng.random(10_003) < 0.99
    packed = pack_correct(correct)
    assert len(packed) <= 4 * math.ceil(math.ceil(10_003 / 8) / 3)  # base64 of 1,251 bytes
    assert np.array_equal(unpack_correct(packed, 10_003), correct)
    other = correct.copy()
    other[:40] = ~other[:40]
    comparison = compare(packed, pack_correct(other), 10_003)
    assert comparison["only_best"] + comparison["only_other"] == 40


def row(number, accuracy, mmac, correct):
    trial = optuna.trial.create_trial(value=accuracy, user_attrs={"mmac": mmac, "study": "s"})
    trial.number = number
    return {"trial": trial, "promoted_val": accuracy, "mmac": mmac, "images": len(correct),
            "correct": pack_correct(np.asarray(correct, dtype=bool)), "search_rank": number + 1}


def test_a_promotion_within_noise_chooses_the_cheapest_network_and_says_so():
    base = np.ones(1000, dtype=bool)
    base[:20] = False
    close = base.copy()
    close[18:22] = ~close[18:22]   # 2 images better, 2 worse: the same accuracy, far within noise
    close[30] = False              # one image behind the most accurate
    far = base.copy()
    far[100:160] = False           # 60 images behind: beyond noise
    rows = [row(0, base.mean(), 30.0, base), row(1, close.mean(), 12.0, close), row(2, far.mean(), 5.0, far)]
    chosen, rule, comparisons = choose_within_noise(rows)
    # not the most accurate (a one-image difference), nor the cheapest of all (beyond noise): the cheaper of the tie
    assert chosen[0]["trial"].number == 1 and rule.startswith(WITHIN_NOISE_RULE)
    assert [r["trial"].number for r in chosen] == [1, 0, 2]
    assert [c["beyond_noise"] for c in comparisons] == [False, True]
    assert comparisons[1]["only_best"] == 60 and comparisons[1]["p_value"] < 1e-6

    # the most accurate beyond noise of every other: it stays first, and the rule says why
    chosen, rule, _ = choose_within_noise([rows[0], rows[2]])
    assert chosen[0]["trial"].number == 0 and "better beyond noise than every other" in rule

    # scores kept from before per-image records: the most accurate, and the rule says it could not test
    old = dict(rows[1], correct=None)
    chosen, rule, _ = choose_within_noise([rows[0], old])
    assert chosen[0]["trial"].number == 0 and "no per-image record" in rule
