"""What SFT is measured by, besides the assistant-token validation loss: does the model answer, then stop?

    end-of-turn rate = (greedy answers that say something and then end with </s> within N tokens) / prompts

A base model continues text; a chat model answers and ends its turn. The loss cannot tell the two apart
(a model can lower it on every token and still never emit </s>), so the validation conversations are
cut before their last answer and answered greedily, before and after fine-tuning.

Demo: run by sft.py at the start and the end of every fine-tuning run.
"""

import sys
from importlib import import_module
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository root is the one import root
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
generate = import_module("06_model.generate")


def answer_prompts(convs: list) -> list:
    """Each conversation cut before its last answer: (the messages that prompt it, the reference answer)."""
    out = []
    for messages in convs:
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        out.append((messages[:last], messages[last]["content"]))
    return out


def end_of_turn_rate(model, fmt, prompts: list, max_new_tokens: int) -> tuple:
    """(fraction of greedy answers that say something and then end with </s> within max_new_tokens, the
    answers' texts). An empty answer does not count: "</s>" alone is not following the format."""
    encoded = [fmt.encode(messages, add_generation_prompt=True)[0] for messages, _ in prompts]
    encoded = [ids for ids in encoded if len(ids) + max_new_tokens <= model.config.max_seq_len]
    ended, texts, B = 0, [], model.config.max_batch_size
    for i in range(0, len(encoded), B):
        for new in generate.generate(model, encoded[i : i + B], max_new_tokens, stop_id=fmt.eot_id):
            ended += len(new) > 1 and new[-1] == fmt.eot_id
            texts.append(fmt.tokenizer.decode(new))  # special tokens (the </s>) are not printed
    return ended / max(1, len(encoded)), texts
