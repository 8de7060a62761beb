"""A `Tokenizer` from the vocabulary in a GGUF file's metadata, tokenizing as llama.cpp does.

GGUF files carry their tokenizer as metadata (`tokenizer.ggml.*`): the token strings, their
types and scores, BPE merges, the special-token ids and the name of the pre-tokenizer.
`tokenizer_from_gguf_metadata` rebuilds the same tokenizer on Hugging Face `tokenizers`, one
pipeline per llama.cpp vocabulary type (`tokenizer_to_gguf_metadata`, at the end, goes the
other way for our BPE tokenizers):

* ``llama`` (SentencePiece BPE): "▁" for spaces and in front of the text, merges ranked by
  the merged piece's score (llama.cpp merges the highest-scoring adjacent pair), byte
  fallback to ``<0xXX>`` pieces;
* ``gpt2`` (BPE): the pre-tokenizer that ``tokenizer.ggml.pre`` names, any of the ones
  llama.cpp knows (PRE_TOKENIZERS): its regexes, applied one after another as llama.cpp
  runs them, then the GPT-2 byte-to-unicode map and the ranked merges. Four of them
  (gemma4, granite-embed-multi-311m, sarvam-moe, whitespace) merge raw UTF-8 instead, with
  ``<0xXX>`` byte tokens for characters that are no token, the first three after writing
  spaces as "▁". A ``gemma4`` vocabulary is such a BPE with the gemma4 pre-tokenizer
  whatever ``tokenizer.ggml.pre`` says, and no default special tokens;
* ``bert`` (WordPiece): llama.cpp's WPM pre-processing (NFD and accent stripping,
  lowercasing, punctuation and CJK characters as words of their own) and greedy
  longest-match over the vocabulary, in which llama.cpp's converter marks word starts with
  "▁" instead of marking continuations with "##".

Token ids are the GGUF ids, and `id_to_piece` returns the GGUF token strings. Control and
unknown tokens (types 3 and 2) become special added tokens: `encode` matches their text as
whole tokens (llama.cpp's ``parse_special=true``, unless ``parse_special=False``) and
`decode` leaves them out. User-defined tokens (type 4) are always matched as whole tokens,
as llama.cpp does.

`decode` gives llama.cpp's detokenized text with two choices of its own: control tokens
are skipped unless ``skip_special_tokens=False``, and BPE text is not passed through
llama.cpp's ``clean_spaces`` (which turns "you ?" into "you?"), so that decoding the ids of
a text gives the text back. (llama.cpp would also pass the raw UTF-8 tokens of a
"whitespace" vocabulary through the GPT-2 byte map, garbling them; emergence decodes them
as what they are.) WordPiece decoding keeps llama.cpp's clean-up: its lowercased,
re-spaced text cannot be an exact inverse anyway.

The metadata is a plain mapping from GGUF keys to Python values; numeric arrays may also
be numpy arrays. Nothing here reads files.
"""

from __future__ import annotations

import json
import operator
import re
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

from ..errors import CheckpointError, InvalidArgument
from .format import GGUFValue, GGUFValueType
from ..tokenizer import SPIECE_SPACE, Tokenizer

__all__ = ["tokenizer_from_gguf_metadata", "PRE_TOKENIZERS"]

# llama_token_type values stored in tokenizer.ggml.token_type.
TOKEN_NORMAL = 1
TOKEN_UNKNOWN = 2
TOKEN_CONTROL = 3
TOKEN_USER_DEFINED = 4
TOKEN_UNUSED = 5
TOKEN_BYTE = 6

_KEY = "tokenizer.ggml."

# -- llama.cpp's BPE pre-tokenizers (llm_tokenizer_bpe in src/llama-vocab.cpp) ---------------
#
# Before merging, llama.cpp cuts the text into pieces with a list of regexes, one after the
# other: each regex splits every piece the previous ones left, its matches and the stretches
# between them all becoming pieces (tokenizers' Split with behavior="isolated"). Which list
# runs is chosen by tokenizer.ggml.pre (PRE_TOKENIZERS below). The lists here are llama.cpp's
# own strings (tests/test_pretokenizers.py compares them with its source); `_as_onig` turns
# each into the Oniguruma regex (the engine of `tokenizers`) that splits exactly as llama.cpp
# does, which is not always what the string says (unicode_regex_split in src/unicode.cpp):
#
# * A regex with a category (\p{L}, ...) runs with std::regex on a "collapsed" copy of the
#   text in which every non-ASCII character is one byte for its category. So \p{Lu}, \p{Ll},
#   \p{Lt}, \p{Lm} and \p{Lo} all mean "any letter", and the categories are those of
#   llama.cpp's own tables, which are Unicode 15.1: to it the characters Unicode 16.0 added
#   are in no category (_UNICODE_16_ADDITIONS).
# * Any other regex runs with std::wregex on the code points, after llama.cpp has replaced
#   each non-ASCII White_Space character by U+000B: such a character then matches \s but no
#   character or range listed in a bracket expression (_UNICODE_SPACES).
# * In both, \s is Unicode White_Space (as in Oniguruma), \d is ASCII 0-9 and $ (without
#   multiline) is the end of the piece.
# * Three strings are not run as regexes: llama.cpp recognises them and runs hand-written
#   code instead (_HAND_CODED gives regexes that split as that code does). The code it has
#   for the GPT-2, Llama 3, Qwen2, Qwen3.5 and newline regexes splits as those regexes do.

_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


def _cased_words(letter: str, contraction: str) -> str:
    """GPT-4o's and Tekken's words: a run of capitals then small letters, or capitals alone.

    In llama.cpp \\p{Lu} and \\p{Ll} both mean "a letter", so these regexes write "a capital" as a
    `letter` that is not a-z and "a small letter" as one that is not A-Z: the letters of other
    scripts count as both.
    """
    capital, small = rf"((?=[{letter}])([^a-z]))", rf"((?=[{letter}])([^A-Z]))"
    lead = r"[^\r\n\p{L}\p{N}]?"
    return f"{lead}{capital}*{small}+{contraction}|{lead}{capital}+{small}*{contraction}"


