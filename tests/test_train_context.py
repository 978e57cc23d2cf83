"""Training with context: the context file, pair windows, the tweet-part head input,
ITA's cross-view KL, the ``ita`` preset, XLM-R through ``from_pretrained``, and that an
empty context is exactly the plain model (tiny data, CPU)."""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path

import pytest
import torch

from mner.data.conll import read_conll
from mner.data.schemes import entities
from mner.errors import CacheError, ConfigError, DataError
from mner.train import encoder as encoders
from mner.train.config import make_train_config
from mner.train.context import (
    build_contexts,
    join_context,
    read_context_file,
    report_file_coverage,
    split_contexts,
)
from mner.train.crf import log_marginals as crf_log_marginals
from mner.train.data import NerDataset, PairTemplate, TagSet, make_windows
from mner.train.model import Tagger, cross_view_kl
from mner.train.trainer import train_run

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WORDS = [["Rio", "FC", "won", "again", "in", "Madrid"], ["hello", "world"]]


@pytest.fixture(scope="module")
def tok():
    texts = WORDS + [["club", "sign", "football", "team", "of", "the", "city"]]
    return encoders.train_wordpiece(texts, 200)


# -- the context file ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "says"),
    [
        ("{not json", "not valid JSON"),
        ('["a"]', "expected an object"),
        ('{"context": "x"}', 'neither of "image_id" and "key"'),
        ('{"image_id": "1", "key": "train:0", "context": "x"}', 'both of "image_id" and "key"'),
        ('{"image_id": ["1"], "context": "x"}', '"image_id" must be a non-empty string, found a list'),
        ('{"image_id": "1"}', 'has no "context"'),
        ('{"image_id": "1", "context": 3}', '"context" must be a string, found a number'),
        ('{"image_id": "9", "context": "a"}', "image_id '9' is given twice (first at line 1)"),
    ],
)
def test_context_file_refuses_malformed_lines_with_one_line(tmp_path, line, says):
    path = tmp_path / "ctx.jsonl"
    path.write_text('{"image_id": "9", "context": "first"}\n\n' + line + "\n", encoding="utf-8")
    with pytest.raises(DataError) as err:
        read_context_file(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}:3: ") and says in msg and "\n" not in msg


def test_context_file_lookup_counts_missing_and_unmatched(tmp_path):
    path = tmp_path / "ctx.jsonl"
    path.write_text(
        '{"image_id": 17, "context": "  Rio   FC is a club "}\n'
        '{"key": "train:1", "context": "by key"}\n'
        '{"image_id": "nowhere", "context": "unused"}\n',
        encoding="utf-8",
    )
    cf = read_context_file(path)
    assert len(cf) == 3 and len(cf.sha256) == 64

    class T:
        def __init__(self, image_id, index):
            self.image_id, self.index, self.source = image_id, index, "data/train.txt"

    tweets = [T("17", 0), T("5", 1), T("6", 2)]
    ctx, stats = build_contexts(("file",), tweets, context_file=cf)
    # numeric ids read as strings, whitespace collapsed, a key wins; the third has none
    assert ctx == ["Rio FC is a club", "by key", ""]
    assert (stats.tweets, stats.empty, stats.file_missing) == (3, 1, 1)
    lines: list[str] = []
    record = report_file_coverage(cf, {"train": stats}, warn=lines.append)
    assert record["missing"] == {"train": 1} and record["unmatched"] == 1 and record["sha256"] == cf.sha256
    assert "no entry for 1 tweet(s) (train 1/3)" in lines[0]
    assert "1 entr(y/ies) match no tweet" in lines[1] and "image_id:nowhere" in lines[1]
    # a file of another dataset: nothing matches at all
    other = read_context_file(path)
    _, none = build_contexts(("file",), [T("x", 7)], context_file=other)
    with pytest.raises(DataError, match="none of its 3 entries matches a tweet"):
        report_file_coverage(other, {"test": none})


