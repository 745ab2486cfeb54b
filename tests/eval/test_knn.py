"""kNN against sklearn NearestNeighbors and hand-computed GenRep scores (DN, MemMixup)."""

import numpy as np
import pytest
import torch
from sklearn.neighbors import NearestNeighbors

from retain_asd.eval.knn import (
    MemoryBank,
    bank_distance,
    domain_normalise,
    knn_distance,
    memmixup,
    score_clips,
)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    bank = rng.normal(size=(300, 384)) * 2 + 1
    queries = rng.normal(size=(57, 384)) * 2 + 1
    return queries, bank


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("k", [1, 3])
def test_equals_sklearn(data, metric, k):
    queries, bank = data
    nn = NearestNeighbors(n_neighbors=k, algorithm="brute", metric=metric).fit(bank)
    want_d, want_i = nn.kneighbors(queries)
    got_d, got_i = knn_distance(queries, bank, k=k, metric=metric, chunk_size=16)
    assert got_d.dtype == torch.float64 and got_d.shape == (57, k)
    np.testing.assert_array_equal(got_i.numpy(), want_i)
    np.testing.assert_allclose(got_d.numpy(), want_d, rtol=1e-10, atol=1e-12)


def test_float32_candidates_still_match_sklearn(data):
    queries, bank = data
    want_d, want_i = NearestNeighbors(n_neighbors=3, algorithm="brute").fit(bank).kneighbors(queries)
    got_d, got_i = knn_distance(torch.as_tensor(queries), torch.as_tensor(bank), k=3, dtype=torch.float32)
    np.testing.assert_array_equal(got_i.numpy(), want_i)
    np.testing.assert_allclose(got_d.numpy(), want_d, rtol=1e-10)


def _sklearn(queries, bank, k, metric="euclidean"):
    return NearestNeighbors(n_neighbors=k, algorithm="brute", metric=metric).fit(bank).kneighbors(queries)


def _assert_same_neighbours(got, want, queries, bank, metric="euclidean"):
    """Distances to 1e-6 and the same ids, except inside a group of equal distances: there sklearn's
    order is its (unstable) sort's, and ours is the lower index first."""
    (got_d, got_i), (want_d, want_i) = (np.asarray(x) for x in got), want
    np.testing.assert_allclose(got_d, want_d, rtol=1e-6, atol=1e-12)
    for q, pos in zip(*np.nonzero(got_i != want_i)):
        if metric == "euclidean":
            row = np.linalg.norm(bank - queries[q], axis=1)  # (M,)
        else:
            row = 1 - bank @ queries[q] / np.linalg.norm(bank, axis=1) / np.linalg.norm(queries[q])
        tied = np.isclose(row, row[want_i[q, pos]], rtol=0, atol=1e-12)
        assert tied[got_i[q, pos]] and tied.sum() > 1, f"query {q}, neighbour {pos}: not a tie"
    assert np.all(np.diff(got_i, axis=1)[np.diff(got_d, axis=1) == 0] > 0)  # ties: lower index first
    return int((got_i != want_i).sum())