_GPT4O_TAIL = r"| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_DEEPSEEK_CJK = r"[一-龥ࠀ-一가-\x{D7FF}]+"
_KANA_CJK = r"[一-龥\x{3040}-ゟ゠-ヿ]+"
_DEEPSEEK3_WORDS = (
    r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"""
    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PORO = r" ?[^(\s|.,!?…。，、।۔،)]+"  # "(", "|" and ")" are in the class: llama.cpp's quirk
_NEWLINE_RUNS = r"[^\n]+|[\n]+"

# Regex lists by llama.cpp's LLAMA_VOCAB_PRE_TYPE_* (lower case); one list serves every type
# whose list is the same string.
_REGEXES: dict[str, tuple[str, ...]] = {
    "default": (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"),
    "gpt2": (_GPT2,),
    "falcon": (r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]"),
    "starcoder": (r"\p{N}", _GPT2),
    "chameleon": (
        r"<sentinel:[0-9]+>",
        r"(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z",
        r"([\t\n]|    |  )",
        r"\p{N}",
        r"[\p{P}!-/:-@\[-`{-~]",
        _GPT2,
    ),
    "llama3": (_LLAMA3,),  # also dbrx, smaug and chatglm4: the same string
    "jais2": (
        _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
        r"|\s{512}(?!\S)|\s{256}(?!\S)|\s{128}(?!\S)|\s{64}(?!\S)|\s{32}(?!\S)|\s{16}(?!\S)|\s{8}(?!\S)"
        r"|\s{4}(?!\S)|\s{1,2}(?!\S)|\s{1}",
    ),
    "minicpm5": (
        r"\p{N}{1,3}",
        _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    ),
    "qwen2": (_QWEN2,),  # also stablelm2, hunyuan, solar-open and grok-2
    "qwen35": (
        _CONTRACTIONS
        + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    ),
    "laguna": (_NEWLINE_RUNS, _QWEN2),
    "ufakzeka": (r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",),
    "seed_coder": (
        _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+",
    ),
    "bailingmoe": (
        r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
        r"|\s*[\r\n]|\s+(?!\S)|\s+",
    ),
    "exaone_moe": (
        _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?(?:\p{L}\p{M}*(?: \p{L}\p{M}*)*)+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]?"
        r"|\s*[\r\n]|\s+(?!\S)|\s+",
    ),
    "tekken": (_cased_words(r"\p{L}", "") + r"|\p{N}" + _GPT4O_TAIL,),
    "gpt4o": (_cased_words(r"\p{L}", _CONTRACTIONS + "?") + r"|\p{N}{1,3}" + _GPT4O_TAIL,),
    # GPT-4o's, with combining marks counted as letters (so that they stay with their letter)
    "granite_emb_multi": (_cased_words(r"\p{L}\p{M}", _CONTRACTIONS + "?") + r"|\p{N}{1,3}" + _GPT4O_TAIL,),
    "tiny_aya": (
        r"\d{1,3}(?=(?:\d{3})*\b)",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+" + _CONTRACTIONS + "?"
        r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*" + _CONTRACTIONS + "?"
        r"|\p{N}{1,3}" + _GPT4O_TAIL,
    ),
    "youtu": (
        r"[가-힣ㄱ-ㆎ]+|[！…“”‘’—：；，、-〿︰-﹏]+|[ㄅ-ㄯ]+|" + _KANA_CJK,
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+" + _CONTRACTIONS + "?"
        r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*" + _CONTRACTIONS + "?"
        r"|\p{N}" + _GPT4O_TAIL,
    ),
    "kimi_k2": (r"\p{Han}+",),  # hand-coded in llama.cpp: _HAND_CODED
    "deepseek_llm": (  # \x{..}: characters that Unicode normalisation would rewrite (OHM SIGN, ...)
        r"[\r\n]",
        (
            r"\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗ"
            r"ὙὛὝὟ-\x{1F7D}ᾀ-ᾴᾶ-ᾼ\x{1FBE}ῂ-ῄῆ-ῌῐ-\x{1FD3}ῖ-\x{1FDB}ῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤ\x{2126}ℨ\x{212A}-ℭℯ-ℴℹ"
            r"ℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+"
        ),
        r"\s?[!-/:-~！-／：-～‘-‟\x{3000}-。]+",
        r"\s+$",
        _DEEPSEEK_CJK,
        r"\p{N}+",
    ),
    "deepseek_coder": (r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _DEEPSEEK_CJK, r"\p{N}"),
    "deepseek3_llm": (r"\p{N}{1,3}", _KANA_CJK, _DEEPSEEK3_WORDS),  # also hunyuan-dense, joyai-llm, hy_v4
    "spark2_5": (
        r"\p{N}{1,3}",
        _KANA_CJK,
        r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"""
        r"| ?[\p{P}\p{S}]+|[\r\n]|\s+(?!\S)|\s+",
        r"\p{N}",
    ),
    "afmoe": (
        r"\p{AFMoE_digits}",  # hand-coded in llama.cpp: _HAND_CODED
        r"[一-鿿㐀-䶿豈-\x{FAFF}\x{3040}-ゟ゠-ヿ･-ﾟ⼀-\x{2FDF}"
        r"เ-\x{E7F}\x{E80}-\x{EFF}ក-\x{17FF}က-႟ꩠ-ꩿꧠ-\x{A9FF}가-\x{D7AF}ᄀ-ᇿ]+",
        _DEEPSEEK3_WORDS,
    ),
    "superbpe": (r"\p{N}+", r"(?=(\d{3})+(?!\d))"),
    "poro": (_PORO,),  # also bloom and gpt3-finnish
    "viking": (_PORO, r"\p{N}"),
    # SentencePiece-style BPE on raw UTF-8 (byte_level=False): only newlines split the text.
    "gemma4": (_NEWLINE_RUNS,),  # also sarvam_moe
    "whitespace": (r"\S+",),
}

