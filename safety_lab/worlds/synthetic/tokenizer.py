"""A word-level Hugging Face tokenizer for a synthetic world: one token per space-separated symbol.

It is a real `PreTrainedTokenizerFast` (built with `tokenizers`), saved and loaded like any hub tokenizer, so the
synthetic world runs through exactly the code path of real models.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from safety_lab.worlds.synthetic.world import BOS, EOS, PAD, UNK, World


def build_tokenizer(world: World) -> PreTrainedTokenizerFast:
    vocab = {token: i for i, token in enumerate(world.vocabulary)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, vocab[BOS])])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK, padding_side="left"
    )
