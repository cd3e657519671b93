"""A byte-level BPE tokenizer trained locally on the toy data.

Design:

* Pre-tokenisation splits the text with :data:`SPLIT_PATTERN` — a single digit
  with an optional leading space, a run of ASCII letters with an optional
  leading space, a run of other non-space symbols with an optional leading
  space, or a run of whitespace — then maps bytes to printable characters
  (GPT-2 style byte level, no prefix space). BPE merges never cross these
  pieces, so every digit is its own token (``" 5"`` → ``Ġ5``) and the split
  between ``...A:`` and ``" 1 3"`` is a piece boundary: tokenising prompt and
  response separately equals tokenising their concatenation.
* The full 256-byte alphabet is in the vocabulary, so any string encodes and
  ``decode(encode(x), skip_special_tokens=True) == x`` exactly.
* The byte-level decoder turns any prefix of a token list back into text
  (what vLLM's incremental detokeniser needs); the data is ASCII so no
  multi-byte character is ever split.
* Special tokens: ``<pad>`` (0), ``<s>`` (1, BOS), ``</s>`` (2, EOS). A
  template post-processor prepends BOS to every sequence, so Hugging Face and
  vLLM tokenise prompts identically; EOS is never added automatically.
"""

from __future__ import annotations

from collections.abc import Iterable

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
SPLIT_PATTERN = r" ?[0-9]| ?[A-Za-z]+| ?[^\sA-Za-z0-9]+|\s+"
MODEL_MAX_LENGTH = 128


def train_tokenizer(texts: Iterable[str], vocab_size: int = 384):
    """Train the BPE and return it as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B:1", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=MODEL_MAX_LENGTH,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
