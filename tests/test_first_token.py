"""One definition of "the answer's first token" (model/targets.first_target_token)."""

from __future__ import annotations

import pytest

from medmap.concepts.pairs import _TokenCheck
from medmap.errors import MedmapError
from medmap.model.targets import first_target_token
from medmap.techniques.patching import answer_token
from tiny import tokenizer


def test_merge_at_the_boundary_picks_the_same_token_everywhere():
    tok = tokenizer()
    prompt, answer = "A dog is a ", "mammal"  # the prompt's trailing space merges into " ma"
    full = tok(prompt + answer)["input_ids"]
    own = tok(prompt)["input_ids"]
    assert full[: len(own)] != own  # the boundary really merges
    expected = tok(answer, add_special_tokens=False)["input_ids"][0]
    assert tok.decode([expected]) == "ma"
    merged = full[len(own) - 1]
    assert tok.decode([merged]) == " ma" and merged != expected
    assert first_target_token(tok, prompt, answer) == expected
    assert answer_token(tok, prompt, answer) == expected
    assert _TokenCheck(tok).first_token(prompt, answer) == expected


def test_no_merge_takes_the_next_token_of_the_full_sequence():
    tok = tokenizer()
    prompt, answer = "The capital of France is", " Paris"
    own = tok(prompt)["input_ids"]
    full = tok(prompt + answer)["input_ids"]
    assert full[: len(own)] == own
    assert first_target_token(tok, prompt, answer) == full[len(own)]
    assert _TokenCheck(tok).first_token(prompt, answer) == answer_token(tok, prompt, answer)
    assert first_target_token(tok, prompt, "") is None
    with pytest.raises(MedmapError, match="empty answer"):
        answer_token(tok, prompt, "")