def test_sources_are_joined_in_order_and_validated():
    class Cache:
        def strings(self, feature, image_id):
            return {"tags": ["person", "ball"], "ocr": ["RIO FC"], "caption": []}[feature]

    class T:
        image_id, index, source = "1", 0, "train.txt"

    ctx, _ = build_contexts(("ocr", "caption", "tags"), [T()], cache=Cache())
    assert ctx == ["RIO FC ; person ; ball"]
    assert join_context([None, "", []]) == ""
    with pytest.raises(ConfigError, match="context source 'ocrr' is unknown"):
        make_train_config({"profile": "tiny"}, ["context=ocrr"])
    with pytest.raises(ConfigError, match="names 'file' but no context file"):
        make_train_config({"profile": "tiny"}, ["context=file"])
    with pytest.raises(ConfigError, match="cross_view aligns"):
        make_train_config({"profile": "tiny"}, ["cross_view=true"])
    cfg = make_train_config({"profile": "tiny"}, ["context_file=k.jsonl", "context=ocr"])
    assert cfg.context == ("ocr", "file")  # --context-file alone means "read it"
    with pytest.raises(CacheError, match="read from the feature cache; pass --features"):
        split_contexts(cfg, {}, None)


def test_ita_preset_and_plain_defaults():
    ita = make_train_config({"model": "ita", "profile": "tiny"})
    assert ita.context == ("tags", "caption", "ocr") and ita.cross_view and ita.decode_view == "context"
    plain = make_train_config({"model": "bert_crf", "profile": "tiny"})
    assert plain.context == () and plain.cross_view is False
    # a preset field the user sets wins
    assert make_train_config({"model": "ita", "profile": "tiny"}, ["cross_view=false"]).cross_view is False


# -- windows -------------------------------------------------------------------------


def test_pair_windows_follow_the_tokenizers_pair_encoding(tok):
    ctx = ["club sign football team", ""]
    plain = make_windows(WORDS, tok, 32)
    wins = make_windows(WORDS, tok, 32, contexts=ctx, context_max_length=64)
    ref = tok(" ".join(WORDS[0]), ctx[0], return_token_type_ids=True)
    assert wins[0].input_ids == ref["input_ids"] and wins[0].token_type_ids == ref["token_type_ids"]
    # the tweet part is the window without context, word positions unchanged
    assert wins[0].input_ids[: wins[0].tweet_len] == plain[0].input_ids and wins[0].first == plain[0].first
    # an empty context is exactly the plain window
    assert wins[1].input_ids == plain[1].input_ids and wins[1].token_type_ids is None
    # the context is cut to its budget; the tweet never is
    cut = make_windows(WORDS, tok, 32, contexts=ctx, context_max_length=2)
    assert len(cut[0].input_ids) == plain[0].tweet_len + 2 + 1 and cut[0].tweet_len == plain[0].tweet_len
    # long tweets still split into windows, each reading the whole context
    long = make_windows(WORDS, tok, 5, contexts=ctx, context_max_length=64)
    assert [w.word_start for w in long if w.item == 0] == [0, 3]
    assert all(w.input_ids[w.tweet_len:] == ref["input_ids"][len(plain[0].input_ids):] for w in long if w.item == 0)


# -- the model -------------------------------------------------------------------------


def test_crf_marginals_match_brute_force():
    from torchcrf import CRF

    torch.manual_seed(0)
    K, W = 3, 4
    crf = CRF(K, batch_first=True)
    for p in crf.parameters():
        torch.nn.init.normal_(p)
    em = torch.randn(2, W, K)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    got = crf_log_marginals(crf, em, mask).exp()
    for b in range(2):
        n = int(mask[b].sum())
        probs = torch.zeros(n, K)
        for path in itertools.product(range(K), repeat=n):
            tags = torch.tensor([list(path) + [0] * (W - n)])
            score = crf._compute_score(em[b : b + 1].transpose(0, 1), tags.t(), mask[b : b + 1].t())
            for i, k in enumerate(path):
                probs[i, k] += score.exp().item()
        probs /= probs.sum(-1, keepdim=True)
        torch.testing.assert_close(got[b, :n], probs, rtol=1e-4, atol=1e-5)
    # KL of a view with itself is zero; only the student gets a gradient
    student = em.clone().requires_grad_()
    teacher = (em + torch.randn_like(em)).requires_grad_()
    assert cross_view_kl(crf, em, em, mask).abs() < 1e-5
    kl = cross_view_kl(crf, teacher.detach(), student, mask)
    kl.backward()
    assert kl > 0 and student.grad.abs().sum() > 0 and teacher.grad is None


