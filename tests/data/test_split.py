from ray_ft.data.split import seeded_sample, split_by_group
from ray_ft.data.readers import read_qa_source
from tests.conftest import CMRC


def test_split_is_disjoint_by_group_and_seeded():
    items = [(f"g{i % 10}", i) for i in range(100)]
    kept, out = split_by_group(items, lambda x: x[0], 0.2, seed=7)
    assert {g for g, _ in kept}.isdisjoint({g for g, _ in out})
    assert len({g for g, _ in out}) == 2 and len(kept) + len(out) == 100
    again = split_by_group(list(reversed(items)), lambda x: x[0], 0.2, seed=7)
    assert {g for g, _ in again[1]} == {g for g, _ in out}  # input order does not matter
    other = split_by_group(items, lambda x: x[0], 0.2, seed=8)
    assert {g for g, _ in other[1]} != {g for g, _ in out}  # the seed matters
    # A large share of few groups still keeps one group on each side.
    kept, out = split_by_group([("a", 0), ("b", 1)], lambda x: x[0], 0.8, seed=7)
    assert len(kept) == len(out) == 1


def test_real_cmrc_split_has_no_shared_passage():
    recs = read_qa_source(str(CMRC))
    train, held = split_by_group(recs, lambda r: r.passage_id, 0.2, seed=42)
    assert {r.passage_id for r in train}.isdisjoint({r.passage_id for r in held})
    assert len({r.passage_id for r in held}) == round(848 * 0.2)
    assert len(train) + len(held) == 3219


def test_seeded_sample_is_order_independent():
    xs = [str(i) for i in range(50)]
    a = seeded_sample(xs, lambda x: x, 10, seed=1)
    assert a == seeded_sample(list(reversed(xs)), lambda x: x, 10, seed=1)
    assert len(set(a)) == 10 and a != xs[:10]