@pytest.mark.parametrize("input_dtype", [np.float64, np.float32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_ties_and_duplicates_match_sklearn(dtype, metric, input_dtype):
    # Small integer coordinates: many distances are exactly tied; duplicated rows (a shuffled copy of
    # some) and queries that are bank rows (distance 0).
    rng = np.random.default_rng(7)
    base = rng.integers(-2, 3, size=(40, 6)).astype(np.float64)
    base[np.abs(base).sum(1) == 0, 0] = 1  # no zero vector (cosine)
    bank = np.concatenate([base, base[rng.permutation(40)[:25]]])  # 65 rows, 25 exact duplicates
    queries = np.concatenate([rng.integers(-2, 3, size=(30, 6)).astype(np.float64) + 0.5, base[:10]])
    bank, queries = bank.astype(input_dtype), queries.astype(input_dtype)  # exact in float32 too
    swapped = 0
    for k in (1, 4, 9):
        got = knn_distance(queries, bank, k=k, metric=metric, dtype=dtype, chunk_size=7)
        # Reference: sklearn on the same values in float64 (its float32 cosine is computed in float32).
        want = _sklearn(queries.astype(np.float64), bank.astype(np.float64), k, metric)
        swapped += _assert_same_neighbours(got, want, queries, bank, metric)
    assert swapped > 0  # the data does hold ties that sklearn orders differently


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_genrep_sized_random_data_matches_sklearn(dtype):
    rng = np.random.default_rng(11)
    bank, queries = rng.normal(size=(500, 1536)), rng.normal(size=(60, 1536))
    bank[250:260] = bank[:10]  # duplicates
    got = knn_distance(queries, bank, k=5, dtype=dtype)
    _assert_same_neighbours(got, _sklearn(queries, bank, 5), queries, bank)


def test_float32_search_exact_far_from_the_origin_and_on_float32_input():
    # Embeddings with a large common offset (like pooled transformer outputs) and close neighbours:
    # float32 alone would confuse them; the bound keeps every possible neighbour for the float64 pass.
    rng = np.random.default_rng(4)
    bank = (50 + rng.normal(size=(400, 256)) * 0.01).astype(np.float32)
    queries = (50 + rng.normal(size=(30, 256)) * 0.01).astype(np.float32)
    want_d, want_i = _sklearn(queries, bank, 3)  # sklearn computes in float64 on float32 input
    got_d, got_i = knn_distance(queries, bank, k=3, dtype=torch.float32)
    np.testing.assert_array_equal(got_i.numpy(), want_i)
    np.testing.assert_allclose(got_d.numpy(), want_d, rtol=1e-6)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_float32_embeddings_with_offset_duplicates_and_parallel_chunks_match_sklearn(metric):
    # float32 in, as the embedder produces: no cast of the bank on the CPU; a common offset (centred in
    # float32), duplicated references, queries that are references, and many chunks run in parallel.
    rng = np.random.default_rng(12)
    bank = (3 + rng.normal(size=(300, 768))).astype(np.float32)
    bank[150:170] = bank[:20]
    queries = np.concatenate([(3 + rng.normal(size=(41, 768))).astype(np.float32), bank[5:25]])
    queries64, bank64 = queries.astype(np.float64), bank.astype(np.float64)  # the same values
    want_d, want_i = _sklearn(queries64, bank64, 4, metric)  # sklearn's float32 cosine is float32-rounded
    if metric == "euclidean":  # sklearn's ||q||^2 + ||b||^2 - 2 q.b gives ~7e-6 for a query that is a reference
        want_d = np.linalg.norm(queries64[:, None, :] - bank64[want_i], axis=2)  # exact, at sklearn's ids
    want = want_d, want_i
    for chunk_size in (7, 1000):
        got = knn_distance(queries, bank, k=4, metric=metric, chunk_size=chunk_size)
        assert got[0].dtype == torch.float64 and got[1].dtype == torch.int64 and got[1].shape == (61, 4)
        _assert_same_neighbours(got, want, queries64, bank64, metric)
    if metric == "euclidean":  # sklearn upcasts float32 chunks to float64 here: same answer on float32 input
        _assert_same_neighbours(got, (want_d, _sklearn(queries, bank, 4)[1]), queries64, bank64)
    exact64 = knn_distance(queries64, bank64, k=4, metric=metric, dtype=torch.float64)
    assert torch.equal(got[1], exact64[1]) and torch.equal(got[0], exact64[0])  # same float64 re-measure


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_torch_path_used_on_cuda_matches_sklearn_on_cpu_tensors(metric):
    # The CUDA path is the torch one; run it on CPU tensors here, on ties, duplicates and an offset.
    from retain_asd.eval.knn import _knn_torch

    rng = np.random.default_rng(8)
    base = rng.integers(-2, 3, size=(40, 6)).astype(np.float64)
    base[np.abs(base).sum(1) == 0, 0] = 1
    bank = np.concatenate([base, base[rng.permutation(40)[:25]]]) + 20  # offset: centred
    queries = np.concatenate([rng.integers(-2, 3, size=(30, 6)) + 20.5, bank[:10]])
    for dtype in (torch.float32, torch.float64):
        for k in (1, 4):
            got = _knn_torch(torch.as_tensor(queries), torch.as_tensor(bank), k, metric, 7, dtype)
            _assert_same_neighbours(got, _sklearn(queries, bank, k, metric), queries, bank, metric)
            numpy_path = knn_distance(queries, bank, k=k, metric=metric, dtype=dtype)
            assert torch.equal(got[1], numpy_path[1])
            torch.testing.assert_close(got[0], numpy_path[0], rtol=1e-12, atol=1e-12)


def test_single_query_and_blas_threads_restored():
    from threadpoolctl import threadpool_info

    before = [lib["num_threads"] for lib in threadpool_info()]
    rng = np.random.default_rng(2)
    bank = rng.normal(size=(50, 16)).astype(np.float32)
    d, i = knn_distance(bank[3:4] + 1e-3, bank, k=2)
    want_d, want_i = _sklearn(bank[3:4] + 1e-3, bank, 2)
    np.testing.assert_array_equal(i.numpy(), want_i)
    np.testing.assert_allclose(d.numpy(), want_d, rtol=1e-6)
    assert [lib["num_threads"] for lib in threadpool_info()] == before


def test_matmul_precision_setting_is_restored():
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        knn_distance(np.eye(3), np.eye(3))
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(saved)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_run_on_the_gpu_and_match_the_cpu(data):
    queries, bank = data
    want_d, want_i = knn_distance(queries, bank, k=3)
    got_d, got_i = knn_distance(torch.as_tensor(queries).cuda(), torch.as_tensor(bank).cuda(), k=3)
    assert got_d.is_cuda and got_i.is_cuda
    assert torch.equal(got_i.cpu(), want_i)
    torch.testing.assert_close(got_d.cpu(), want_d, rtol=1e-10, atol=0)


def test_chunking_does_not_change_results(data):
    queries, bank = data
    a = knn_distance(queries, bank, k=2, chunk_size=5)
    b = knn_distance(queries, bank, k=2, chunk_size=1000)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_distances_exact_where_the_dot_product_formula_cancels():
    # Points far from the origin, close to each other: ||q||^2 + ||b||^2 - 2 q.b loses ~8 digits.
    rng = np.random.default_rng(3)
    bank = 1e4 + rng.normal(size=(50, 64)) * 1e-3
    queries = 1e4 + rng.normal(size=(10, 64)) * 1e-3
    exact = np.linalg.norm(queries[:, None, :] - bank[None, :, :], axis=2)  # (10, 50) direct differences
    got_d, got_i = knn_distance(queries, bank, k=1)
    np.testing.assert_array_equal(got_i[:, 0].numpy(), exact.argmin(1))
    np.testing.assert_allclose(got_d[:, 0].numpy(), exact.min(1), rtol=1e-9)


def test_cosine_zero_vector_is_at_distance_one_like_sklearn():
    bank = np.array([[1.0, 0.0], [0.0, 2.0]])
    d, _ = knn_distance(np.zeros((1, 2)), bank, metric="cosine")
    assert d.item() == 1.0


def test_bad_inputs_are_clear_errors(data):
    queries, bank = data
    with pytest.raises(ValueError, match="k must be"):
        knn_distance(queries, bank[:2], k=3)
    with pytest.raises(ValueError, match="D="):
        knn_distance(queries[:, :10], bank)
    with pytest.raises(ValueError, match="metric"):
        knn_distance(queries, bank, metric="manhattan")


# 1-D hand example: source refs 0 and 10, target ref 4, tests at 1, 6, 12.
SOURCE, TARGET, TESTS = [[0.0], [10.0]], [[4.0]], [[1.0], [6.0], [12.0]]


def test_score_is_min_over_banks_by_hand():
    # d_source = 1, 4, 2 ; d_target = 3, 2, 8.
    np.testing.assert_array_equal(score_clips(TESTS, SOURCE, TARGET), [1.0, 2.0, 2.0])
    # k = 2: mean of the two smallest source distances: (1+9)/2, (6+4)/2, (12+2)/2.
    np.testing.assert_array_equal(bank_distance(TESTS, SOURCE, k=2), [5.0, 5.0, 7.0])


def test_domain_normalisation_equals_its_formula():
    d_s, d_t = np.array([1.0, 4.0, 2.0]), np.array([3.0, 2.0, 8.0])

    def z(d):
        return (d - d.mean()) / np.sqrt(np.mean((d - d.mean()) ** 2))  # population std

    np.testing.assert_allclose(score_clips(TESTS, SOURCE, TARGET, domain_norm=True),
                               np.minimum(z(d_s), z(d_t)), rtol=1e-12)
    # Per-machine statistics when the test clips of two machines are scored together.
    rng = np.random.default_rng(5)
    d = rng.normal(size=10)
    group = np.array(["fan"] * 4 + ["pump"] * 6)
    got = domain_normalise(d, group)
    np.testing.assert_allclose(got[:4], z(d[:4]), rtol=1e-12)
    np.testing.assert_allclose(got[4:], z(d[4:]), rtol=1e-12)


def test_domain_normalisation_rejects_zero_spread():
    with pytest.raises(ValueError, match="zero spread"):
        domain_normalise([1.0, 1.0, 1.0])


def test_memmixup_count_and_values():
    source = [[0.0, 0.0], [10.0, 0.0], [0.0, 20.0]]
    target = [[1.0, 0.0]]
    # Nearest sources of (1, 0): (0, 0) at 1, then (10, 0) at 9.
    got = memmixup(source, target, K=2, ratio=0.9)
    np.testing.assert_allclose(got.numpy(), [[1.0, 0.0], [0.9, 0.0], [1.9, 0.0]], rtol=1e-15)
    rng = np.random.default_rng(1)
    big = memmixup(rng.normal(size=(40, 8)), rng.normal(size=(6, 8)), K=5)
    assert big.shape == (6 * (1 + 5), 8)


def test_memory_bank_reference_scores_and_roundtrip(tmp_path):
    bank = MemoryBank("fan", torch.tensor([[0.0], [3.0], [10.0]]), torch.tensor([[5.0], [6.0]]), {"layer": 6})
    # Source refs: leave-one-out source 3, 3, 7; to target 5, 2, 4 -> 3, 2, 4.
    # Target refs: leave-one-out target 1, 1; to source 2, 3 -> 1, 1.
    np.testing.assert_array_equal(bank.reference_scores(), [3.0, 2.0, 4.0, 1.0, 1.0])
    loaded = MemoryBank.load(bank.save(tmp_path / "banks" / "fan.pt"))
    assert loaded.machine == "fan" and loaded.meta == {"layer": 6}
    assert torch.equal(loaded.source, bank.source) and torch.equal(loaded.target, bank.target)
    np.testing.assert_array_equal(loaded.score(TESTS), score_clips(TESTS, bank.source, bank.target))
    mixed = bank.with_memmixup(K=2)
    assert mixed.target.shape == (2 * 3, 1) and mixed.meta["memmixup"] == [2, 0.9]


def test_leave_one_out_with_duplicate_references():
    bank = MemoryBank("fan", torch.tensor([[0.0], [0.0], [5.0]]), torch.tensor([[20.0], [21.0]]))
    np.testing.assert_array_equal(bank.reference_scores()[:3], [0.0, 0.0, 5.0])
