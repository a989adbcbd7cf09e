"""Prompt functions of our offline task YAMLs, equal to lm-evaluation-harness's own for the same tasks.

Each takes one hub-schema document (a dict) and returns what lm-eval's `doc_to_text`, `doc_to_target`,
`doc_to_choice` or `process_docs` hook returns. `tests/test_eval_tasks.py` checks that our tasks send the
model exactly the requests lm-eval's hub tasks send, on the same documents.
"""

from __future__ import annotations

from typing import Any

from lm_eval.utils import general_detokenize

# ----------------------------------------------------------------------------- WinoGrande (partial scoring)
# The two choices are the sentence up to the blank with each option filled in; the shared continuation is
# the rest of the sentence, so the model scores the same words under two different contexts.


def winogrande_gold(doc: dict[str, Any]) -> int:
    """Index of the correct context: `answer` is "1" or "2"."""
    return int(doc["answer"]) - 1


def winogrande_continuation(doc: dict[str, Any]) -> str:
    """The sentence after the blank `_`, stripped."""
    return doc["sentence"].split("_", 1)[1].strip()


def winogrande_contexts(doc: dict[str, Any]) -> list[str]:
    """The sentence before the blank, followed by option1 and by option2."""
    head = doc["sentence"].split("_", 1)[0]
    return [head + doc["option1"], head + doc["option2"]]


# ----------------------------------------------------------------------------- WSC273 (partial scoring)
_CAPITALISED = {"A", "An", "The", "She", "He", "It", "They", "My", "His", "Her", "Their"}


def _wsc273_option(doc: dict[str, Any], option: str) -> str:
    # A possessive pronoun ("his") is replaced by the possessive of the candidate ("the man's"); a
    # capitalised determiner is lower-cased unless the pronoun starts a sentence.
    if doc["pronoun"].lower() in {"my", "his", "her", "our", "their"}:
        option = option + "'s"
    first = option.split()[0]
    starts_sentence = doc["text"][doc["pronoun_loc"] - 2] == "."
    if first in _CAPITALISED and not starts_sentence:
        option = option.replace(first, first.lower())
    return option


def wsc273_process_docs(dataset):
    """Collapse double spaces in `text` and normalise both `options` (see `_wsc273_option`)."""

    def fix(doc: dict[str, Any]) -> dict[str, Any]:
        doc["text"] = doc["text"].replace("  ", " ")
        doc["options"] = [_wsc273_option(doc, o) for o in doc["options"]]
        return doc

    return dataset.map(fix)


# ----------------------------------------------------------------------------- SuperGLUE WSC (yes / no)
def wsc_text(doc: dict[str, Any]) -> str:
    """Passage with the pronoun starred, then the question whether it refers to the noun span."""
    words_before = " ".join(doc["text"].split()[: doc["span2_index"]])
    rest = doc["text"][len(words_before) + len(doc["span2_text"]) + 1 :]
    passage = general_detokenize(f"{words_before} *{doc['span2_text']}*{rest}")
    return (
        f"Passage: {passage}\n"
        f'Question: In the passage above, does the pronoun "*{doc["span2_text"]}*" refer to '
        f'"*{doc["span1_text"]}*"?\nAnswer:'
    )


# ----------------------------------------------------------------------------- LogiQA
def logiqa_text(doc: dict[str, Any]) -> str:
    """Passage, question, the four options lettered A-D, then "Answer:"."""
    lines = [f"Passage: {doc['context']}", f"Question: {doc['question']}", "Choices:"]
    lines += [f"{letter}. {option}" for letter, option in zip("ABCD", doc["options"], strict=False)]
    return "\n".join(lines) + "\nAnswer:"


def logiqa_gold(doc: dict[str, Any]) -> int:
    """Index of the gold option: `label` is one of "a".."d"."""
    return "abcd".index(doc["label"].strip())
