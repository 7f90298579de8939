"""Tokenizers: the shared interface, CLIP BPE ids, and the optional SentencePiece / HF wrappers."""

from __future__ import annotations

import importlib.util
import pickle
from pathlib import Path

import pytest
import torch

from vlmoe.data.tokenizers import ClipBPETokenizer, HFTokenizer, SentencePieceTokenizer, build_tokenizer


def test_clip_special_ids_and_vocab(tokenizer: ClipBPETokenizer) -> None:
    assert (tokenizer.bos_id, tokenizer.eos_id) == (49406, 49407)
    assert (tokenizer.pad_id, tokenizer.mask_id, tokenizer.vocab_size) == (49408, 49409, 49410)
    assert tokenizer.special_ids == {49406, 49407, 49408, 49409}


def test_clip_encode_matches_open_clip(tokenizer: ClipBPETokenizer) -> None:
    import open_clip

    text = "A photo of two red circles, and a BLUE triangle!"
    ref = open_clip.tokenize([text])[0]  # [sot] ids [eot] 0-padded to 77
    n = int((ref != 0).sum())
    assert [tokenizer.bos_id, *tokenizer.encode(text), tokenizer.eos_id] == ref[:n].tolist()


def test_call_segments_pads_and_truncates(tokenizer: ClipBPETokenizer) -> None:
    texts = ["a red circle", "", "word " * 100]
    ids, pad = tokenizer(texts, max_len=16)
    assert ids.shape == pad.shape == (3, 16) and ids.dtype == torch.long and pad.dtype == torch.bool
    n0 = len(tokenizer.encode("a red circle"))
    assert ids[0, 0] == tokenizer.bos_id and ids[0, n0 + 1] == tokenizer.eos_id
    assert pad[0].tolist() == [False] * (n0 + 2) + [True] * (16 - n0 - 2)
    assert ids[1, :2].tolist() == [tokenizer.bos_id, tokenizer.eos_id] and pad[1, 2:].all()
    assert not pad[2].any() and ids[2, -1] == tokenizer.eos_id  # truncated to max_len - 2 tokens
    assert torch.equal(pad, ids == tokenizer.pad_id)


def test_decode_round_trip(tokenizer: ClipBPETokenizer) -> None:
    text = "is there a green triangle in the image?"
    ids, _ = tokenizer(text, max_len=32)
    assert tokenizer.decode(ids[0]) == "is there a green triangle in the image ?"
    with pytest.raises(ValueError, match="max_len"):
        tokenizer("x", max_len=1)


def test_pickles_for_dataloader_workers(tokenizer: ClipBPETokenizer) -> None:
    clone = pickle.loads(pickle.dumps(tokenizer))
    assert clone.encode("blue square") == tokenizer.encode("blue square")


def test_build_tokenizer_dispatch(tmp_path: Path, tokenizer: ClipBPETokenizer) -> None:
    assert build_tokenizer(tokenizer) is tokenizer
    assert isinstance(build_tokenizer("clip"), ClipBPETokenizer)
    with pytest.raises(ValueError, match="unknown tokenizer"):
        build_tokenizer("gpt5")


needs_sp = pytest.mark.skipif(
    importlib.util.find_spec("sentencepiece") is None,
    reason="sentencepiece is optional (pip install sentencepiece)",
)
needs_hf = pytest.mark.skipif(
    importlib.util.find_spec("tokenizers") is None, reason="tokenizers is optional (pip install tokenizers)"
)


@needs_sp
def test_sentencepiece_fairseq_ids(tmp_path: Path) -> None:
    import sentencepiece as spm

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(
        "\n".join(
            f"the {c} {s} is in the image"
            for c in ("red", "blue", "green", "gray")
            for s in ("circle", "triangle", "rectangle")
        )
        * 5
    )
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(tmp_path / "m"),
        vocab_size=20,
        model_type="unigram",
        bos_id=1,
        eos_id=2,
        unk_id=0,
        pad_id=-1,
    )
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "m.model"))
    tok = build_tokenizer(tmp_path / "m.model")
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.bos_id, tok.pad_id, tok.eos_id) == (0, 1, 2)
    assert tok.mask_id == sp.get_piece_size() + 1 and tok.vocab_size == sp.get_piece_size() + 2
    text = "the blue circle"
    assert tok.encode(text) == [i + 1 for i in sp.encode(text)]
    ids, pad = tok([text], max_len=32)
    assert ids[0, 0] == 0 and tok.decode(ids[0]) == text
    assert pickle.loads(pickle.dumps(tok)).encode(text) == tok.encode(text)
    assert max(tok.encode("zzz qqq")) < tok.vocab_size


@needs_hf
def test_hf_tokenizer_json(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "[CLS]": 1, "[SEP]": 2, "[PAD]": 3, "the": 4, "red": 5, "circle": 6}
    hf = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = build_tokenizer(tmp_path / "tokenizer.json")
    assert isinstance(tok, HFTokenizer)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3)
    assert tok.mask_id == 7 and tok.vocab_size == 8  # no [MASK] in the file: appended
    assert tok.encode("the red circle") == [4, 5, 6]
    ids, pad = tok(["the red circle"], max_len=6)
    assert ids[0].tolist() == [1, 4, 5, 6, 2, 3] and pad[0].tolist() == [False] * 5 + [True]
    assert tok.decode(ids[0]) == "the red circle"
