"""Benchmark metrics, each as its reference defines it (no torch).

Every metric scores one prediction against its reference answer(s) and returns a float in
[0, 1]; a benchmark's score is the mean over its questions (:mod:`.evaluate`).

``vqa`` — VQA accuracy (VQAv2, TextVQA, VizWiz)
    Answers are normalised as EvalAI does: :func:`normalize_vqa_answer` reproduces
    ``EvalAIAnswerProcessor`` of LLaVA's ``llava/eval/m4c_evaluator.py`` (copied there from
    facebookresearch/mmf ``pythia/tasks/processors.py``, itself the official
    ``vqaEval.py`` of GT-Vision-Lab/VQA): lower-case, drop "," and "?", split "'s"; punctuation
    ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` is deleted when it touches a space (or when the
    text has a comma between digits) and replaced by a space otherwise; a period not followed by a
    digit is deleted ("3.5" keeps its point); number words "none", "zero" … "ten" become digits;
    the articles "a", "an", "the" are dropped; missing apostrophes are restored from the
    contractions map ("dont" → "don't"). The official code's two quirks are kept on purpose:
    the period regex ``(?!<=\\d)`` is a look-ahead (not the intended look-behind), and
    ``re.sub(..., re.UNICODE)`` passes ``re.UNICODE`` (32) as the *count*, so at most 32 periods
    are removed.

    Accuracy with n reference answers (10 in the datasets) is the mean over the n leave-one-out
    subsets of ``min(1, #subset answers equal to the prediction / 3)`` (VQA's "averaged over all
    10 choose 9 sets of human annotators"): 1 matching annotator → 0.3, 2 → 0.6, 3 → 0.9,
    4 or more → 1. The references are normalised like the prediction (as m4c's
    ``TextVQAAccuracyEvaluator`` does; the official VQAv2 script only re-punctuates references
    that disagree, which is the same on VQAv2's already-normalised annotations). With a single
    reference the leave-one-out mean is always 0, so one reference scores as normalised exact
    match (a convention of this module, for single-answer ground truth).

``anls`` — Average Normalized Levenshtein Similarity (ST-VQA, DocVQA, InfographicVQA)
    Biten et al., "Scene Text Visual Question Answering" (ICCV 2019): per question, the maximum
    over references of ``1 − NL`` where ``NL = lev(a, p) / max(|a|, |p|)``, and 0 when the
    similarity is below the threshold τ = 0.5. Strings are compared lower-cased with outer
    whitespace stripped and inner runs of whitespace collapsed (``" ".join(s.strip().lower()
    .split())``, the DocVQA/InfographicVQA evaluation code as lmms-eval and Qwen-VL copy it).
    At exactly NL = 0.5 the evaluation code keeps the score 0.5 (it zeroes ``1 − NL < 0.5``,
    as does m4c's ``iou >= 0.5``) where the paper's formula says ``NL < τ``; this module follows
    the code, which produced the published numbers.

``relaxed`` — ChartQA relaxed accuracy
    Masry et al., ChartQA (ACL Findings 2022) §5.1: a numeric answer is correct within 5 % of the
    gold value, anything else needs an exact match. Implemented as ``relaxed_correctness`` in
    google-research/pix2struct (used by Qwen-VL's and lmms-eval's ChartQA evaluation): a string
    ending in "%" is parsed as that number / 100 ("45%" → 0.45, so "45%" vs "45" is *not*
    within 5 %); numbers are what Python's ``float`` parses ("1,000" is not a number and compares
    as text); a gold value of 0 is compared as text; the text comparison is case-insensitive.
    Max over references. The one liberty: both strings are stripped of outer whitespace first.

``exact`` — exact match after normalisation
    ``normalize_vqa_answer(prediction) == normalize_vqa_answer(reference)`` for any reference
    (the comparison m4c's ``STVQAAccuracyEvaluator`` makes), so "Two." matches "2".

``mc`` — multiple choice
    :func:`extract_choice` finds the chosen letter in free text (rules in its docstring); the
    score is 1 when it equals the reference letter.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence

# --- VQA normalisation (EvalAIAnswerProcessor, verbatim tables) ------------------------------------

#: The contractions map of the official VQA evaluation (entries that cannot match after
#: lower-casing, and the odd ``"somebody'd": "somebodyd"``, are kept as in the original).
CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
NUMBER_MAP: dict[str, str] = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                              "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
PUNCTUATIONS = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: a look-ahead for "<=" + digit, as in the original
_COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")
_MAX_PERIODS = int(re.UNICODE)  # the original passes re.UNICODE (= 32) as re.sub's count


def _process_punctuation(text: str) -> str:
    out = text
    digit_comma = _COMMA_STRIP.search(text) is not None
    for p in PUNCTUATIONS:
        # the test reads the *input* text, the replacement the running output (as the original)
        if (p + " " in text or " " + p in text) or digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_MAX_PERIODS)


def _process_digit_article(text: str) -> str:
    words = [NUMBER_MAP.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_vqa_answer(answer: str) -> str:
    """EvalAI's answer normalisation (``EvalAIAnswerProcessor.__call__``), step for step."""
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(text))