_HAN = (  # unicode_cpt_is_han in src/unicode.cpp: CJK ideograph blocks, not the Han script
    r"\x{4E00}-\x{9FFF}\x{3400}-\x{4DBF}\x{20000}-\x{2A6DF}\x{2A700}-\x{2B73F}\x{2B740}-\x{2B81F}"
    r"\x{2B820}-\x{2CEAF}\x{2CEB0}-\x{2EBEF}\x{F900}-\x{FAFF}\x{2F800}-\x{2FA1F}"
)
# Regexes llama.cpp recognises and replaces by code in src/unicode.cpp -> regexes that split as
# that code does.
_HAND_CODED = {
    # unicode_regex_split_custom_kimi_k2: runs of Han ideographs; words of other letters
    # (marks not included, whatever the case) with an optional lead character and contraction.
    r"\p{Han}+": (
        rf"[{_HAN}]+|[^\r\n\p{{L}}\p{{N}}]?[\p{{L}}&&[^{_HAN}]]+{_CONTRACTIONS}?|\p{{N}}{{1,3}}"
        r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    ),
    # unicode_regex_split_custom_afmoe, which also serves tiny_aya's "\d{1,3}(?=(?:\d{3})*\b)":
    # a run of numbers (\p{N}, not just 0-9) is cut into groups of three from its end, but the
    # text before the run stays glued to its first group ("ab12345" -> "ab12", "345"). Only the
    # cuts are matched: after a number, where the numbers left up to the run's end are a
    # multiple of three.
    r"\p{AFMoE_digits}": r"(?<=\p{N})(?=(?:\p{N}{3})*(?!\p{N}))",
    r"\d{1,3}(?=(?:\d{3})*\b)": r"(?<=\p{N})(?=(?:\p{N}{3})*(?!\p{N}))",
}

# The characters Unicode 16.0 added (5185 code points). llama.cpp's category tables are
# Unicode 15.1, so to it they are in no category (not \p{L}, not \p{S}, ...), while the
# Oniguruma in `tokenizers` knows them; every \p{..} leaves them out.
_UNICODE_16_ADDITIONS = (
    r"\x{897}\x{1B4E}-\x{1B4F}\x{1B7F}\x{1C89}-\x{1C8A}\x{2427}-\x{2429}\x{31E4}-\x{31E5}\x{A7CB}-\x{A7CD}"
    r"\x{A7DA}-\x{A7DC}\x{105C0}-\x{105F3}\x{10D40}-\x{10D65}\x{10D69}-\x{10D85}\x{10D8E}-\x{10D8F}"
    r"\x{10EC2}-\x{10EC4}\x{10EFC}\x{11380}-\x{11389}\x{1138B}\x{1138E}\x{11390}-\x{113B5}\x{113B7}-\x{113C0}"
    r"\x{113C2}\x{113C5}\x{113C7}-\x{113CA}\x{113CC}-\x{113D5}\x{113D7}-\x{113D8}\x{113E1}-\x{113E2}"
    r"\x{116D0}-\x{116E3}\x{11BC0}-\x{11BE1}\x{11BF0}-\x{11BF9}\x{11F5A}\x{13460}-\x{143FA}\x{16100}-\x{16139}"
    r"\x{16D40}-\x{16D79}\x{18CFF}\x{1CC00}-\x{1CCF9}\x{1CD00}-\x{1CEB3}\x{1E5D0}-\x{1E5FA}\x{1E5FF}"
    r"\x{1F8B2}-\x{1F8BB}\x{1F8C0}-\x{1F8C1}\x{1FA89}\x{1FA8F}\x{1FABE}\x{1FAC6}\x{1FADC}\x{1FADF}\x{1FAE9}"
    r"\x{1FBCB}-\x{1FBEF}"
)


# llama.cpp's category names (k_ucat_enum in src/unicode.cpp). A regex with any of them runs on
# the collapsed text; any other runs with std::wregex on the code points.
_CATEGORIES = (r"\p{N}", r"\p{L}", r"\p{P}", r"\p{M}", r"\p{S}", r"\p{Lu}", r"\p{Ll}", r"\p{Lt}", r"\p{Lm}", r"\p{Lo}")
# White_Space beyond ASCII. For std::wregex llama.cpp first replaces these characters by U+000B
# (std::wregex's \s would miss them), so they match \s but no character or range written in
# a bracket expression: "[ࠀ-一]" does not match U+3000 there.
_UNICODE_SPACES = r"\x{85}\x{A0}\x{1680}\x{2000}-\x{200A}\x{2028}\x{2029}\x{202F}\x{205F}\x{3000}"
_ESCAPE_OR_BRACKET = re.compile(r"\\.|\[(\^?)((?:\\.|[^\]\\])*)\]")


def _as_onig(regex: str) -> str:
    """One of llama.cpp's pre-tokenizer regexes -> the Oniguruma regex that splits the same way."""
    regex = _HAND_CODED.get(regex, regex)
    if any(name in regex for name in _CATEGORIES):
        # Collapsed text knows letters, not their case.
        regex = re.sub(r"\\p\{L[ultmo]\}", lambda m: r"\p{L}", regex)
        # Categories as llama.cpp's Unicode 15.1 tables have them; [..&&[^..]] is Oniguruma's
        # set difference and, nested, is valid inside a bracket expression as well as outside.
        regex = re.sub(r"\\p\{([LNPSM])\}", lambda m: rf"[\p{{{m[1]}}}&&[^{_UNICODE_16_ADDITIONS}]]", regex)
    else:  # std::wregex
        regex = _ESCAPE_OR_BRACKET.sub(_without_unicode_spaces, regex)
    regex = regex.replace(r"\d", "[0-9]")  # Oniguruma's \d would take any decimal digit
    if regex.endswith("$") and not regex.endswith(r"\$"):  # deepseek-llm's "\s+$"; Oniguruma's
        regex = regex[:-1] + r"\z"  # $ is an end of line
    return regex


