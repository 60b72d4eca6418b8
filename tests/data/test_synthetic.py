"""Synthetic known-answer corpora: determinism, exact validity metrics on hand-made rows."""

import pytest

from unmask.data.corpus import DataError, load_corpus
from unmask.data.synthetic import Codebook, Markov, parse, validity


def test_deterministic_by_seed_and_sized_by_options():
    a = parse("synthetic:codebook,docs=20,length=5,seed=3").documents()
    assert a == parse("synthetic:codebook,docs=20,length=5,seed=3").documents()
    assert a != parse("synthetic:codebook,docs=20,length=5,seed=4").documents()
    assert len(a) == 20 and all(len(d.split()) == 5 * 4 for d in a)
    m = parse("synthetic:markov,docs=7,length=30").documents()
    assert m == Markov(docs=7, length=30).documents() and all(len(d.split()) == 30 for d in m)
    splits = load_corpus("synthetic:markov,docs=300", valid_fraction=0.1, test_fraction=0.1)
    assert sum(map(len, splits.values())) == 300 and all(splits.values())


def test_codebook_validity_on_hand_made_rows():
    task = Codebook(codewords=4, chunk=3, alphabet=5, seed=1)
    w = [" ".join(f"c{s}" for s in word) for word in task.words().tolist()]
    spec = "synthetic:codebook,codewords=4,chunk=3,alphabet=5,seed=1"
    assert validity(spec, [f"{w[0]} {w[1]} {w[3]}"]) == {"valid_chunks": 1.0, "chunks": 3}
    # a chunk made of two codewords' halves is invalid (unless it happens to be a codeword)
    mixed = task.words()[0].tolist()[:2] + task.words()[1].tolist()[2:]
    if tuple(mixed) not in {tuple(x) for x in task.words().tolist()}:
        row = f"{w[0]} " + " ".join(f"c{s}" for s in mixed)
        assert validity(spec, [row])["valid_chunks"] == pytest.approx(0.5)
    assert validity(spec, ["garbage words here"])["valid_chunks"] == 0.0
    shifted = f"c0 {w[2]} {w[3]}"  # one stray symbol before aligned codewords: best alignment
    assert validity(spec, [shifted])["valid_chunks"] == 1.0


def test_markov_forbidden_bigram_rate_on_hand_made_rows():
    task = Markov(vocab=8, succ=2, seed=5)
    nxt = task.successors()
    spec = "synthetic:markov,vocab=8,succ=2,seed=5"
    good = [0, int(nxt[0, 0]), int(nxt[int(nxt[0, 0]), 1])]
    assert validity(spec, [" ".join(f"m{s}" for s in good)]) == {"forbidden_bigram_rate": 0.0, "bigrams": 2}
    bad = next(b for b in range(8) if b not in nxt[0].tolist())
    assert validity(spec, [f"m0 m{bad}"])["forbidden_bigram_rate"] == 1.0
    assert all(task.validity(d) == (95, 95) for d in task.documents()[:20])  # its own documents are valid


def test_bad_specs_name_the_option():
    with pytest.raises(DataError, match="unknown synthetic task 'zipf'"):
        load_corpus("synthetic:zipf")
    with pytest.raises(DataError, match="'chunks=3'"):
        load_corpus("synthetic:codebook,chunks=3")
    with pytest.raises(DataError, match="cannot make"):
        load_corpus("synthetic:codebook,alphabet=2,chunk=2,codewords=5")