class Spy(torch.nn.Module):
    """An identity head that records what it received."""

    out_dim = 32
    emission_dropout = True  # the FusionHead contract's defaults the tagger reads
    crf_reduction = "mean"

    def forward(self, batch):
        from mner.train.heads.base import HeadOutput

        self.seen = batch
        return HeadOutput(hidden=batch.hidden)


def _tiny_tagger(tok, **kw):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    enc = BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64, pad_token_id=tok.pad_token_id), add_pooling_layer=False)
    return Tagger(enc, Spy(), TagSet("bio2").names, 0.0, **kw).eval()


def test_heads_see_the_tweet_part_and_the_tweet_view_is_the_plain_model(tok):
    tags = TagSet("bio2")
    labels = [["B-ORG", "I-ORG", "O", "O", "O", "B-LOC"], ["O", "O"]]
    plain = NerDataset(WORDS, ["1", "2"], tok, 32, tags, labels)
    ctx = NerDataset(WORDS, ["1", "2"], tok, 32, tags, labels, contexts=["club sign football", ""],
                     context_max_length=16)
    pb, cb = plain.collate([0, 1]), ctx.collate([0, 1])
    assert cb.input_ids.shape[1] > pb.input_ids.shape[1] and cb.token_type_ids is not None
    model = _tiny_tagger(tok, cross_view_weight=1.0)
    with torch.no_grad():
        em_plain, _ = model(pb)
        seen_plain = model.head.seen
        em_tweet, _ = model(cb, view="tweet")
        em_ctx, _ = model(cb)
        seen_ctx = model.head.seen
    # the head gets the layout of the window without context, whichever view
    assert seen_ctx.hidden.shape == seen_plain.hidden.shape
    assert torch.equal(seen_ctx.token_mask, pb.attention_mask) and torch.equal(seen_ctx.labels, pb.sub_labels)
    torch.testing.assert_close(em_tweet, em_plain)
    assert not torch.allclose(em_ctx[0], em_plain[0])  # the context changes the tweet's states
    torch.testing.assert_close(em_ctx[1], em_plain[1], rtol=1e-4, atol=1e-5)  # row without context
    model.train()
    _, parts = model.loss(cb)
    assert {"crf", "crf_tweet", "cross_view_kl"} <= set(parts) and parts["cross_view_kl"] >= 0
    _, parts = model.loss(pb)  # nothing to align without context
    assert set(parts) == {"crf"}
    model.eval()
    model.decode_view = "tweet"
    assert model.decode(cb)[0] == model.decode(pb)[0]


# -- runs ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small(sample_dir, tmp_path_factory):
    """The first tweets of the sample (fast runs) and context files for them."""
    out = tmp_path_factory.mktemp("small")
    sizes = {"train": 60, "valid": 20, "test": 20}
    for split, n in sizes.items():
        blocks = (sample_dir / f"{split}.txt").read_text(encoding="utf-8").strip().split("\n\n")
        (out / f"{split}.txt").write_text("\n\n".join(blocks[:n]) + "\n", encoding="utf-8")
    empty, oracle = [], []
    for split in sizes:
        for t in read_conll(out / f"{split}.txt"):
            empty.append({"key": f"{split}:{t.index}", "context": ""})
            said = " ; ".join(f"{' '.join(t.tokens[s:e])} is {typ}" for typ, s, e in t.entities)
            oracle.append({"image_id": t.image_id, "context": said})
    for name, rows in (("empty.jsonl", empty), ("oracle.jsonl", oracle)):
        first = {}
        for r in rows:  # one entry per id (tweets may share an image)
            first.setdefault(r.get("image_id", r.get("key")), r)
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in first.values()), encoding="utf-8")
    return out


def _train(data, out, *over, model="bert_crf"):
    cfg = make_train_config({"model": model, "profile": "tiny"},
                            ["epochs=1", "patience=0", "amp=off", "eval_batch_size=32", *over])
    return train_run(cfg, data, None, out)