def _without_unicode_spaces(match: re.Match) -> str:
    r"""A bracket expression that lists characters loses the non-ASCII White_Space ones.

    That is how std::wregex sees it after llama.cpp's U+000B substitution. Negated expressions
    are left alone: those in llama.cpp's regexes all hold \s, which excludes White_Space in
    both engines.
    """
    if match[0].startswith("\\") or match[1] or r"\s" in match[2]:
        return match[0]
    return f"[{match[2]}&&[^{_UNICODE_SPACES}]]"


class PreTokenizer(NamedTuple):
    """What a tokenizer.ggml.pre name sets in llama.cpp (llama_vocab::impl::load)."""

    regexes: str  # key of _REGEXES
    ignore_merges: bool = False  # a piece that is a token is that token, unmerged
    add_bos: bool = False  # the default of tokenizer.ggml.add_bos_token
    no_default_bos: bool = False  # the BOS id defaults to none instead of 11
    byte_level: bool = True  # GPT-2's byte-to-unicode map; else raw UTF-8 with <0xXX> byte tokens
    escape_spaces: bool = False  # " " -> "▁" before splitting (SentencePiece-style vocabularies)
    always_bos: bool = False  # gemma4: BOS even where tokenizer.ggml.add_bos_token says false
    whole_newline_tokens: bool = False  # gemma4: see _keep_newline_tokens_whole


_P = PreTokenizer  # (short, for the table)
# tokenizer.ggml.pre name(s) -> PreTokenizer, in the order of llama_vocab::impl::load. A missing
# or empty tokenizer.ggml.pre means "default". Two of llama.cpp's flags are left out:
# clean_spaces only changes decoding, which skips it (see above), and add_sep only what
# add_special appends after the text, which `encode` never does.
_PRE_TOKENIZER_NAMES: tuple[tuple[tuple[str, ...], PreTokenizer], ...] = (
    (("default",), _P("default")),
    (("minicpm5",), _P("minicpm5", ignore_merges=True)),
    (
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "jina-v5-nano"),
        _P("llama3", ignore_merges=True, add_bos=True),
    ),
    (("deepseek-llm",), _P("deepseek_llm")),
    (("deepseek-coder",), _P("deepseek_coder")),
    (("deepseek-v3",), _P("deepseek3_llm")),
    (("spark2_5",), _P("spark2_5")),
    (("youtu",), _P("youtu", ignore_merges=True)),
    (("falcon",), _P("falcon")),
    (("mpt",), _P("gpt2")),
    (("starcoder",), _P("starcoder")),
    (
        ("gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "a.x-4.0", "mellum",
         "modern-bert"),
        _P("gpt2"),
    ),
    (("jais-2",), _P("jais2")),
    (
        ("gemma4", "granite-embed-multi-311m"),
        _P("gemma4", byte_level=False, escape_spaces=True, always_bos=True, whole_newline_tokens=True),
    ),
    (("sarvam-moe",), _P("gemma4", byte_level=False, escape_spaces=True)),
    (("jina-v1-en", "jina-v2-code", "roberta-bpe"), _P("gpt2")),
    (("whitespace",), _P("whitespace", byte_level=False)),
    (("refact",), _P("starcoder")),
    (("command-r",), _P("starcoder")),
    (("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2"), _P("qwen2")),
    (("qwen35",), _P("qwen35")),
    (("stablelm2",), _P("qwen2")),
    (("olmo",), _P("gpt2")),
    (("dbrx",), _P("llama3")),
    (("smaug-bpe",), _P("llama3")),
    (("poro-chat",), _P("poro")),
    (("chatglm-bpe",), _P("llama3", no_default_bos=True)),
    (("glm4", "glm5"), _P("llama3", ignore_merges=True, no_default_bos=True)),
    (("viking",), _P("viking")),
    (("jais",), _P("gpt2")),
    (("tekken",), _P("tekken", ignore_merges=True, add_bos=True)),
    (("smollm",), _P("starcoder")),
    (("codeshell",), _P("starcoder")),
    (("bloom",), _P("poro")),
    (("gpt3-finnish",), _P("poro")),
    (("exaone",), _P("starcoder")),
    (("exaone4",), _P("gpt2")),
    (("exaone-moe",), _P("exaone_moe")),
    (("chameleon",), _P("chameleon", add_bos=True)),
    (("minerva-7b",), _P("starcoder")),
    (("megrez",), _P("qwen2")),
    (("gpt-4o", "llama4", "kanana2", "talkie"), _P("gpt4o")),
    (("granite-embed-multi-97m",), _P("granite_emb_multi", ignore_merges=True)),
    (("tiny_aya", "cohere2moe"), _P("tiny_aya")),
    (("superbpe",), _P("superbpe")),
    (("trillion",), _P("gpt2")),
    (("granite-docling",), _P("gpt2")),
    (("bailingmoe", "bailingmoe2", "llada-moe"), _P("bailingmoe")),
    (("seed-coder",), _P("seed_coder")),
    (("hunyuan",), _P("qwen2")),
    (("hunyuan-dense",), _P("deepseek3_llm")),
    (("hy_v4",), _P("deepseek3_llm")),
    (("joyai-llm",), _P("deepseek3_llm")),
    (("kimi-k2",), _P("kimi_k2")),
    (("ufakzeka",), _P("ufakzeka")),
    (("grok-2",), _P("qwen2")),
    (("afmoe",), _P("afmoe")),
    (("laguna",), _P("laguna")),
    (("minimax-m2",), _P("gpt4o")),
    (("solar-open",), _P("qwen2")),
    (("mellum2",), _P("starcoder")),
)
PRE_TOKENIZERS: dict[str, PreTokenizer] = {name: pre for names, pre in _PRE_TOKENIZER_NAMES for name in names}

