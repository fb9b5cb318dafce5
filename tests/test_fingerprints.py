"""Input fingerprints: the vectorised hash against a plain per-string implementation of the
same definition, Arrow columns against Python lists, and the pre-0.2 fingerprint kept for
outputs written before."""

from __future__ import annotations

import random
import tracemalloc

import numpy as np
import pyarrow as pa
import pytest
from conftest import Recorder, SQLClient, outputs_by_source

import reactive
from reactive import fingerprints as fingerprints_module
from reactive.backends.base import outputs_table
from reactive.components import Listener, Model
from reactive.fingerprints import (
    _SEED_JSON,
    _SEED_TEXT,
    column_fingerprints,
    fingerprint,
    fingerprints,
    hash_texts,
    json_text,
    legacy_fingerprint,
)

MASK = (1 << 64) - 1


def mix(x: int) -> int:
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & MASK
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & MASK
    return x ^ (x >> 31)


def plain_hash(data: bytes, seed: int) -> int:
    """hash_texts' definition, one string at a time in plain Python."""
    total = 0
    for j in range(0, len(data), 8):
        word = int.from_bytes(data[j : j + 8].ljust(8, b"\0"), "little")
        total = (total + mix((word + (j // 8 + 1) * 0x9E3779B97F4A7C15) & MASK)) & MASK
    digest = mix((total + len(data) * 0xC2B2AE3D27D4EB4F + seed) & MASK)
    return digest - (1 << 64) if digest >> 63 else digest


def random_texts(rng: random.Random, count: int) -> list[str]:
    alphabet = "ab \x00é€😀"
    return [
        "".join(rng.choice(alphabet) for _ in range(rng.choice([0, 1, 7, 8, 9, 15, 16, 17, 40]))) for _ in range(count)
    ]


def test_the_vectorised_hash_is_its_definition() -> None:
    rng = random.Random(5)
    texts = random_texts(rng, 500)
    expected = [plain_hash(t.encode(), _SEED_TEXT) for t in texts]
    assert fingerprints(texts) == expected
    assert [fingerprint(t) for t in texts[:50]] == expected[:50]
    # Batches whose bytes end inside their last word, or hold under 8 bytes in all.
    for batch in (["", "a"] * 5, [""] * 9, ["ab"] * 4 + [""] * 5, ["abcdefgh", "i"] * 5, ["é"] * 9):
        assert fingerprints(batch) == [plain_hash(t.encode(), _SEED_TEXT) for t in batch]
    values = [{"b": [1.5, None], "a": 1}, 7, None, True, [1, "x"]]
    assert fingerprints(values) == [plain_hash(json_text(v).encode(), _SEED_JSON) for v in values]


def test_texts_and_other_values_mix_in_one_batch() -> None:
    values = ["1", 1, "", None, "null", {"a": "b"}, "x" * 1000]
    assert fingerprints(values) == [fingerprint(v) for v in values]
    assert len(set(fingerprints(values))) == len(values)  # "1" and 1, "null" and None differ


def test_arrow_columns_give_the_fingerprints_of_their_values() -> None:
    rng = random.Random(11)
    texts = random_texts(rng, 300)
    expected = fingerprints(texts)
    array = pa.array(texts)
    assert column_fingerprints(array) == expected
    assert column_fingerprints(pa.array(texts, pa.large_string())) == expected
    assert column_fingerprints(array.slice(17, 100)) == expected[17:117]  # an offset into the buffers
    chunked = pa.chunked_array([array.slice(0, 10), array.slice(10, 0), array.slice(10)])
    assert column_fingerprints(chunked) == expected
    assert column_fingerprints(pa.array([], pa.string())) == []
    assert column_fingerprints(pa.array(["", ""])) == fingerprints(["", ""])


def test_columns_that_are_not_plain_text_are_left_to_the_caller() -> None:
    assert column_fingerprints(pa.array(["a", None])) is None
    assert column_fingerprints(pa.array([b"a"])) is None
    assert column_fingerprints(pa.array([1.5])) is None


def test_a_one_word_change_always_changes_the_fingerprint() -> None:
    base = "0123456789abcdef" * 4
    changed = [base[:k] + "X" + base[k + 1 :] for k in range(len(base))]
    assert len(set(fingerprints([base, *changed]))) == len(base) + 1
    # Zero bytes are not padding: a trailing NUL is part of the text.
    assert len({fingerprint("ab"), fingerprint("ab\x00"), fingerprint("ab\x00\x00")}) == 3


def test_lone_surrogates_are_fingerprinted_as_before() -> None:
    """Python text that is not valid UTF-8 (a lone surrogate from a JSON source) is hashed."""
    assert fingerprint("a\udc80") != fingerprint("a")
    batch = ["a\udc80", *(f"text {i}" for i in range(20))]  # more than a few: one Arrow buffer, unless it cannot
    assert fingerprints(batch) == [plain_hash(t.encode("utf-8", "surrogatepass"), _SEED_TEXT) for t in batch]
    assert legacy_fingerprint("a\udc80") != legacy_fingerprint("a")


@pytest.mark.parametrize("bad", [{1j: 1}, {"a": float("nan"), 1: 2}])
def test_values_json_cannot_encode_raise(bad: object) -> None:
    with pytest.raises((TypeError, ValueError)):
        fingerprints(["a", bad])


def test_hash_texts_takes_no_strings_at_all() -> None:
    assert hash_texts(np.empty(0, np.uint8), [], []).tolist() == []


@pytest.mark.parametrize("version", [None, "v1"])
def test_outputs_stored_before_0_2_are_current_until_their_input_changes(sql: SQLClient, version: str | None) -> None:
    """An upgrade computes nothing again: outputs whose stored fingerprint is the pre-0.2 one
    of their unchanged input are current, at the restart's reconciliation and for a live update
    of another column; a changed input is computed and stored with the new fingerprint."""
    texts = {i: f"text number {i}" for i in range(1, 41)}  # more than FEW_ROWS: Arrow columns on DuckDB
    sql.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, text VARCHAR(100), n INTEGER)")
    sql.executemany("INSERT INTO docs VALUES (?, ?, ?)", [(i, t, 0) for i, t in texts.items()])
    first = Recorder(len)
    with reactive.connect(sql.uri) as db:
        db.add(Listener(Model("m", predict=first, version=version), "text", "docs"), progress=False)
    assert sorted(first.inputs) == sorted(texts.values())
    model = Model("m", predict=first, version=version)
    table = outputs_table("m__text")
    legacy = [(model.legacy_fingerprint(t), i) for i, t in texts.items()]
    assert all(fp != model.fingerprint(texts[i]) for fp, i in legacy)
    sql.executemany(f'UPDATE "{table}" SET "_fingerprint" = ? WHERE "_source" = ?', legacy)

    again = Recorder(len)
    with reactive.connect(sql.uri, poll_interval=0.05) as db:
        db.add(Listener(Model("m", predict=again, version=version), "text", "docs"), progress=False)
        assert again.inputs == []  # the restart's reconciliation: every output current
        db.cdc.start()
        sql.execute("UPDATE docs SET n = 1")  # every row changes, no input does
        assert db.cdc.wait_idle(timeout=30)
        assert again.inputs == []
        sql.execute("UPDATE docs SET text = 'changed' WHERE id = 2")
        assert db.cdc.wait_idle(timeout=30)
        assert again.inputs == ["changed"]
        assert outputs_by_source(db, "m__text")[2] == len("changed")
    stored = dict((row[1], row[0]) for row in sql.execute(f'SELECT "_fingerprint", "_source" FROM "{table}"'))
    assert stored[2] == model.fingerprint("changed")
    assert stored[3] == model.legacy_fingerprint(texts[3])  # kept until its input changes


@pytest.mark.parametrize("words_per_pass", [1, 2, 3, 64])
def test_texts_are_hashed_the_same_in_passes_of_any_size(monkeypatch: pytest.MonkeyPatch, words_per_pass: int) -> None:
    """Strings are hashed a pass of whole strings at a time, a long one in slices of words."""
    rng = random.Random(words_per_pass)
    texts = [*random_texts(rng, 200), "x" * 100, "y" * 17, ""]
    expected = [plain_hash(t.encode(), _SEED_TEXT) for t in texts]
    monkeypatch.setattr(fingerprints_module, "WORDS_PER_PASS", words_per_pass)
    assert fingerprints(texts) == expected
    assert column_fingerprints(pa.array(texts)) == expected


def test_hashing_large_texts_takes_bounded_memory() -> None:
    """No copy of the texts' bytes and passes of a bounded number of words: a 32 MB text (and
    a window of 4,000 texts of 8 KB) is hashed with a few MB of temporary arrays."""
    big = pa.array(["a" * (32 << 20)])
    many = pa.array(["b" * 8192] * 4000)
    for column in (big, many):
        tracemalloc.start()
        try:
            column_fingerprints(column)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 16 << 20, peak


def test_a_row_whose_input_cannot_be_fingerprinted_fails_alone() -> None:
    """A window's inputs are fingerprinted in one call; where one value cannot be (a document
    key JSON has no text for), that row alone is recorded as failed and the others go on."""
    from reactive.components.base import Refresh
    from reactive.events import Batch, DBEvent

    listener = Listener(Model("m", predict=list), "text", "docs")
    rows = [{"id": 1, "text": "a"}, {"id": 2, "text": {1j: "x"}}, {"id": 3, "text": {"b": [1, None]}}]
    refresh, remove = Refresh(), []
    inputs = listener._candidates(Batch("docs", DBEvent.insert, (1, 2, 3), rows), refresh, remove)
    assert inputs.ids == [1, 3] and inputs.fingerprints == fingerprints(["a", {"b": [1, None]}])
    assert remove == [2]
    assert [(e.source, e.error.split(":")[0]) for e in refresh.errors] == [(2, "cannot fingerprint key 'text'")]