@pytest.fixture(scope="module")
def small_runs(small, tmp_path_factory):
    """Plain bert_crf, the same with an all-empty context file, and with a context file
    that states each entity's type (4 short epochs each; the >= 20 F1 acceptance runs
    are the slow tests below)."""
    out = tmp_path_factory.mktemp("ctx_runs")
    short = ("epochs=4", "batch_size=8")
    metrics = {
        "plain": _train(small, out / "plain", *short),
        "empty": _train(small, out / "empty", *short, f"context_file={small / 'empty.jsonl'}"),
        "oracle": _train(small, out / "oracle", *short, f"context_file={small / 'oracle.jsonl'}"),
    }
    return out, metrics


def test_empty_context_is_exactly_the_plain_model(small, small_runs):
    out, _ = small_runs
    for split in ("valid", "test"):
        a = (out / "plain" / "seed_1" / f"pred_{split}.txt").read_bytes()
        assert a == (out / "empty" / "seed_1" / f"pred_{split}.txt").read_bytes()
    prov = json.loads((out / "empty" / "provenance.json").read_text())
    assert prov["context"]["sources"] == ["file"]
    assert prov["context"]["splits"]["train"] == {"tweets": 60, "empty": 60, "file_missing": 0}
    assert prov["context"]["file"]["sha256"] == read_context_file(small / "empty.jsonl").sha256


def test_a_context_that_tells_the_types_lifts_f1_and_evaluate_predict_use_the_runs_file(
    small, small_runs, tmp_path, mner_cli
):
    from mner.apps.predict import Predictor, read_posts
    from mner.train.evaluation import evaluate_run

    out, metrics = small_runs
    f1 = {k: m["runs"][0]["test"]["overall"]["f1"] for k, m in metrics.items()}
    assert f1["oracle"] >= f1["plain"] + 10, f1
    run = out / "oracle"
    assert evaluate_run(run, small / "test.txt")["overall"]["f1"] == pytest.approx(f1["oracle"])
    # predict looks the file up by image id, and tags as evaluate does
    posts, problems = read_posts(small / "test.txt", None)
    got = [p.entities for p in Predictor(run).tag(posts)]
    want = [[(typ, s, e) for typ, s, e in entities(list(t.labels))]
            for t in read_conll(run / "seed_1" / "pred_test.txt")]
    assert [[(e["type"], e["start"], e["end"]) for e in ents] for ents in got] == want
    # a changed file is refused unless given explicitly
    copy = tmp_path / "changed.jsonl"
    copy.write_text((small / "oracle.jsonl").read_text() + '{"key": "x:1", "context": "new"}\n')
    prov = json.loads((run / "provenance.json").read_text())
    saved = dict(prov["context"]["file"])
    prov["context"]["file"]["path"] = str(copy)
    (run / "provenance.json").write_text(json.dumps(prov))
    try:
        code, _, err = mner_cli("evaluate", "--run", run, "--data", small / "test.txt")
        assert code == 2 and "changed since" in err and "--context-file" in err
        code, stdout, err = mner_cli("evaluate", "--run", run, "--data", small / "test.txt",
                                     "--context-file", copy, "--json")
        assert code == 0 and "not the context file" in err
        assert json.loads(stdout)["overall"]["f1"] == pytest.approx(f1["oracle"])
        # the tweet view reads no context: it needs no file (here: gone)
        prov["context"]["file"]["path"] = str(tmp_path / "gone.jsonl")
        (run / "provenance.json").write_text(json.dumps(prov))
        with pytest.raises(ConfigError, match="is gone; pass --context-file"):
            evaluate_run(run, small / "test.txt")
        tweet_view = evaluate_run(run, small / "test.txt", view="tweet")["overall"]["f1"]
        assert tweet_view != pytest.approx(f1["oracle"])
    finally:
        prov["context"]["file"] = saved
        (run / "provenance.json").write_text(json.dumps(prov))