# Texts llama.cpp always treats as control tokens (its end-of-generation list), whatever
# type the file gives them.
_EOG_TEXTS = frozenset(
    (
        "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
        "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
        "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
        "<\uff5cend\u2581of\u2581sentence\uff5c>", "[e~[",
    )
)
# gpt-oss: always rendered and matched as user-defined tokens.
_FORCED_USER_DEFINED = frozenset(("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"))

# Default special-token ids per vocabulary type before the file's own keys apply
# (bos, eos, unk, sep, pad), as in llama.cpp.
_DEFAULT_IDS = {
    "llama": (1, 2, 0, None, None),
    "bert": (101, None, 100, 102, 0),
    "gpt2": (11, 11, None, None, None),
    "gemma4": (None, None, None, None, None),  # a BPE vocabulary whose pre-tokenizer is always gemma4
}

# Characters llama.cpp's WPM treats as whitespace but HF's BertNormalizer drops as control
# characters (they are both Cc and White_Space).
_CC_WHITESPACE = "[\u000b\u000c\u0085]"


def tokenizer_from_gguf_metadata(metadata: Mapping[str, object], *, parse_special: bool = True) -> Tokenizer:
    """Build a `Tokenizer` from GGUF metadata (`tokenizer.ggml.*` keys) that encodes as llama.cpp.

    `metadata` maps GGUF keys to plain values (str, int, float, bool, lists; numeric arrays
    may be numpy arrays). `encode(text, add_bos=False)` gives the ids of llama.cpp's
    ``llama_tokenize(text, add_special=false, parse_special=...)``; with ``parse_special``
    (the default) the text of control tokens such as ``<|endoftext|>`` or ``<s>`` becomes that
    token, otherwise it is tokenized as plain text. BOS is added by default where llama.cpp
    adds it (``tokenizer.ggml.add_bos_token``, else the vocabulary type's default); EOS and
    BERT's trailing [SEP] are never added.

    Raises `CheckpointError` for a vocabulary type or pre-tokenizer llama.cpp would not load
    or that is not supported here, and for missing or inconsistent keys.
    """
    if not isinstance(metadata, Mapping):
        raise CheckpointError(f"GGUF metadata must be a mapping, got {type(metadata).__name__}")
    model = _get_str(metadata, "model")
    if model is None:
        raise CheckpointError(f"GGUF metadata has no {_KEY}model: the file carries no tokenizer")
    if model in ("no_vocab", "none"):
        raise CheckpointError(f"GGUF {_KEY}model is {model!r}: the file carries no tokenizer")
    if model not in _DEFAULT_IDS:
        raise CheckpointError(
            f"unsupported GGUF tokenizer model {model!r} (supported: 'llama', 'gpt2', 'gemma4', 'bert')"
        )

    tokens = _read_tokens(metadata)
    n = len(tokens)
    types = _read_numbers(metadata, "token_type", n, int)
    if types is None:
        types = [TOKEN_NORMAL] * n
    types = _adjust_types(tokens, types)

    pre = None
    defaults = _DEFAULT_IDS[model]
    if model in ("gpt2", "gemma4"):  # llama.cpp reads a pre-tokenizer only for BPE vocabularies
        pre = "gemma4" if model == "gemma4" else _get_str(metadata, "pre") or "default"
        if pre not in PRE_TOKENIZERS:
            raise CheckpointError(
                f"unknown GGUF pre-tokenizer {pre!r} ({_KEY}pre); supported: {', '.join(sorted(PRE_TOKENIZERS))}"
            )
        if PRE_TOKENIZERS[pre].no_default_bos:
            defaults = (None, *defaults[1:])

    bos, eos, unk, sep, pad = _special_ids(metadata, defaults, n)

    if model == "llama":
        scores = _read_numbers(metadata, "scores", n, float) or [0.0] * n
        add_space_prefix = _get_bool(metadata, "add_space_prefix", True)
        backend = _spm_backend(tokens, types, scores, unk, add_space_prefix)
        add_bos = _get_bool(metadata, "add_bos_token", True)
    elif model in ("gpt2", "gemma4"):
        spec = PRE_TOKENIZERS[pre]
        # Kimi-K2's files may carry no merges; llama.cpp then merges nothing.
        merges = [] if pre == "kimi-k2" and _KEY + "merges" not in metadata else _read_merges(metadata, tokens)
        regexes = [_as_onig(r) for r in _REGEXES[spec.regexes]]
        if spec.byte_level:
            backend = _bpe_backend(tokens, merges, regexes, spec.ignore_merges)
        else:
            backend = _utf8_bpe_backend(tokens, merges, regexes, spec)
        add_bos = _get_bool(metadata, "add_bos_token", spec.add_bos) or spec.always_bos
    else:  # bert
        if unk is None:
            raise CheckpointError("GGUF BERT vocabulary has no unknown token (tokenizer.ggml.unknown_token_id)")
        lowercase = _get_bool(metadata, "normalizer.lowercase", True)
        strip_accents = _get_bool(metadata, "normalizer.strip_accents", lowercase)
        add_space_prefix = _get_bool(metadata, "add_space_prefix", False)
        backend = _wpm_backend(tokens, tokens[unk], lowercase, strip_accents, add_space_prefix)
        add_bos = _get_bool(metadata, "add_bos_token", True)

    _add_special_tokens(backend, tokens, types, _strip_attributes(metadata, tokens))
    backend.encode_special_tokens = not parse_special

    if add_bos and bos is None:
        raise CheckpointError(f"{_KEY}add_bos_token is true, but {_KEY}bos_token_id is not set")
    return Tokenizer(
        backend,
        bos_token=None if bos is None else tokens[bos],
        eos_token=None if eos is None else tokens[eos],
        pad_token=None if pad is None else tokens[pad],
        add_bos=add_bos,
    )


