"""The chat template: a conversation as token ids, and which of them the model is trained to predict.

A conversation is a list of messages {"role": "system" | "user" | "assistant", "content": str}. Three of
lesson 01's reserved tokens <r0>..<r12> open a turn, and </s> closes it as it ends a document in pretraining,
so every generator that stops on </s> stops at the end of an answer (Llama 2's choice; notes.md §1):

    <s> <r0> system text </s> <r1> user text </s> <r2> assistant text </s> <r1> ... <r2>
    BOS    system turn          user turn            assistant turn              generation prompt

mask[i] says whether token i is a target: the assistant's tokens and its closing </s> (how the model learns
to stop); BOS, the role tokens and every system and user token are context. CHAT_TEMPLATE is the same format
in Jinja for the Hugging Face export: apply_chat_template gives these ids, and its {% generation %} block this
mask (return_assistant_tokens_mask=True). The tests check both.

Trap: a tokenizer splits special-token strings out of any text, so a user who types "</s><r2>" would
forge an assistant turn. Message content that contains a special token's text is refused.
Left out on purpose: tool calls, multimodal content, a default system prompt.

Demo: python 08_sft/template.py
"""

import sys
from importlib import import_module
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository root is the one import root
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
commands = import_module("01_tokenizer.commands")
tokenizer_lib = import_module("01_tokenizer.tokenizer")

ROLE_TOKENS = {"system": "<r0>", "user": "<r1>", "assistant": "<r2>"}  # role -> the token that opens its turn
BOS, EOT = "<s>", "</s>"  # start of conversation; end of turn (lesson 01's end of document)
SPECIAL_TEXT = tuple(tokenizer_lib.SPECIAL_TOKENS)  # lesson 01's: <unk> <s> </s> <r0>..<r12>

CHAT_TEMPLATE = (
    "<s>"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}<r0>{{ message['content'] }}</s>"
    "{% elif message['role'] == 'user' %}<r1>{{ message['content'] }}</s>"
    "{% elif message['role'] == 'assistant' %}<r2>{% generation %}{{ message['content'] }}</s>{% endgeneration %}"
    "{% else %}{{ raise_exception('unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<r2>{% endif %}"
)


def check_messages(messages) -> list:
    """`messages` if it is a valid conversation; a ValueError naming the first problem otherwise."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"'messages' must be a non-empty list of messages, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"message {i} must be an object with 'role' and 'content', got {str(m)[:60]!r}")
        if m["role"] not in ROLE_TOKENS:
            raise ValueError(f"message {i}: unknown role {m['role']!r} (expected one of {', '.join(ROLE_TOKENS)})")
        if not isinstance(m["content"], str):
            raise ValueError(f"message {i}: 'content' must be a string, got {type(m['content']).__name__}")
        if m["role"] == "system" and i > 0:
            raise ValueError(f"message {i}: a system message may only come first")
        forged = [t for t in SPECIAL_TEXT if t in m["content"]]
        if forged:
            raise ValueError(f"message {i}: content contains the special token {forged[0]!r}, which would forge a turn")
    return messages


class ChatFormat:
    """Encodes conversations with a lesson-01 tokenizer (a `tokenizers.Tokenizer`)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        ids = {t: tokenizer.token_to_id(t) for t in (BOS, EOT, *ROLE_TOKENS.values())}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"the tokenizer has no {', '.join(missing)} token: train it with lesson 01 (01_tokenizer/)")
        self.bos_id, self.eot_id = ids[BOS], ids[EOT]
        self.role_id = {role: ids[token] for role, token in ROLE_TOKENS.items()}

    def encode_turns(self, messages) -> list:
        """One (ids, mask) pair per message: the role token, the content, </s>; mask True on assistant content + </s>.
        Content is encoded alone: between special tokens a byte-level BPE gives the ids of the whole rendered
        string, which is what apply_chat_template encodes."""
        turns = []
        for m in check_messages(messages):
            content = self.tokenizer.encode(m["content"], add_special_tokens=False).ids
            ids = [self.role_id[m["role"]], *content, self.eot_id]
            train = m["role"] == "assistant"
            turns.append((ids, [False] + [train] * (len(content) + 1)))  # the opening role token is the prompt's
        return turns

    def encode(self, messages, add_generation_prompt: bool = False) -> tuple:
        """(ids, mask) of a whole conversation: BOS, every turn, and <r2> when the assistant is to speak next."""
        ids, mask = [self.bos_id], [False]
        for turn_ids, turn_mask in self.encode_turns(messages):
            ids += turn_ids
            mask += turn_mask
        if add_generation_prompt:
            ids.append(self.role_id["assistant"])
            mask.append(False)
        return ids, mask


if __name__ == "__main__":
    def demo():
        fmt = ChatFormat(tokenizer_lib.load_tokenizer())  # data/tokenizer.json, from lesson 01
        chat = [{"role": "system", "content": "Answer in one line."},
                {"role": "user", "content": "Who says this?\nWho's there?"},
                {"role": "assistant", "content": "Bernardo."}]
        ids, mask = fmt.encode(chat)
        for i, m in zip(ids, mask):
            print(f"{i:>5}  {'target' if m else '      '}  {fmt.tokenizer.id_to_token(i)!r}")
        assert ids[-1] == fmt.eot_id and mask[-1] and not any(mask[: len(ids) - sum(mask)])
        print(f"checked: {sum(mask)} of {len(ids)} tokens are targets, exactly the assistant's answer and its closing </s>")

    commands.exit_on_data_error(demo)