def _tiny_xlmr(sample_dir: Path, out: Path) -> Path:
    """A tiny XLM-R with a sentencepiece vocabulary trained on the sample, saved as a folder."""
    import io

    import sentencepiece as spm
    from transformers import XLMRobertaConfig, XLMRobertaModel, XLMRobertaTokenizer

    texts = [" ".join(t.tokens) for s in ("train", "valid") for t in read_conll(sample_dir / f"{s}.txt")]
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=proto, vocab_size=400, model_type="unigram",
        character_coverage=1.0, minloglevel=2, num_threads=1, hard_vocab_limit=False, seed_sentencepiece_size=20000,
    )
    sp = spm.SentencePieceProcessor(model_proto=proto.getvalue())
    pieces = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())
              if not (sp.is_control(i) or sp.is_unknown(i))]
    # fairseq's order, as XLM-R has it: <s> <pad> </s> <unk>, the pieces, <mask>
    vocab = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *pieces, ("<mask>", 0.0)]
    tok = XLMRobertaTokenizer(vocab=vocab)
    cfg = XLMRobertaConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=128, max_position_embeddings=258, pad_token_id=tok.pad_token_id,
                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, type_vocab_size=1)
    torch.manual_seed(0)
    XLMRobertaModel(cfg, add_pooling_layer=False).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_xlm_roberta_from_a_folder_with_and_without_context(small, tmp_path):
    folder = _tiny_xlmr(small, tmp_path / "xlmr")
    model, tok = encoders.load_pretrained(str(folder))
    assert "token_type_ids" not in tok.model_input_names
    template = PairTemplate.of(tok)
    assert template.type_a is None and template.middle == (tok.sep_token_id, tok.sep_token_id)
    wins = make_windows([["Rio", "FC", "won"]], tok, 32, contexts=["the club sign"], context_max_length=64)
    ref = tok("Rio FC won", "the club sign")["input_ids"]
    assert wins[0].input_ids == ref and wins[0].token_type_ids is None
    # first sub-token of each word carries its tag
    assert wins[0].first == [1 + sum(len(tok(w, add_special_tokens=False)["input_ids"]) for w in ["Rio", "FC", "won"][:i])
                             for i in range(3)]
    over = [f"encoder={folder}", "lr_encoder=5e-4", "max_length=64"]
    plain = _train(small, tmp_path / "plain", *over)
    ctx = _train(small, tmp_path / "ctx", *over, f"context_file={small / 'oracle.jsonl'}", "context_max_length=300")
    for m in (plain, ctx):
        assert 0.0 <= m["runs"][0]["test"]["overall"]["f1"] <= 100.0
    # the budget was cut to the positions the encoder has (256 - 64 - 2 extra specials)
    from mner.train.context import context_budget
    from mner.train.runs import load_run

    lr = load_run(tmp_path / "ctx")
    assert context_budget(lr.cfg, lr.model.encoder, lr.tokenizer) == 256 - 64 - 2


def test_report_shows_the_context_recipes_reported_numbers():
    from mner.report.paper_numbers import paper_f1_of_run

    assert paper_f1_of_run("twitter2015", "ita", {"context": ["tags", "caption", "ocr"]}) == 78.03
    assert paper_f1_of_run("Twitter-2017", "pgim", {"context": ["file"], "context_file": "k.jsonl"}) == 91.43
    assert paper_f1_of_run("twitter2017", "more_image", {"context": ["file"], "context_file": "r.jsonl"}) == 90.28
    assert paper_f1_of_run("twitter2015", "more_text", {"context": ["file"], "context_file": "r.jsonl"}) == 77.79
    # a BERT-CRF reading a context is not the paper's BERT-CRF; ITA without its image text is not ITA
    assert paper_f1_of_run("twitter2015", "bert_crf", {"context": ["file"], "context_file": "k.jsonl"}) is None
    assert paper_f1_of_run("twitter2015", "bert_crf", {"context": []}) == 71.81
    assert paper_f1_of_run("twitter2015", "ita", {"context": ["ocr"]}) is None
    with pytest.raises(ConfigError, match="no context file is given; pass --context-file"):
        make_train_config({"model": "pgim", "profile": "tiny"})


# -- acceptance (slow): the sample's OCR-dependent tweets and its knowledge file --------


def _marked_f1(data_dir: Path, marks_file: str, run: Path) -> float:
    from mner.data.dataset import read_image_dependent
    from mner.scoring import score_marked

    tweets = read_conll(data_dir / "test.txt")
    marks = read_image_dependent(data_dir / marks_file)
    pred = [list(t.labels) for t in read_conll(run / "seed_1" / "pred_test.txt")]
    return score_marked([marks.get(("test", t.index), []) for t in tweets], pred).f1