# -- the three pipelines ---------------------------------------------------------------------


def _spm_backend(
    tokens: list[str], types: list[int], scores: list[float], unk: int | None, add_space_prefix: bool
) -> tokenizers.Tokenizer:
    vocab = {t: i for i, t in enumerate(tokens)}
    byte_fallback = TOKEN_BYTE in types
    model = models.BPE(
        vocab=vocab,
        merges=_merges_from_scores(tokens, scores),
        unk_token=None if unk is None else tokens[unk],
        fuse_unk=True,
        byte_fallback=byte_fallback,
    )
    backend = tokenizers.Tokenizer(model)
    steps = [normalizers.Replace(" ", SPIECE_SPACE)]
    if add_space_prefix:
        # Each stretch of text between special tokens gets its "▁", as in llama.cpp.
        steps.insert(0, normalizers.Prepend(SPIECE_SPACE))
    backend.normalizer = normalizers.Sequence(steps)
    dec = [decoders.Replace(SPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    backend.decoder = decoders.Sequence(dec)
    return backend


def _merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges that reproduce llama.cpp's SentencePiece merging.

    llama.cpp repeatedly merges the adjacent pair whose concatenation is a vocabulary token
    with the highest score (leftmost on a tie), whatever that token's type. Every split of a
    token into two vocabulary tokens becomes a merge ranked by the token's score; longer left
    parts rank first so that runs of one piece ("▁▁▁▁") grow from their left end.
    """
    vocab = {t: i for i, t in enumerate(tokens)}
    ranked = []
    for piece, i in vocab.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[i], -cut, i, left, right))
    ranked.sort(key=lambda r: r[:3])
    return [(left, right) for *_, left, right in ranked]


def _bpe_model(tokens: list[str], merges: list[tuple[str, str]], **options) -> models.BPE:
    vocab = {t: i for i, t in enumerate(tokens)}
    try:
        return models.BPE(vocab=vocab, merges=merges, fuse_unk=False, **options)
    except Exception as e:  # tokenizers reports a bad merge as a bare Exception
        raise CheckpointError(f"inconsistent GGUF BPE vocabulary: {_one_line(e)}") from None


def _splits(regexes: Sequence[str]) -> list[pre_tokenizers.PreTokenizer]:
    return [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]


def _bpe_backend(
    tokens: list[str], merges: list[tuple[str, str]], regexes: Sequence[str], ignore_merges: bool
) -> tokenizers.Tokenizer:
    """Byte-level BPE: the pieces' UTF-8 bytes as GPT-2's byte characters, then the merges.

    A piece left with a character that is no token loses it, as in llama.cpp (which looks up
    the character's bytes one by one as tokens, and no token is a lone byte of a multi-byte
    character).
    """
    backend = tokenizers.Tokenizer(_bpe_model(tokens, merges, ignore_merges=ignore_merges))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        _splits(regexes) + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    backend.decoder = decoders.ByteLevel()
    return backend


def _utf8_bpe_backend(
    tokens: list[str], merges: list[tuple[str, str]], regexes: Sequence[str], spec: PreTokenizer
) -> tokenizers.Tokenizer:
    """BPE on raw UTF-8 characters (llama.cpp's byte_encode=false: gemma4, sarvam-moe, whitespace).

    A character that is no token becomes its bytes' <0xXX> tokens. With `escape_spaces` the
    text's spaces are "▁" first, as SentencePiece-style vocabularies spell them.
    """
    backend = tokenizers.Tokenizer(_bpe_model(tokens, merges, ignore_merges=spec.ignore_merges, byte_fallback=True))
    if spec.escape_spaces:
        backend.normalizer = normalizers.Replace(" ", SPIECE_SPACE)
    backend.pre_tokenizer = pre_tokenizers.Sequence(_splits(regexes))
    dec = [decoders.ByteFallback(), decoders.Fuse()]
    if spec.escape_spaces:
        dec.insert(0, decoders.Replace(SPIECE_SPACE, " "))
    backend.decoder = decoders.Sequence(dec)
    if spec.whole_newline_tokens:
        _keep_newline_tokens_whole(backend, tokens)
    return backend


def _keep_newline_tokens_whole(backend: tokenizers.Tokenizer, tokens: list[str]) -> None:
    """gemma4: llama.cpp takes a piece of newlines that is a token as that token, unmerged.

    Merging gives the same wherever the merges build each such token. Where they do not (the
    case llama.cpp's rule is for), the newline tokens become added tokens: a run of newlines
    that is a token is then that token, and a longer run is cut into the longest such tokens
    from its start (llama.cpp would merge it; the two agree unless the merges say otherwise).
    """
    runs = [(i, t) for i, t in enumerate(tokens) if t.strip("\n") == "" and t]
    if all(backend.encode(t, add_special_tokens=False).ids == [i] for i, t in runs):
        return
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for _, t in runs])


def _wpm_backend(
    tokens: list[str], unk_token: str, lowercase: bool, strip_accents: bool, add_space_prefix: bool
) -> tokenizers.Tokenizer:
    vocab = {t: i for i, t in enumerate(tokens)}
    # The GGUF vocabulary marks word starts with "▁" (llama.cpp's converter turned "##xy" into
    # "xy" and "xy" into "▁xy"), so each word gets a "▁" in front and continuations need no prefix.
    model = models.WordPiece(
        vocab=vocab, unk_token=unk_token, continuing_subword_prefix="", max_input_chars_per_word=1 << 30
    )
    backend = tokenizers.Tokenizer(model)
    steps = [normalizers.Replace(Regex(_CC_WHITESPACE), " ")]
    if strip_accents:
        # llama.cpp drops every combining mark (Mn, Mc, Me) after NFD.
        steps += [normalizers.NFD(), normalizers.Replace(Regex(r"\p{M}"), "")]
    steps.append(
        normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=False, lowercase=lowercase
        )
    )
    backend.normalizer = normalizers.Sequence(steps)
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.BertPreTokenizer(),
            pre_tokenizers.Metaspace(replacement=SPIECE_SPACE, prepend_scheme="always", split=False),
        ]
    )
    dec = [decoders.Replace(SPIECE_SPACE, " "), decoders.Fuse()]
    if add_space_prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    # llama.cpp's clean_spaces passes, in its order, on the fused text: no space before
    # ?!., , " ' " becomes "'", and contractions 's 'm 're 've lose their space.
    dec += [decoders.Replace(old, new) for old, new in _CLEAN_SPACES]
    backend.decoder = decoders.Sequence(dec)
    return backend


_CLEAN_SPACES = (
    (" ?", "?"), (" !", "!"), (" .", "."), (" ,", ","),
    (" ' ", "'"),
    (" 's", "'s"), (" 'm", "'m"), (" 're", "'re"), (" 've", "'ve"),
)


def _add_special_tokens(
    backend: tokenizers.Tokenizer, tokens: list[str], types: list[int], strip: dict[int, tuple[bool, bool]]
) -> None:
    """Control/unknown tokens as special added tokens, user-defined ones as plain added tokens.

    Added longest first: llama.cpp splits the text on each special token in order of
    decreasing length.
    """
    ids = [i for i, t in enumerate(types) if t in (TOKEN_CONTROL, TOKEN_UNKNOWN, TOKEN_USER_DEFINED)]
    ids.sort(key=lambda i: -len(tokens[i].encode("utf-8")))
    special, plain = [], []
    for i in ids:
        lstrip, rstrip = strip.get(i, (False, False))
        is_special = types[i] != TOKEN_USER_DEFINED
        token = AddedToken(tokens[i], special=is_special, normalized=False, lstrip=lstrip, rstrip=rstrip)
        (special if is_special else plain).append(token)
    if special:
        backend.add_special_tokens(special)
    if plain:
        backend.add_tokens(plain)


# -- metadata -----------------------------------------------------------------------------------


def _string_list(metadata: Mapping[str, object], key: str, missing: str) -> Sequence:
    """The list stored under `key` (its items are checked by the caller)."""
    raw = metadata.get(key)
    if raw is None:
        raise CheckpointError(missing)
    if isinstance(raw, (str, bytes)) or not isinstance(raw, Sequence):
        raise CheckpointError(f"GGUF {key} must be a list of strings")
    return raw


def _read_tokens(metadata: Mapping[str, object]) -> list[str]:
    key = _KEY + "tokens"
    tokens = list(_string_list(metadata, key, f"GGUF metadata has no {key}"))
    if not tokens:
        raise CheckpointError(f"GGUF {key} is empty")
    seen: dict[str, int] = {}
    for i, t in enumerate(tokens):
        if not isinstance(t, str):
            raise CheckpointError(f"GGUF {key}[{i}] is not a string")
        if not t:  # llama.cpp's name for an empty token
            t = tokens[i] = f"[EMPTY_{i}]"
        if t in seen:
            raise CheckpointError(f"duplicate token in GGUF vocabulary: {t!r} has ids {seen[t]} and {i}")
        seen[t] = i
    return tokens


def _read_numbers(metadata: Mapping[str, object], name: str, n: int, kind: type) -> list | None:
    key = _KEY + name
    raw = metadata.get(key)
    if raw is None:
        return None
    if hasattr(raw, "tolist"):  # numpy array
        raw = raw.tolist()
    if isinstance(raw, (str, bytes)) or not isinstance(raw, Sequence):
        raise CheckpointError(f"GGUF {key} must be an array of numbers")
    if len(raw) < n:
        raise CheckpointError(f"GGUF {key} has {len(raw)} entries for {n} tokens")
    values = list(raw[:n])
    try:
        if kind is int:
            values = [operator.index(v) for v in values]
        else:
            values = [float(v) for v in values]
    except TypeError:
        raise CheckpointError(f"GGUF {key} must be an array of numbers") from None
    return values


def _read_merges(metadata: Mapping[str, object], tokens: list[str]) -> list[tuple[str, str]]:
    key = _KEY + "merges"
    raw = _string_list(metadata, key, f"GGUF BPE vocabulary has no {key}")
    vocab = set(tokens)
    merges = []
    for i, merge in enumerate(raw):
        if not isinstance(merge, str):
            raise CheckpointError(f"GGUF {key}[{i}] is not a string")
        cut = merge.find(" ", 1)  # llama.cpp splits at the first space after the first byte
        if cut < 0:
            raise CheckpointError(f"GGUF {key}[{i}] {merge!r} is not two tokens separated by a space")
        left, right = merge[:cut], merge[cut + 1 :]
        # A merge that cannot produce a vocabulary token is never useful (llama.cpp would
        # fall back to bytes for its result); the tokenizers BPE refuses such merges.
        if left in vocab and right in vocab and left + right in vocab:
            merges.append((left, right))
    return merges


def _adjust_types(tokens: list[str], types: list[int]) -> list[int]:
    """llama.cpp's overrides of the stored token types, decided by token text."""
    out = list(types)
    for i, t in enumerate(tokens):
        if t in _FORCED_USER_DEFINED:
            out[i] = TOKEN_USER_DEFINED
        elif t in _EOG_TEXTS and out[i] != TOKEN_UNKNOWN:
            out[i] = TOKEN_CONTROL
    return out


def _special_ids(metadata: Mapping[str, object], defaults: Sequence[int | None], n: int) -> tuple[int | None, ...]:
    """(bos, eos, unk, sep, pad): llama.cpp's defaults for the vocabulary, then the file's ids.

    As in llama.cpp, a default outside the vocabulary is dropped and a stored id outside the
    vocabulary is ignored.
    """
    names = ("bos_token_id", "eos_token_id", "unknown_token_id", "seperator_token_id", "padding_token_id")
    ids = []
    for name, default in zip(names, defaults):
        value = default if default is not None and default < n else None
        stored = metadata.get(_KEY + name)
        if stored is not None:
            try:
                stored = operator.index(stored)
            except TypeError:
                raise CheckpointError(f"GGUF {_KEY}{name} must be an integer") from None
            if 0 <= stored < n:
                value = stored
        ids.append(value)
    return tuple(ids)


def _strip_attributes(metadata: Mapping[str, object], tokens: list[str]) -> dict[int, tuple[bool, bool]]:
    """(lstrip, rstrip) of special tokens that llama.cpp sets by model name."""
    name = (_get_plain_str(metadata, "general.name") or "").lower()
    arch = _get_plain_str(metadata, "general.architecture") or ""
    pre = _get_str(metadata, "pre") or ""
    index = {t: i for i, t in enumerate(tokens) if t in ("<mask>", "[MASK]", "</s>", "<unk>", "<s>", "<|endoftext|>")}
    strip: dict[int, tuple[bool, bool]] = {}
    if any(s in pre for s in ("jina-v2-de", "jina-v2-es", "jina-v2-code")) or any(
        s in arch for s in ("nomic-bert-moe", "jina-bert-v3")
    ):
        if "<mask>" in index:
            strip[index["<mask>"]] = (True, False)
    elif "phi-3" in name or "phi3" in name:
        strip = {i: (False, True) for i in range(len(tokens))}  # filtered to special tokens by the caller
        for t in ("<unk>", "<s>", "<|endoftext|>"):
            if t in index:
                strip[index[t]] = (False, False)
    elif "modern-bert" in name and "[MASK]" in index:
        strip[index["[MASK]"]] = (True, False)
    return strip


def _get_str(metadata: Mapping[str, object], name: str) -> str | None:
    return _get_plain_str(metadata, _KEY + name)


def _get_plain_str(metadata: Mapping[str, object], key: str) -> str | None:
    value = metadata.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise CheckpointError(f"GGUF {key} must be a string, got {type(value).__name__}")
    return value


def _get_bool(metadata: Mapping[str, object], name: str, default: bool) -> bool:
    key = _KEY + name
    value = metadata.get(key)
    if value is None:
        return default
    if hasattr(value, "item") and not isinstance(value, (bool, int)):  # numpy scalar
        value = value.item()
    if not isinstance(value, bool):
        raise CheckpointError(f"GGUF {key} must be a boolean, got {type(value).__name__}")
    return value


def _one_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# -- our tokenizer as GGUF metadata (the way out) ------------------------------------------
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 5, 6


def tokenizer_to_gguf_metadata(tokenizer: Tokenizer, config) -> dict:
    """Our BPE tokenizer as llama.cpp vocabulary metadata: a byte-fallback BPE (SentencePiece
    style) becomes a "llama" vocabulary whose scores rank tokens by the merge that makes them;
    a byte-level BPE becomes a "gpt2" vocabulary with its merges and GPT-2's pre-tokenizer.
    Rows of the embedding past the tokenizer's vocabulary get unused [PAD{i}] tokens."""
    spec = json.loads(tokenizer.backend.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise InvalidArgument(f"only BPE tokenizers can be written to GGUF (this one is {model.get('type')})")
    pieces: dict[int, str] = {i: p for p, i in model["vocab"].items()}
    special = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    for t in spec.get("added_tokens", []):
        pieces[t["id"]] = t["content"]
    size = max(config.vocab_size, max(pieces) + 1)
    if size > config.vocab_size:
        raise InvalidArgument(f"the tokenizer has {size} tokens but the model only {config.vocab_size}")
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
    tokens, types = [], []
    for i in range(size):
        piece = pieces.get(i)
        if piece is None:
            tokens.append(f"[PAD{i}]"), types.append(TOKEN_UNUSED)
            continue
        tokens.append(piece)
        if i in special:
            types.append(TOKEN_UNKNOWN if piece == model.get("unk_token") else TOKEN_CONTROL)
        elif model.get("byte_fallback") and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            types.append(TOKEN_BYTE)
        else:
            types.append(TOKEN_NORMAL)
    meta: dict = {}
    if model.get("byte_fallback"):
        rank = {}
        for r, (a, b) in enumerate(merges):
            rank.setdefault(a + b, r)
        meta["tokenizer.ggml.model"] = "llama"
        meta["tokenizer.ggml.tokens"] = tokens
        meta["tokenizer.ggml.scores"] = GGUFValue([-float(rank.get(t, len(merges))) if ty == TOKEN_NORMAL else 0.0
                                                   for t, ty in zip(tokens, types)],
                                                  GGUFValueType.ARRAY, GGUFValueType.FLOAT32)
        meta["tokenizer.ggml.add_space_prefix"] = True
    else:
        meta["tokenizer.ggml.model"] = "gpt2"
        meta["tokenizer.ggml.pre"] = "gpt-2"
        meta["tokenizer.ggml.tokens"] = tokens
        meta["tokenizer.ggml.merges"] = [f"{a} {b}" for a, b in merges]
    meta["tokenizer.ggml.token_type"] = GGUFValue(types, GGUFValueType.ARRAY, GGUFValueType.INT32)
    for key, value in (("bos_token_id", tokenizer.bos_id), ("eos_token_id", tokenizer.eos_id),
                       ("padding_token_id", tokenizer.pad_id)):
        if value is not None:
            meta[f"tokenizer.ggml.{key}"] = value
    unk = model.get("unk_token")
    if unk is not None and unk in model["vocab"]:
        meta["tokenizer.ggml.unknown_token_id"] = model["vocab"][unk]
    meta["tokenizer.ggml.add_bos_token"] = bool(tokenizer.add_bos)
    meta["tokenizer.ggml.add_eos_token"] = False
    return meta
