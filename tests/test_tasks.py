"""Offline task accuracy (last-word and cloze items built from local text) and the lm-eval `lowbit` model."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.eval.tasks import build_items, items_from_file, score_items

TEXT = "\n".join(
    " ".join(f"w{i}{j}" for j in range(40)) + f" ended with word{chr(97 + i % 26)}{chr(97 + i // 26)}x." for i in range(60))


def test_items_are_deterministic_and_well_formed(wikitext):
    items = items_from_file(wikitext, 50, 32)
    assert items == items_from_file(wikitext, 50, 32) and len(items) == 50
    for item in items:
        assert item.target.isalpha() and len(item.target) >= 3
        assert len(item.distractors) == 3 and item.target.lower() not in {d.lower() for d in item.distractors}
        assert 16 <= len(item.context.split()) <= 32
    assert len({item.context for item in items}) == 50          # spread over the text, no repeats


def test_too_short_text_is_a_clear_error():
    with pytest.raises(LowbitError, match="fewer than the 500 task items"):
        build_items(TEXT, 500)


class Oracle(torch.nn.Module):
    """Predicts, at every position, the next token of batch row `row` (row 0 holds the right answer)."""

    def __init__(self, vocab: int, row: int):
        super().__init__()
        self.vocab, self.row = vocab, row

    def forward(self, batch, use_cache=False):
        logits = torch.zeros(*batch.shape, self.vocab)
        nxt = torch.roll(batch[self.row], -1)
        logits[:, torch.arange(batch.shape[1]), nxt] = 20.0
        return SimpleNamespace(logits=logits)


def test_scores_follow_the_model(stories):
    _, tokenizer = stories
    items = build_items(TEXT, 20, 32)
    right = score_items(Oracle(tokenizer.vocab_size, 0), tokenizer, items, progress=False)
    assert right["last_word"].accuracy == 1.0 and right["cloze"].accuracy == 1.0
    wrong = score_items(Oracle(tokenizer.vocab_size, 1), tokenizer, items, progress=False)   # prefers a distractor
    assert wrong["cloze"].accuracy == 0.0 and wrong["last_word"].correct == 0


@pytest.mark.slow
def test_lm_eval_lowbit_model_scores_like_the_builtin_task(stories_dir, tinystories_text, tmp_path):
    """lm-eval's multiple_choice task over the built-in cloze items, run through `--model lowbit`, gets the
    accuracy lowbit's own cloze scorer gets (same log-likelihoods, so exactly the same)."""
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install lm-eval==0.4.13)")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    import lowbit
    import lowbit.eval.lm_eval_adapter  # noqa: F401  (registers --model lowbit)

    items = items_from_file(tinystories_text, 24, 32)
    rows = [{"context": i.context, "choices": [i.target, *i.distractors], "label": 0} for i in items]
    (tmp_path / "cloze.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "cloze.yaml").write_text(f"""task: lowbit_cloze
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tmp_path / 'cloze.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
""")
    result = simple_evaluate(model="lowbit", model_args=f"pretrained={stories_dir}", tasks=["lowbit_cloze"],
                             task_manager=TaskManager(include_path=str(tmp_path)), limit=None)
    harness = result["results"]["lowbit_cloze"]["acc,none"]
    model = lowbit.load(stories_dir)
    from lowbit.runtime.cpu import float32_arithmetic

    with float32_arithmetic():
        own = score_items(model, model.tokenizer, items, progress=False)["cloze"].accuracy
    assert harness == pytest.approx(own, abs=1e-12) and 0.25 < own   # and the 260K-parameter model beats chance


def test_lm_eval_adapter_rejects_unknown_arguments(stories_dir):
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install lm-eval==0.4.13)")
    from lowbit.eval.lm_eval_adapter import LowbitLM

    with pytest.raises(LowbitError, match="no argument 'dtype'"):
        LowbitLM(pretrained=str(stories_dir), dtype="float16")
