"""What DPO is measured by, besides the pairs' loss and rewards: the answers it gives, and how far it moved.

    exact-answer rate  = greedy answers equal to the chosen one / prompts, per kind of pair (speaker, continue)
    KL estimate        = mean over prompts x of  sum_t KL( pi(. | x, y_<t) || pi_ref(. | x, y_<t) ),  y ~ pi(. | x)

The rewards only compare two given answers; the exact-answer rate asks what the model says on its own
(the task the preferences encode: lesson 08's "who speaks" question, answered exactly). The KL is the
quantity DPO's beta prices (notes.md): the expected log-ratio log pi(y|x) - log pi_ref(y|x) over the
policy's own answers. Summing each position's exact KL over the vocabulary along a sampled answer is an
unbiased estimate of it (the chain rule of KL), with less variance than the sampled log-ratio alone.

Demo: run by dpo.py at the start and the end of every run.
"""

import sys
from importlib import import_module
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]  # the repository root is the one import root
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
generate = import_module("06_model.generate")
chat_data = import_module("08_sft.chat_data")


def _prompts(model, fmt, pairs: list, max_new_tokens: int) -> list:
    """(pair, prompt ids) of the pairs whose prompt leaves room for an answer in the window."""
    out = [(p, fmt.encode(p.prompt, add_generation_prompt=True)[0]) for p in pairs]
    return [(p, ids) for p, ids in out if len(ids) + max_new_tokens <= model.config.max_seq_len]


def exact_answer_rate(model, fmt, pairs: list, max_new_tokens: int) -> dict:
    """{kind: share of greedy answers (up to </s>) that are exactly the chosen answer}, over `pairs`."""
    todo, hits, totals, B = _prompts(model, fmt, pairs, max_new_tokens), {}, {}, model.config.max_batch_size
    for i in range(0, len(todo), B):
        chunk = todo[i : i + B]
        for (p, _), new in zip(chunk, generate.generate(model, [ids for _, ids in chunk], max_new_tokens, stop_id=fmt.eot_id)):
            kind = p.kind or "all"
            totals[kind] = totals.get(kind, 0) + 1
            hits[kind] = hits.get(kind, 0) + (new[-1:] == [fmt.eot_id] and fmt.tokenizer.decode(new[:-1]) == p.chosen)
    return {kind: hits[kind] / totals[kind] for kind in sorted(totals)}


@torch.no_grad()
def kl_estimate(policy, reference_logits, fmt, pairs: list, max_new_tokens: int, seed: int = 0) -> float:
    """KL(pi || pi_ref) per answer, in nats, on the pairs' prompts; answers sampled from the policy at
    temperature 1. reference_logits: tokens (B, T) -> logits (B, T, vocab) of the frozen reference."""
    device = policy.tok_embeddings.weight.device
    generator = torch.Generator(device).manual_seed(seed)
    todo, total, n, B = _prompts(policy, fmt, pairs, max_new_tokens), 0.0, 0, policy.config.max_batch_size
    was_training = policy.training
    policy.eval()
    for i in range(0, len(todo), B):
        prompts = [ids for _, ids in todo[i : i + B]]
        answers = generate.generate(policy, prompts, max_new_tokens, temperature=1.0, stop_id=fmt.eot_id, generator=generator)
        rows = [(p + a, [False] * len(p) + [True] * len(a)) for p, a in zip(prompts, answers)]
        x, y = (t.to(device) for t in chat_data.collate(rows, fmt.eot_id))  # (B, T): targets are the answers' tokens
        logp = F.log_softmax(policy(x)[0].float(), dim=-1)  # (B, T, vocab)
        logq = F.log_softmax(reference_logits(x).float(), dim=-1)  # (B, T, vocab)
        kl = (logp.exp() * (logp - logq)).sum(-1)  # (B, T): the exact KL of each next-token distribution
        total += (kl * (y != chat_data.IGNORE)).sum().item()  # summed over the positions that sampled an answer token
        n += len(rows)
    policy.train(was_training)
    return total / max(1, n)


def report(best, reference_logits, fmt, eval_pairs: list, before: dict, kinds: dict, records: list, best_val_loss: float,
           answer_tokens: int, seed: int) -> dict:
    """Print and return the closing figures of a run: the best checkpoint's validation record (step 0 is the
    SFT model: rewards 0, loss ln 2), per kind of pair ({kind: (SFT preference accuracy, validate's dict)}),
    its exact answers and its KL from the reference, against `before`."""
    best_record = [r for r in records if r.get("val_loss") == best_val_loss][-1]
    after = {k.removeprefix("val_"): v for k, v in best_record.items() if k.startswith("val_")}
    after["best_step"] = best_record["step"]
    after["exact"] = exact_answer_rate(best, fmt, eval_pairs, answer_tokens)
    after["kl"] = kl_estimate(best, reference_logits, fmt, eval_pairs, answer_tokens, seed)
    print(f"validation pairs, best step {best_record['step']}: reward accuracy 0 -> {after['rewards/accuracies']:.3f}, "
          f"margin 0 -> {after['rewards/margins']:.3f}, loss {records[0]['val_loss']:.4f} -> {after['loss']:.4f}")
    print(f"log pi(chosen) > log pi(rejected): SFT {before['preference_accuracy']:.3f} -> DPO {after['preference_accuracy']:.3f}; "
          f"mean log-probs: chosen {before['logps/chosen']:.2f} -> {after['logps/chosen']:.2f}, "
          f"rejected {before['logps/rejected']:.2f} -> {after['logps/rejected']:.2f}")
    for kind, (sft_accuracy, figures) in kinds.items():
        after[f"{kind or 'all'}/rewards/accuracies"] = figures["val_rewards/accuracies"]
        print(f"  {kind or 'all'} pairs: reward accuracy {figures['val_rewards/accuracies']:.3f}, margin "
              f"{figures['val_rewards/margins']:.3f}; log pi(chosen) > log pi(rejected): SFT {sft_accuracy:.3f} -> "
              f"DPO {figures['val_preference_accuracy']:.3f}")
    for kind in after["exact"]:
        print(f"greedy answer == the chosen one ({kind}, first {len(eval_pairs)} val pairs): "
              f"SFT {before['exact'].get(kind, 0):.3f} -> DPO {after['exact'][kind]:.3f}")
    print(f"KL(DPO || SFT) estimate: {after['kl']:.3f} nats per sampled answer")
    return after