References = str | Sequence[str]


def _refs(references: References) -> list[str]:
    refs = [references] if isinstance(references, str) else [str(r) for r in references]
    if not refs:
        raise ValueError("no reference answers")
    return refs


def vqa_accuracy(prediction: str, references: References) -> float:
    """VQA accuracy: mean over leave-one-out subsets of ``min(1, matches / 3)`` (see module doc)."""
    refs = [normalize_vqa_answer(r) for r in _refs(references)]
    pred = normalize_vqa_answer(prediction)
    if len(refs) == 1:
        return float(pred == refs[0])
    matches = sum(r == pred for r in refs)
    # leaving out a matching answer leaves matches - 1, leaving out another leaves matches
    total = sum(min(1.0, (matches - (r == pred)) / 3.0) for r in refs)
    return total / len(refs)


# --- ANLS -------------------------------------------------------------------------------------------

def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions, each 1)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def _anls_norm(s: str) -> str:
    return " ".join(s.strip().lower().split())


def anls(prediction: str, references: References, threshold: float = 0.5) -> float:
    """Average Normalized Levenshtein Similarity of one question: the best ``1 - NL`` over the
    references, 0 below ``threshold`` (see module doc)."""
    pred = _anls_norm(prediction)
    best = 0.0
    for ref in _refs(references):
        gt = _anls_norm(ref)
        length = max(len(gt), len(pred))
        nl = levenshtein(gt, pred) / length if length else 0.0
        best = max(best, 1.0 - nl)
    return best if best >= threshold else 0.0


# --- ChartQA relaxed accuracy -----------------------------------------------------------------------

def _to_float(text: str) -> float | None:
    try:
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0
        return float(text)
    except ValueError:
        return None


def relaxed_correctness(prediction: str, target: str, max_relative_change: float = 0.05) -> bool:
    """pix2struct's ``relaxed_correctness`` (ChartQA): numbers within 5 %, else case-insensitive
    equality; "x%" parses as x / 100; a zero target compares as text."""
    prediction, target = prediction.strip(), target.strip()
    p, t = _to_float(prediction), _to_float(target)
    if p is not None and t:
        return abs(p - t) / abs(t) <= max_relative_change
    return prediction.lower() == target.lower()


def relaxed_accuracy(prediction: str, references: References, max_relative_change: float = 0.05) -> float:
    """ChartQA relaxed accuracy: 1 when any reference is relaxed-correct."""
    return float(any(relaxed_correctness(prediction, r, max_relative_change) for r in _refs(references)))


# --- exact match ------------------------------------------------------------------------------------

def exact_match(prediction: str, references: References) -> float:
    """1 when the prediction equals a reference after :func:`normalize_vqa_answer`."""
    pred = normalize_vqa_answer(prediction)
    return float(any(pred == normalize_vqa_answer(r) for r in _refs(references)))


# --- multiple choice --------------------------------------------------------------------------------

#: Letters considered when no options are given: LLaVA's ScienceQA evaluation default (``--options``).
DEFAULT_CHOICES = "ABCDE"

Options = Mapping[str, str] | Sequence[str] | None

_WHOLE = re.compile(r"^[\(\[]?([A-Z])[\)\]]?[.:]?$")
_STATEMENT = re.compile(
    r"(?i:\b(?:the\s+)?(?:(?:correct|best|final|right)\s+)?(?:answer|option|choice)"
    r"(?:\s+(?:is|would\s+be|should\s+be|will\s+be))?)\s*[:：]?\s*[\(\[]?([A-Z])(?![A-Za-z0-9])")
_LEADING = re.compile(r"^[\(\[]?([A-Z])(?:[\)\]\.:：,]|\s*$|\s*\n)")
_STANDALONE = re.compile(r"(?<![A-Za-z0-9'’-])([A-Z])(?![A-Za-z0-9'’-])")


