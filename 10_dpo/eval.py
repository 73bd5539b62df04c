"""What a DPO run reports at its end, besides the logged loss and rewards: per kind of pair, the answers the model
gives on its own, and how far it moved from the SFT model.

    reward accuracy per kind  = share of the kind's validation pairs with r(x, y_w) > r(x, y_l)
    exact-answer rate         = greedy answers equal to the chosen one / prompts, per kind (speaker, continue)
    KL estimate               = mean over prompts x of  sum_t KL( pi(. | x, y_<t) || pi_ref(. | x, y_<t) ),  y ~ pi(. | x)

The rewards only compare two given answers; the exact answers ask what the model says on its own; the KL is
what beta prices (notes.md §1), along the policy's own sampled answers (§5). Used by dpo.py.
"""

from collections import Counter
from importlib import import_module

import torch
import torch.nn.functional as F

generate = import_module("06_model.generate")
train = import_module("07_pretrain_ddp.train")  # IGNORE
sft = import_module("08_sft.sft")  # collate
data = import_module("10_dpo.data")  # prompt_chunks: the prompts that leave room for an answer


def exact_answer_rate(model, fmt, pairs: list, max_new_tokens: int) -> dict:
    """{kind: share of greedy answers (up to </s>) that are exactly the chosen answer}, over `pairs`."""
    hits, totals = Counter(), Counter()
    for chunk in data.prompt_chunks(model, fmt, pairs, max_new_tokens):
        for (p, _), new in zip(chunk, generate.generate(model, [ids for _, ids in chunk], max_new_tokens, stop_id=fmt.eot_id)):
            totals[p.kind or "all"] += 1
            hits[p.kind or "all"] += new[-1:] == [fmt.eot_id] and fmt.tokenizer.decode(new[:-1]) == p.chosen
    return {kind: hits[kind] / totals[kind] for kind in sorted(totals)}


@torch.no_grad()
def kl_estimate(policy, reference, fmt, pairs: list, max_new_tokens: int, seed: int = 0) -> float:
    """KL(pi || pi_ref) per answer, in nats, on the pairs' prompts, along answers the policy samples at temperature 1."""
    device, total, n = policy.tok_embeddings.weight.device, 0.0, 0
    generator = torch.Generator(device).manual_seed(seed)
    for chunk in data.prompt_chunks(policy, fmt, pairs, max_new_tokens):
        prompts = [ids for _, ids in chunk]
        answers = generate.generate(policy, prompts, max_new_tokens, temperature=1.0, stop_id=fmt.eot_id, generator=generator)
        rows = [(p + a, [False] * len(p) + [True] * len(a)) for p, a in zip(prompts, answers)]
        x, y = (t.to(device) for t in sft.collate(rows, fmt.eot_id))  # (B, T): targets are the answers' tokens
        logp = F.log_softmax(policy(x)[0].float(), dim=-1)  # (B, T, vocab)
        logq = F.log_softmax(reference(x)[0].float(), dim=-1)  # (B, T, vocab)
        kl = (logp.exp() * (logp - logq)).sum(-1)  # (B, T): the exact KL of each next-token distribution
        total, n = total + (kl * (y != train.IGNORE)).sum().item(), n + len(rows)  # summed over the answers' positions
    return total / max(1, n)


def sft_figures(model, fmt, kept: list, ref: torch.Tensor, cfg: dict) -> dict:
    """The SFT model's figures before the first step: its exact answers, and from its log-probs of the validation
    pairs (ref (N, 2)) how often the chosen answer is the likelier one."""
    return {"exact": exact_answer_rate(model, fmt, kept[: cfg["eval_prompts"]], cfg["answer_tokens"]),
            "preference_accuracy": (ref[:, 0] > ref[:, 1]).float().mean().item(),
            "logps/chosen": ref[:, 0].mean().item(), "logps/rejected": ref[:, 1].mean().item()}


def report(cfg: dict, best, reference, fmt, val: tuple, records: list, best_val_loss: float, before: dict) -> dict:
    """Print and return the best checkpoint's closing figures against `before` (sft_figures): its validation record,
    its figures per kind of pair, its exact answers and its KL from the reference. val = (pairs, ref (N, 2), logps (N, 2))."""
    kept, ref, logps = val
    best_record = [r for r in records if r.get("val_loss") == best_val_loss][-1]
    after = {k.removeprefix("val_"): v for k, v in best_record.items() if k.startswith("val_")}
    pairs = kept[: cfg["eval_prompts"]]
    after.update(best_step=best_record["step"], exact=exact_answer_rate(best, fmt, pairs, cfg["answer_tokens"]),
                 kl=kl_estimate(best, reference, fmt, pairs, cfg["answer_tokens"], cfg["seed"]))
    print(f"validation pairs, best step {best_record['step']}: reward accuracy 0 -> {after['rewards/accuracies']:.3f}, "
          f"margin 0 -> {after['rewards/margins']:.3f}, loss {records[0]['val_loss']:.4f} -> {after['loss']:.4f}")
    print(f"log pi(chosen) > log pi(rejected): SFT {before['preference_accuracy']:.3f} -> DPO {after['preference_accuracy']:.3f}; "
          f"mean log-probs: chosen {before['logps/chosen']:.2f} -> {after['logps/chosen']:.2f}, "
          f"rejected {before['logps/rejected']:.2f} -> {after['logps/rejected']:.2f}")
    rewards = cfg["beta"] * (logps - ref)  # (N, 2): dpo.py's implicit rewards of each chosen and rejected answer
    for kind in sorted({p.kind for p in kept}):  # which preferences were learnt
        i = torch.tensor([k for k, p in enumerate(kept) if p.kind == kind])
        (r_w, r_l), (w, l), (ref_w, ref_l) = rewards[i].T, logps[i].T, ref[i].T  # each (n,)
        after[f"{kind or 'all'}/rewards/accuracies"] = accuracy = (r_w > r_l).double().mean().item()
        print(f"  {kind or 'all'} pairs: reward accuracy {accuracy:.3f}, margin {(r_w - r_l).double().mean().item():.3f}; "
              f"log pi(chosen) > log pi(rejected): SFT {(ref_w > ref_l).double().mean().item():.3f} -> "
              f"DPO {(w > l).double().mean().item():.3f}")
    for kind in after["exact"]:
        print(f"greedy answer == the chosen one ({kind}, first {len(pairs)} val pairs): "
              f"SFT {before['exact'].get(kind, 0):.3f} -> DPO {after['exact'][kind]:.3f}")
    print(f"KL(DPO || SFT) estimate: {after['kl']:.3f} nats per sampled answer")
    return after
