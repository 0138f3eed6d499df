"""The toy's word-level tokenizer (built with `tokenizers`) and its LLaVA-1.5-style chat template.

The vocabulary is every word and punctuation mark of the training texts, sorted, after five special
tokens: `<unk>`, `<s>`, `</s>`, `<pad>`, `<image>`. Encoding prepends `<s>`; decoding joins words with
spaces and glues punctuation back to the previous word.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

UNK, BOS, EOS, PAD, IMAGE = "<unk>", "<s>", "</s>", "<pad>", "<image>"
SPECIAL_TOKENS = (UNK, BOS, EOS, PAD, IMAGE)

# LLaVA-1.5 layout: "[system ]USER: <image>\n{question} ASSISTANT: {answer}</s>USER: ... ASSISTANT:".
# Message content is a string or a list of {"type": "image"} / {"type": "text", "text": ...} items.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}"
    "{%- set body = message['content'] -%}"
    "{%- else -%}"
    "{%- set body = namespace(text='') -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{%- set body.text = body.text + '<image>\n' -%}"
    "{%- elif item['type'] == 'text' -%}{%- set body.text = body.text + item['text'] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set body = body.text -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'system' -%}{{ body + ' ' }}"
    "{%- elif message['role'] == 'user' -%}{{ 'USER: ' + body + ' ' }}"
    "{%- else -%}{{ 'ASSISTANT: ' + body + eos_token }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    # words (\w+) and single punctuation marks; whitespace separates and is dropped
    return pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated")])


def word_vocabulary(texts: Iterable[str]) -> list[str]:
    """The sorted set of pre-tokenized pieces (words, punctuation) in `texts`."""
    pre = _pre_tokenizer()
    pieces: set[str] = set()
    for text in texts:
        for chunk in text.split(IMAGE):
            pieces.update(piece for piece, _ in pre.pre_tokenize_str(chunk))
    pieces.difference_update(SPECIAL_TOKENS)
    return sorted(pieces)


def build_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose vocabulary covers every word of `texts`."""
    vocab = {token: index for index, token in enumerate((*SPECIAL_TOKENS, *word_vocabulary(texts)))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = _pre_tokenizer()
    # WordPiece's cleanup glues "dog ." back to "dog."; no word carries its "##" prefix
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        extra_special_tokens={"image_token": IMAGE},
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
        model_max_length=512,
    )
    return tokenizer