def _option_texts(options: Options) -> dict[str, str]:
    if options is None:
        return {}
    if isinstance(options, Mapping):
        return {str(k).strip().upper(): str(v) for k, v in options.items()}
    return {chr(ord("A") + i): str(v) for i, v in enumerate(options)}


def extract_choice(text: str, choices: str | Sequence[str] | None = None, options: Options = None) -> str | None:
    """The option letter a free-text answer chooses, or None.

    ``choices`` are the allowed letters (default: the keys of ``options`` when given, else
    :data:`DEFAULT_CHOICES`); ``options`` maps letters to option texts (a list is lettered A, B, …).
    The first rule that finds a letter in ``choices`` wins:

    1. The whole answer is a letter, optionally bracketed or followed by "." or ":"
       ("B", "(B)", "[B]", "B.") — LLaVA's ScienceQA ``pred_text in options``.
    2. An explicit statement, "answer/option/choice [is|would be|should be] [:] X", with an
       optional "the", "correct", "best", "final" ("The answer is C.", "Answer: (B)", "the best
       option is D"): the *last* such statement counts (LLaVA's ScienceQA pattern
       ``The answer is ([A-Z]).``, generalised).
    3. The answer starts with a letter followed by ")", "]", ".", ":", "," or a line break
       ("A. red", "(B) blue", "C: 12") — LLaVA's ScienceQA ``pred_text[0] in options and
       pred_text[1:3] == ". "``, generalised.
    4. Exactly one distinct choice letter stands alone as a word (VLMEvalKit's
       ``can_infer_option`` for MMBench, which splits on ``.()[],:;!*#{}`` and whitespace).
       A capital "A" that starts a sentence and is followed by a lower-case word is read as the
       article ("A cat sits on it.") and ignored.
    5. With option texts: the answer equals one option's text (case-insensitive), or exactly one
       option's text occurs in it (VLMEvalKit's ``can_infer_text``).

    Letters are upper-case only ("a" is never option A).
    """
    opts = _option_texts(options)
    if choices is None:
        choices = "".join(opts) if opts else DEFAULT_CHOICES
    allowed = set(choices)
    s = text.strip().replace("**", "")
    if not s:
        return None
    m = _WHOLE.match(s)
    if m and m.group(1) in allowed:
        return m.group(1)
    found = [m.group(1) for m in _STATEMENT.finditer(s) if m.group(1) in allowed]
    if found:
        return found[-1]
    m = _LEADING.match(s)
    if m and m.group(1) in allowed:
        return m.group(1)
    letters = set()
    for m in _STANDALONE.finditer(s):
        ch = m.group(1)
        if ch not in allowed:
            continue
        if ch == "A":
            before, after = s[:m.start()].rstrip(), s[m.end():]
            if (not before or before[-1] in ".!?\n") and re.match(r"\s+[a-z]", after):
                continue  # the article
        letters.add(ch)
    if len(letters) == 1:
        return letters.pop()
    if opts:
        low = s.lower().strip().rstrip(".")
        exact = [k for k, v in opts.items() if k in allowed and v.strip().lower() == low]
        if len(exact) == 1:
            return exact[0]
        inside = [k for k, v in opts.items() if k in allowed and v.strip() and v.strip().lower() in s.lower()]
        if len(inside) == 1:
            return inside[0]
    return None


def mc_accuracy(prediction: str, references: References, choices: str | Sequence[str] | None = None,
                options: Options = None) -> float:
    """1 when the letter :func:`extract_choice` finds is a reference letter ("B" or "(B)")."""
    got = extract_choice(prediction, choices, options)
    if got is None:
        return 0.0
    wanted = set()
    for r in _refs(references):
        letter = extract_choice(r, "ABCDEFGHIJKLMNOPQRSTUVWXYZ")
        wanted.add(letter if letter is not None else r.strip().upper())
    return float(got in wanted)


#: Metric name → ``f(prediction, references, **options) -> float``.
METRICS: dict[str, Callable[..., float]] = {
    "vqa": vqa_accuracy,
    "anls": anls,
    "relaxed": relaxed_accuracy,
    "exact": exact_match,
    "mc": mc_accuracy,
}

__all__ = ["ARTICLES", "CONTRACTIONS", "DEFAULT_CHOICES", "METRICS", "NUMBER_MAP", "PUNCTUATIONS", "anls",
           "exact_match", "extract_choice", "levenshtein", "mc_accuracy", "normalize_vqa_answer",
           "relaxed_accuracy", "relaxed_correctness", "vqa_accuracy"]
