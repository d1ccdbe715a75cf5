"""Offline tokenizers in FLUX.1-dev's formats, byte-identical on every run and machine.

No model hub is reachable, and a trained tokenizer differs from run to run, so both are built from
fixed data: the CLIP one from the BPE merges that open_clip ships (the real 49,408-token vocabulary,
same ids as the real FLUX.1-dev `tokenizer/`), the T5 one from a small `(piece, score)` list
written out below.
"""

from __future__ import annotations

import gzip
import string
from functools import cache
from pathlib import Path

from open_clip.tokenizer import bytes_to_unicode, default_bpe
from transformers import CLIPTokenizer, T5Tokenizer

CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = 512
CLIP_MERGE_COUNT = 49152 - 256 - 2
"""open_clip keeps merges[1 : 49152 − 256 − 2 + 1]: line 0 of the file is a version header."""

T5_SPECIALS = ("<pad>", "</s>", "<unk>")
"""Ids 0, 1, 2, the order T5 (and `T5Tokenizer`'s `unk_id=2`) expects."""
T5_WORDS = """
a an the of in on at to for with by from and or but not no as is are was were be been being it
its this that these those there here his her their our your my he she they we you i me him them
one two three four five six seven eight nine ten first last many few some all every each other
more most very much little big small large tiny huge tall short long wide high low old new young
good bad best beautiful pretty cute ugly happy sad angry calm quiet loud bright dark light heavy
soft hard warm cold hot wet dry clean dirty fresh rich poor simple strange famous ancient modern
red green blue yellow orange purple pink brown black white gray grey gold golden silver colorful
man woman boy girl child children person people baby family friend king queen knight wizard
warrior soldier robot alien monster dragon angel god goddess princess prince astronaut
cat dog bird horse fish lion tiger bear wolf fox rabbit mouse owl eagle butterfly snake cow
tree trees flower flowers grass leaf leaves forest garden park field mountain mountains hill
river lake sea ocean beach island desert snow rain cloud clouds sky sun moon star stars space
planet earth fire water ice rock stone sand wind storm light shadow night day morning evening
sunset sunrise winter summer spring autumn city town village street road bridge house home
building castle tower church temple room kitchen window door wall floor table chair bed car
train boat ship plane bike bicycle book cup glass bottle hat dress shirt coat shoes face eyes
hair hand hands head body smile portrait photo photograph picture painting drawing sketch art
artwork illustration image render style scene view landscape background foreground closeup
close up wide angle shot camera lens focus detail detailed details highly ultra realistic
photorealistic realism cinematic lighting studio natural dramatic vibrant colors color sharp
blurry bokeh depth quality masterpiece trending artstation digital oil watercolor pencil anime
cartoon comic fantasy science fiction futuristic vintage retro minimalist abstract surreal
epic intricate elegant stunning award winning professional hd resolution texture pattern
standing sitting walking running flying swimming holding looking wearing playing eating reading
riding dancing smiling sleeping made covered filled surrounded under over above below behind
front near next inside outside between through into onto around against across along toward
top bottom left right side middle center corner edge has have had do does did can could will
would should may might must make made take look see come go get give use find know think want
like love live life world time year way thing part place end line word words text sign
"""
"""A few hundred common English (and prompt) words, each a whole `▁word` piece."""
T5_SUFFIXES = ("s", "es", "ed", "ing", "er", "ers", "est", "ly", "y", "ness", "ful", "less", "ish")
"""Word endings without `▁`, so `cats` becomes `▁cat` + `s` rather than single letters."""
T5_CHARACTERS = string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation
"""Single characters: any ASCII text tokenises without `<unk>`."""
T5_SCORES = {"special": 0.0, "space": -2.0, "word": -6.0, "suffix": -7.0, "character": -10.0}
"""Log-probabilities by kind: a whole word beats its pieces, a piece beats single letters."""


@cache
def clip_vocab_and_merges() -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """CLIP's token list (index = id) and merges, built exactly as open_clip's SimpleTokenizer."""
    lines = gzip.decompress(Path(default_bpe()).read_bytes()).decode("utf-8").split("\n")
    merges = tuple(tuple(line.split()) for line in lines[1 : CLIP_MERGE_COUNT + 1])
    characters = list(bytes_to_unicode().values())
    vocab = [
        *characters,
        *(character + "</w>" for character in characters),
        *("".join(merge) for merge in merges),
        "<|startoftext|>",
        "<|endoftext|>",
    ]
    return tuple(vocab), merges


def build_clip_tokenizer() -> CLIPTokenizer:
    """FLUX.1-dev's CLIP tokenizer: the real vocabulary, 77 tokens, padded with `<|endoftext|>`.

    transformers 5 ignores `vocab_file=`/`merges_file=` in the constructor (it silently builds a
    2-token tokenizer), so the vocabulary and merges are handed over in memory.
    """
    vocab, merges = clip_vocab_and_merges()
    return CLIPTokenizer(
        vocab={token: index for index, token in enumerate(vocab)},
        merges=list(merges),
        model_max_length=CLIP_MAX_LENGTH,
        pad_token="<|endoftext|>",
    )


def t5_pieces() -> list[tuple[str, float]]:
    """The fixed Unigram vocabulary: specials, `▁`, whole words, suffixes, single characters."""
    words = dict.fromkeys(T5_WORDS.split())
    return [
        *((special, T5_SCORES["special"]) for special in T5_SPECIALS),
        ("▁", T5_SCORES["space"]),
        *((f"▁{word}", T5_SCORES["word"]) for word in words),
        *((suffix, T5_SCORES["suffix"]) for suffix in T5_SUFFIXES if len(suffix) > 1),
        *((character, T5_SCORES["character"]) for character in T5_CHARACTERS),
    ]


def build_t5_tokenizer() -> T5Tokenizer:
    """A small T5-style tokenizer (Unigram, Metaspace, `</s>` appended, 512 tokens, no sentinels).

    `T5Tokenizer` (which `T5TokenizerFast` aliases in transformers 5) builds exactly T5's pipeline
    from a `(piece, score)` list, and rebuilds the same pipeline when loaded back, so nothing is
    changed on the backend afterwards.
    """
    return T5Tokenizer(vocab=t5_pieces(), extra_ids=0, model_max_length=T5_MAX_LENGTH)
