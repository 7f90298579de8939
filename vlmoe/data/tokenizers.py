"""Text tokenizers with one interface and explicit special ids.

Every tokenizer here exposes:

- ``encode(text) -> list[int]``: the ids of the text alone, without special tokens;
- ``__call__(texts, max_len) -> (ids, padding_mask)``: the BEiT-3 text segment of each text,
  ``[bos] + ids[: max_len - 2] + [eos]``, right-padded with ``pad_id`` to ``max_len``;
  ``ids`` is a ``(B, max_len)`` LongTensor and ``padding_mask`` a ``(B, max_len)`` BoolTensor that is
  True at padding (BEiT-3's convention);
- ``vocab_size`` (what model configs read: every id is below it), ``bos_id``, ``eos_id``,
  ``pad_id``, ``mask_id`` and ``special_ids``.

Implementations:

- :class:`ClipBPETokenizer` (the default, ``"clip"``): open_clip's byte-level BPE, whose vocabulary
  ships with ``open_clip_torch`` and works offline. Its 49,408 tokens end with ``<start_of_text>``
  (49406, bos) and ``<end_of_text>`` (49407, eos); it has no padding or mask token, so vlmoe appends
  two ids: ``pad_id = 49408`` and ``mask_id = 49409``, and ``vocab_size = 49410``.
- :class:`SentencePieceTokenizer`: a SentencePiece model file, e.g. BEiT-3's ``beit3.spm``. With
  ``fairseq_ids=True`` (default) ids follow XLM-R / fairseq as BEiT-3's released checkpoints expect:
  ``<s>=0, <pad>=1, </s>=2, <unk>=3``, piece ``i`` -> ``i + 1``, ``<mask>`` = pieces + 1.
  Needs ``pip install sentencepiece``.
- :class:`HFTokenizer`: a Hugging Face ``tokenizer.json`` file. Needs ``pip install tokenizers``.

:func:`build_tokenizer` picks one from a name or a path.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "ClipBPETokenizer",
    "HFTokenizer",
    "SentencePieceTokenizer",
    "Tokenizer",
    "build_tokenizer",
]


class Tokenizer(abc.ABC):
    """Base class: subclasses set the special ids and ``vocab_size`` and implement
    :meth:`encode` / :meth:`decode`."""

    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int
    mask_id: int

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` without special tokens."""

    @abc.abstractmethod
    def _decode_regular(self, ids: list[int]) -> str:
        """Text of ids that contain no special ids."""

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids that MLM never masks and decoding drops."""
        return frozenset({self.bos_id, self.eos_id, self.pad_id, self.mask_id})

    def decode(self, ids: Iterable[int] | Tensor) -> str:
        """Text of ``ids`` with special ids dropped."""
        if isinstance(ids, Tensor):
            ids = ids.tolist()
        special = self.special_ids
        return self._decode_regular([int(i) for i in ids if int(i) not in special])

    def segment(self, text: str, max_len: int) -> list[int]:
        """``[bos] + encode(text)[: max_len - 2] + [eos]`` (unpadded).

        Args:
            text: the text.
            max_len: the longest segment wanted, special tokens included (>= 2).
        """
        if max_len < 2:
            raise ValueError(f"max_len must be >= 2 to hold bos and eos, got {max_len}")
        return [self.bos_id, *self.encode(text)[: max_len - 2], self.eos_id]

    def __call__(self, texts: str | Sequence[str], max_len: int = 64) -> tuple[Tensor, Tensor]:
        """Tokenize, add bos/eos, truncate and right-pad to ``max_len``.

        Args:
            texts: one text or a batch of texts.
            max_len: the sequence length L of the output.

        Returns:
            ``(ids, padding_mask)``, both ``(B, L)``; ``padding_mask`` is True at padding.
        """
        if isinstance(texts, str):
            texts = [texts]
        ids = torch.full((len(texts), max_len), self.pad_id, dtype=torch.long)
        for row, text in enumerate(texts):
            seg = self.segment(text, max_len)
            ids[row, : len(seg)] = torch.tensor(seg, dtype=torch.long)
        return ids, ids == self.pad_id

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(vocab_size={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id}, "
            f"pad={self.pad_id}, mask={self.mask_id})"
        )


class ClipBPETokenizer(Tokenizer):
    """open_clip's BPE tokenizer (CLIP's vocabulary) with appended ``<pad>`` and ``<mask>`` ids.

    Args:
        bpe_path: the merges file; default: the one shipped inside ``open_clip_torch``.
    """

    def __init__(self, bpe_path: str | os.PathLike | None = None):
        from open_clip.tokenizer import SimpleTokenizer, default_bpe

        self._tok = SimpleTokenizer(bpe_path=str(bpe_path) if bpe_path else default_bpe())
        base = len(self._tok.encoder)
        self.bos_id = self._tok.sot_token_id
        self.eos_id = self._tok.eot_token_id
        # CLIP pads with id 0 (the "!" token) and has no mask token: give both their own ids.
        self.pad_id = base
        self.mask_id = base + 1
        self.vocab_size = base + 2

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text)

    def _decode_regular(self, ids: list[int]) -> str:
        return self._tok.decode(ids).strip()


def _missing_dep(package: str, what: str) -> ImportError:
    return ImportError(
        f"{what} needs the `{package}` package, which vlmoe does not install by default: pip install {package}"
    )


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model (e.g. BEiT-3's ``beit3.spm``, XLM-R's ``sentencepiece.bpe.model``).

    Args:
        model_path: the ``.spm`` / ``.model`` file.
        fairseq_ids: map ids as XLM-R / fairseq do (what BEiT-3 checkpoints were trained with):
            ``<s>=0, <pad>=1, </s>=2, <unk>=3``, piece ``i`` (i >= 1) -> ``i + 1``, ``<mask>`` = number
            of pieces + 1, ``vocab_size`` = pieces + 2. Otherwise use the model's own ids, appending
            ``<pad>`` / ``<mask>`` ids if the model has none.
    """

    def __init__(self, model_path: str | os.PathLike, fairseq_ids: bool = True):
        self.model_path = str(model_path)
        if not Path(self.model_path).is_file():
            raise FileNotFoundError(f"SentencePiece model not found: {self.model_path}")
        self.fairseq_ids = fairseq_ids
        sp = self._load()
        n = sp.get_piece_size()
        if fairseq_ids:
            self.bos_id, self.pad_id, self.eos_id, self.unk_id = 0, 1, 2, 3
            self.mask_id = n + 1
            self.vocab_size = n + 2
        else:
            self.bos_id, self.eos_id, self.unk_id = sp.bos_id(), sp.eos_id(), sp.unk_id()
            if self.bos_id < 0 or self.eos_id < 0:
                raise ValueError(f"{self.model_path}: the model defines no bos/eos pieces; use fairseq_ids=True")
            extra = n
            self.pad_id = sp.pad_id() if sp.pad_id() >= 0 else extra
            extra += sp.pad_id() < 0
            mask_piece = sp.piece_to_id("<mask>")
            self.mask_id = mask_piece if mask_piece != self.unk_id else extra
            extra += mask_piece == self.unk_id
            self.vocab_size = extra

    def _load(self) -> Any:
        try:
            import sentencepiece
        except ImportError:
            raise _missing_dep("sentencepiece", "SentencePieceTokenizer") from None
        self._sp = sentencepiece.SentencePieceProcessor(model_file=self.model_path)
        return self._sp

    # The C++ processor does not pickle everywhere; DataLoader workers reload it from the path.
    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_sp"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._load()

    def encode(self, text: str) -> list[int]:
        ids = self._sp.encode(text, out_type=int)
        if not self.fairseq_ids:
            return ids
        # spm's <unk> is piece 0 and maps to fairseq's <unk> (3); every other piece shifts by one.
        return [i + 1 if i else self.unk_id for i in ids]

    def _decode_regular(self, ids: list[int]) -> str:
        if self.fairseq_ids:
            ids = [i - 1 if i != self.unk_id else 0 for i in ids]
        n = self._sp.get_piece_size()
        return self._sp.decode([i for i in ids if 0 <= i < n])


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizers`` JSON file.

    Special tokens are looked up by name (``<s>``/``[CLS]``/``<|startoftext|>`` for bos, ``</s>``/
    ``[SEP]``/``<|endoftext|>`` for eos, ``<pad>``/``[PAD]``, ``<mask>``/``[MASK]``) unless given;
    a missing pad or mask token gets an id appended after the vocabulary.

    Args:
        path: the ``tokenizer.json`` file.
        bos_token, eos_token, pad_token, mask_token: explicit special token strings.
    """

    _CANDIDATES = {
        "bos": ("<s>", "[CLS]", "<|startoftext|>", "<bos>", "<start_of_text>"),
        "eos": ("</s>", "[SEP]", "<|endoftext|>", "<eos>", "<end_of_text>"),
        "pad": ("<pad>", "[PAD]", "<|pad|>"),
        "mask": ("<mask>", "[MASK]", "<|mask|>"),
    }

    def __init__(
        self,
        path: str | os.PathLike,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        mask_token: str | None = None,
    ):
        try:
            from tokenizers import Tokenizer as _HFTok
        except ImportError:
            raise _missing_dep("tokenizers", "HFTokenizer") from None
        self.path = str(path)
        if not Path(self.path).is_file():
            raise FileNotFoundError(f"tokenizer file not found: {self.path}")
        self._tok = _HFTok.from_file(self.path)
        # Plain sequences: vlmoe adds bos/eos itself.
        self._tok.no_padding()
        self._tok.no_truncation()
        size = self._tok.get_vocab_size(with_added_tokens=True)
        given = {"bos": bos_token, "eos": eos_token, "pad": pad_token, "mask": mask_token}
        found: dict[str, int | None] = {}
        for role, token in given.items():
            names = (token,) if token else self._CANDIDATES[role]
            ids = [self._tok.token_to_id(t) for t in names]
            found[role] = next((i for i in ids if i is not None), None)
            if token and found[role] is None:
                raise ValueError(f"{self.path}: token {token!r} given for {role} is not in the vocabulary")
        missing = [r for r in ("bos", "eos") if found[r] is None]
        if missing:
            raise ValueError(
                f"{self.path}: no {'/'.join(missing)} token found among "
                f"{[self._CANDIDATES[r] for r in missing]}; pass bos_token=/eos_token="
            )
        self.bos_id, self.eos_id = int(found["bos"]), int(found["eos"])  # type: ignore[arg-type]
        extra = size
        if found["pad"] is None:
            found["pad"], extra = extra, extra + 1
        if found["mask"] is None:
            found["mask"], extra = extra, extra + 1
        self.pad_id, self.mask_id = int(found["pad"]), int(found["mask"])  # type: ignore[arg-type]
        self.vocab_size = extra

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def _decode_regular(self, ids: list[int]) -> str:
        size = self._tok.get_vocab_size(with_added_tokens=True)
        return self._tok.decode([i for i in ids if i < size])


def build_tokenizer(spec: str | os.PathLike | Tokenizer = "clip", **kwargs: Any) -> Tokenizer:
    """Make a tokenizer from a name or a file.

    Args:
        spec: ``"clip"`` (open_clip's BPE, the default), a SentencePiece model (``.spm`` / ``.model``),
            a Hugging Face ``tokenizer.json``, or a :class:`Tokenizer` (returned as is).
        **kwargs: passed to the tokenizer class.
    """
    if isinstance(spec, Tokenizer):
        return spec
    name = str(spec)
    if name.lower() in ("clip", "openclip", "open_clip", "bpe"):
        return ClipBPETokenizer(**kwargs)
    path = Path(name).expanduser()
    if name.endswith(".json"):
        return HFTokenizer(path, **kwargs)
    if path.suffix in (".spm", ".model"):
        return SentencePieceTokenizer(path, **kwargs)
    raise ValueError(
        f"unknown tokenizer {name!r}: use 'clip', a SentencePiece .spm/.model file "
        "or a Hugging Face tokenizer .json file"
    )