@pytest.mark.slow
def test_acceptance_ocr_context_and_knowledge_file_beat_plain_bert_crf(ocr_sample_dir, tmp_path):
    """Tiny profile, CPU, the papers' tiny defaults: ``context: [ocr]`` (the real RapidOCR
    reading the signs) beats plain ``bert_crf`` on the OCR-dependent entities by >= 20 F1,
    the knowledge file beats it on the image-dependent entities by >= 20 F1, and an
    all-empty context changes nothing."""
    from mner.apps.predict import Predictor, read_posts
    from mner.extract.config import ExtractConfig
    from mner.extract.runner import run_extract

    data = ocr_sample_dir
    cache = tmp_path / "ocr.h5"
    run_extract(ExtractConfig(profile="tiny", device="cpu", threads=1, features=("ocr",)),
                images=data / "images", data=None, out=cache, progress=False)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("".join(json.dumps({"key": f"{s}:{t.index}", "context": ""}) + "\n"
                             for s in ("train", "valid", "test") for t in read_conll(data / f"{s}.txt")))

    def train(name, *over, features=None):
        cfg = make_train_config({"model": "bert_crf", "profile": "tiny"}, ["threads=1", *over])
        train_run(cfg, data, features, tmp_path / name)
        return tmp_path / name

    plain = train("plain")
    ocr = train("ocr", "context=ocr", features=cache)
    knowledge = train("knowledge", f"context_file={data / 'knowledge.jsonl'}")
    blank = train("empty", f"context_file={empty}")
    assert _marked_f1(data, "ocr_dependent.tsv", ocr) >= _marked_f1(data, "ocr_dependent.tsv", plain) + 20
    assert _marked_f1(data, "image_dependent.tsv", knowledge) >= _marked_f1(data, "image_dependent.tsv", plain) + 20
    assert (blank / "seed_1" / "pred_test.txt").read_bytes() == (plain / "seed_1" / "pred_test.txt").read_bytes()
    # predict re-reads the images' text with the same OCR settings and tags as evaluation did
    posts, _ = read_posts(data / "test.txt", data / "images")
    got = [[(e["type"], e["start"], e["end"]) for e in p.entities] for p in Predictor(ocr, device="cpu").tag(posts)]
    want = [list(entities(list(t.labels))) for t in read_conll(ocr / "seed_1" / "pred_test.txt")]
    assert got == want


def test_every_head_reads_a_context_and_an_empty_one_changes_nothing(sample_dir, tiny_cache):
    """Each registered head, on a batch of real cached features: a context batch decodes
    and trains (finite loss), and the same tweets with empty contexts decode exactly as
    the plain batch."""
    from mner.cache.reader import FeatureCache
    from mner.train.data import VisualStore
    from mner.train.heads.base import HEADS, get_head
    from mner.train.runs import build_model

    get_head("bert_crf")
    tweets = read_conll(sample_dir / "train.txt")[:6]
    words, ids = [t.tokens for t in tweets], [t.image_id for t in tweets]
    labels = [t.labels for t in tweets]
    enc0, tok = encoders.build_tiny(words + [["a", "club", "sign", "in", "the", "city"]], seed=0)
    cache = FeatureCache(tiny_cache)
    tags = TagSet("bio2")
    for name, cls in sorted(HEADS.items()):
        cfg = make_train_config({"model": name, "profile": "tiny"}, ["context=[]", "cross_view=false"])
        needs = tuple(cls.required_features(cfg.head_config()))
        dims = {n: cache.dims(n) for n in needs} | ({"clip_text/sentence": cache.dims("clip_text/sentence")}
                                                   if cls.needs_text_teacher else {})
        visual = VisualStore(cache, needs, ids) if needs else None

        def batch(contexts, _visual=visual):
            ds = NerDataset(words, ids, tok, 64, tags, labels, _visual, contexts=contexts, context_max_length=16)
            return ds.collate(list(range(len(ds))))

        model = build_model(cfg, 1, copy.deepcopy(enc0), tags, dims).eval()
        plain, empty = batch(None), batch([""] * len(words))
        ctx = batch(["a club sign in the city"] * len(words))
        assert model.decode(empty)[0] == model.decode(plain)[0], name
        paths, _ = model.decode(ctx)
        assert [len(p) for p in paths] == [len(w) for w in words], name
        model.train()
        loss, _ = model.loss(ctx)
        assert torch.isfinite(loss), name
