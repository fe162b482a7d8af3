"""A small Ouro-format tokenizer: byte-level BPE trained on the synthetic corpus.

Ouro's tokenizer is a GPT-2-style byte-level BPE with a ChatML chat template; this module builds a
miniature of it with the Hugging Face ``tokenizers`` trainer, for the tiny checkpoints the project
trains itself. What it keeps from Ouro, and what it chooses:

* Special tokens at ids 0..4, exactly Ouro's: ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``,
  ``<think>``, ``</think>``. bos, eos and pad are all ``<|endoftext|>`` (as in Ouro-1.4B's config);
  nothing is added around encoded text.
* Pre-tokenization: digits are split one per pre-token, then GPT-2's byte-level regex. Every digit
  is therefore always its own token (as in the StarCoder/SmolLM tokenizer family), which the depth
  task (``convert.synthetic``) relies on: an answer is exactly one token, and the same token
  wherever the digit occurs. Byte-level decoding makes ``decode(encode(text)) == text``.
* Chat template: ChatML, ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message, and
  ``<|im_start|>assistant\\n`` when ``add_generation_prompt`` is set. It is saved inside
  ``tokenizer_config.json`` (as Ouro's checkpoints ship it), not as a separate ``.jinja`` file.
* Training text: records' ``text``, and for chats each message as ``role\\ncontent`` (the template's
  special tokens never reach the trainer, which would otherwise learn merges of their pieces).

The BPE trainer is deterministic, so the same corpus and vocabulary size give the same files.

Command line::

    python -m convert.tokenizer --corpus convert/assets/tiny_corpus.jsonl \\
        --out convert/assets/tokenizer --vocab-size 512
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from .atomic import staged_directory

# Ouro's special tokens, in id order (ids 0..4).
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
ENDOFTEXT = SPECIAL_TOKENS[0]
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
DEFAULT_VOCAB_SIZE = 512
# The smallest vocabulary that holds the special tokens and all 256 byte symbols (no merges).
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + len(pre_tokenizers.ByteLevel.alphabet())


def training_texts(records: Iterable[Mapping[str, Any]]) -> Iterator[str]:
    """The strings the BPE trainer sees for corpus records (``text`` or chat ``messages``)."""
    for index, record in enumerate(records):
        if record.get("text") is not None:
            yield record["text"]
        elif record.get("messages") is not None:
            for message in record["messages"]:
                yield f"{message['role']}\n{message['content']}"
        else:
            raise ValueError(f"record {index} has neither 'text' nor 'messages' (fields: {sorted(record)})")


def build_tokenizer(
    texts: Iterable[str],
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    out_dir: str | os.PathLike[str] | None = None,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer with Ouro's special tokens and ChatML template on ``texts``.

    Args:
        texts: training strings (see ``training_texts`` for corpus records).
        vocab_size: total vocabulary, special tokens and the 256 byte symbols included.
        out_dir: when given, the tokenizer is saved there with ``save_pretrained``, atomically
            (an existing directory is replaced), and loads back with ``AutoTokenizer.from_pretrained``.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: the {len(SPECIAL_TOKENS)} special tokens and 256 byte "
            f"symbols alone need {MIN_VOCAB_SIZE}"
        )
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),  # the trainer gives them ids 0..4 in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=ENDOFTEXT,
        eos_token=ENDOFTEXT,
        pad_token=ENDOFTEXT,
        chat_template=CHATML_TEMPLATE,
    )
    if out_dir is not None:
        with staged_directory(Path(out_dir)) as staging:
            tokenizer.save_pretrained(staging, save_jinja_files=False)
    return tokenizer


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as file:
        return [json.loads(line) for line in file if line.strip()]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the byte-level BPE tokenizer on a JSON-lines corpus.")
    parser.add_argument("--corpus", required=True, type=Path, help="JSON lines of text or messages records")
    parser.add_argument("--out", required=True, type=Path, help="output directory (replaced if it exists)")
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE, help="total vocabulary size")
    args = parser.parse_args(argv)
    tokenizer = build_tokenizer(training_texts(_read_jsonl(args.corpus)), args.vocab_size, args.out)
    print(f"wrote a {len(tokenizer)}-token tokenizer to {args.out}")


if __name__ == "__main__":
    main()
