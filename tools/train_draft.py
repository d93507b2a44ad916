"""Distil the offline draft model (course_lib.draft) from the default model, on this machine's CPU.

    python tools/train_draft.py data    # 1. the target writes the training text   (seeded, ~10-20 min on 2 cores)
    python tools/train_draft.py train   # 2. train the draft on it                  (seeded, fixed steps)
    python tools/train_draft.py eval    # 3. greedy agreement with the target on data/prompts.jsonl

Step 1 builds ~500 prompts from the templates below (seeded; none is a prompt of data/prompts.jsonl,
which stays held out for measuring the draft), lets the default model answer each one greedily
(sequence-level distillation: the draft learns to predict the token the target would pick, on the
target's own text), and writes data/draft/distill.safetensors (token ids, uint16-sized) and
data/draft/prompts.jsonl. Step 2 reads that file and the target's embedding matrix and writes
data/draft/draft.safetensors (the draft's own layers, fp16) and data/draft/train_log.json (settings
and loss curve). Both steps are deterministic given the seed on one machine (thread count and CPU
type can change the last bits of floating-point sums, so a rerun elsewhere gives a close, not
bit-identical, draft).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

DRAFT_DIR = ROOT / "data" / "draft"
DATA_FILE = DRAFT_DIR / "distill.safetensors"
PROMPTS_FILE = DRAFT_DIR / "prompts.jsonl"
SEED = 0

# ---- the prompts (templates x fillers, seeded) --------------------------------------------------

CHAT = [
    "Suggest three names for a {shop}.", "What should I bring to a {event}?",
    "Give me a few tips for {activity}.", "Write a short poem about {thing}.",
    "Write a friendly message inviting my friends to a {event}.", "Tell me a fun fact about {animal}.",
    "What is a good way to spend a rainy afternoon in {place}?", "Give me a simple recipe for {dish}.",
    "How can I get better at {activity}?", "Write a haiku about {thing}.",
    "I feel stressed about {worry}. What can I do?", "Describe {animal} in three sentences.",
    "Plan a one-day trip to {place} for me.", "What are the pros and cons of {choice}?",
]
FILL = {
    "shop": ["coffee shop", "bike repair shop", "bookstore for children", "flower shop", "pet grooming salon",
             "vegan bakery", "board game cafe", "tea house"],
    "event": ["birthday picnic", "beach day", "camping weekend", "job fair", "wedding in the countryside",
              "board game night", "music festival", "family reunion"],
    "activity": ["running a first 5k", "learning to cook", "sleeping better", "public speaking",
                 "learning a new language", "saving money", "keeping houseplants alive", "writing every day",
                 "drawing portraits", "playing chess"],
    "thing": ["the first snow", "a quiet library", "an old bicycle", "morning coffee", "the ocean at night",
              "autumn leaves", "a city bus", "a lighthouse"],
    "animal": ["penguins", "honeybees", "elephants", "owls", "dolphins", "cats", "foxes", "tortoises"],
    "place": ["Paris", "Tokyo", "a small mountain village", "London", "New York", "Rome", "Barcelona", "Lisbon"],
    "dish": ["pancakes", "a tomato pasta", "a lentil curry", "banana bread", "a green salad", "fried rice",
             "guacamole", "an omelette"],
    "worry": ["an exam next week", "moving to a new city", "a difficult conversation with my boss",
              "a presentation at work", "my first day at a new job", "too many emails"],
    "choice": ["working from home", "buying an electric car", "living in a big city", "learning to code",
               "renting instead of buying a home", "getting a dog"],
}
EXPLAIN = [
    "Explain {concept} in simple terms.", "What is {concept}?", "Explain {concept} to a ten-year-old.",
    "Why does {phenomenon}? Answer in two or three sentences.", "How does {device} work?",
    "What is the difference between {pair}?", "Give a short example of {concept}.",
]
FILL_EXPLAIN = {
    "concept": ["a linked list", "recursion", "inflation", "a neural network", "the water cycle", "gravity",
                "an API", "version control", "a database index", "encryption", "supply and demand",
                "a binary search", "the immune system", "a virtual machine", "climate change", "DNS",
                "an operating system", "a black hole", "object-oriented programming", "a budget"],
    "phenomenon": ["ice float on water", "bread rise", "the moon change shape", "metal feel cold",
                   "the ocean look blue", "a balloon stick to a wall after rubbing it", "leaves change color in autumn",
                   "thunder come after lightning"],
    "device": ["a microwave oven", "a solar panel", "a bicycle gear", "GPS", "a touch screen", "a vaccine",
               "an electric motor", "a thermostat"],
    "pair": ["a virus and a bacterium", "weather and climate", "a list and a tuple in Python", "HTTP and HTTPS",
             "speed and velocity", "a compiler and an interpreter", "stocks and bonds", "CPU and GPU"],
}
CODE = [
    "Write a Python function that {task}.", "Write a JavaScript function that {task}.",
    "How do I {howto} in Python?", "Write a SQL query that {sql}.", "Explain what this Python code does:\n\n{snippet}",
]
FILL_CODE = {
    "task": ["counts the vowels in a string", "returns the largest number in a list", "checks whether a number is prime",
             "reverses the words in a sentence", "computes the factorial of n", "merges two sorted lists",
             "converts Celsius to Fahrenheit", "finds the most common word in a text", "flattens a nested list",
             "checks whether two strings are anagrams", "returns the sum of the digits of a number",
             "removes all spaces from a string"],
    "howto": ["read a text file line by line", "sort a list of dictionaries by a key", "parse a JSON string",
              "make an HTTP request", "get the current date and time", "write a list to a CSV file",
              "count items with a dictionary", "handle an exception"],
    "sql": ["finds the ten most expensive products in a table products(id, name, price)",
            "returns the average salary per department from employees(id, department, salary)",
            "lists customers who placed no orders, from customers(id, name) and orders(id, customer_id)",
            "counts the users who signed up each month from users(id, created_at)"],
    "snippet": ["def f(xs):\n    return [x * x for x in xs if x % 2 == 0]",
                "total = 0\nfor line in open('data.txt'):\n    total += len(line.split())\nprint(total)",
                "def g(s):\n    return s == s[::-1]",
                "counts = {}\nfor w in words:\n    counts[w] = counts.get(w, 0) + 1"],
}
GROUNDED = [
    "Fix the spelling mistakes in the following paragraph. Return the whole paragraph with the mistakes "
    "corrected and everything else unchanged.\n\n{typo_passage}",
    "Summarize the passage below in two sentences.\n\n{passage}",
    "Copy the first two sentences of the text below exactly as written.\n\n{passage}",
    "Rewrite the following passage as a bulleted list with one sentence per bullet. Keep every sentence "
    "exactly as written.\n\n{passage}",
    "List every noun phrase that names a person, place or thing in the passage below, one per line.\n\n{passage}",
    "Answer using only the passage: what is the main idea? Quote the sentence that says it.\n\n{passage}",
]


def _fill(templates: list[str], fill: dict[str, list[str]], rng: random.Random, n: int) -> list[str]:
    """n distinct prompts drawn (seeded) from every template-filler combination."""
    every = [t.replace("{" + k + "}", v) for t in templates for k in fill if "{" + k + "}" in t for v in fill[k]]
    return sorted(rng.sample(every, min(n, len(every))))


def _typos(text: str, rng: random.Random, rate: float = 0.06) -> str:
    """Swap two inner letters in a few longer words: the 'fix the spelling' inputs."""
    words = text.split(" ")
    for i, w in enumerate(words):
        if len(w) > 5 and w.isalpha() and rng.random() < rate:
            j = rng.randrange(1, len(w) - 2)
            words[i] = w[:j] + w[j + 1] + w[j] + w[j + 2:]
    return " ".join(words)


def first_stage_prompts(seed: int = SEED) -> list[dict]:
    """Chat, explanation and code prompts (held apart from data/prompts.jsonl)."""
    rng = random.Random(seed)
    held_out = {json.loads(l)["prompt"] for l in (ROOT / "data" / "prompts.jsonl").read_text().splitlines() if l.strip()}
    rows = ([{"category": "chat", "prompt": p} for p in _fill(CHAT, FILL, rng, 150)]
            + [{"category": "explanation", "prompt": p} for p in _fill(EXPLAIN, FILL_EXPLAIN, rng, 120)]
            + [{"category": "code", "prompt": p} for p in _fill(CODE, FILL_CODE, rng, 90)])
    return [r for r in rows if r["prompt"] not in held_out]


def _whole_sentences(text: str) -> str:
    """The text up to its last full stop (answers cut at max_new_tokens end mid-sentence)."""
    text = text.strip()
    return text[:text.rfind(".") + 1]


def grounded_prompts(passages: list[str], seed: int = SEED) -> list[dict]:
    """Tasks over the target's own explanation paragraphs: copying, editing, summarizing."""
    rng = random.Random(seed + 1)
    rows = []
    for passage in passages:
        template = rng.choice(GROUNDED)
        rows.append({"category": "grounded",
                     "prompt": template.format(passage=passage, typo_passage=_typos(passage, rng))})
    return rows


# ---- step 1: the target answers -----------------------------------------------------------------

def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int) -> list[list[int]]:
    """Greedy answers (token ids, ending at <|im_end|> when the answer finishes), batched, left padding."""
    from course_lib.generation import chat_input_ids

    stop = tokenizer.convert_tokens_to_ids("<|im_end|>")
    encoded = [chat_input_ids(tokenizer, p)[0] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))  # similar lengths: less padding
    answers: list[list[int]] = [[] for _ in prompts]
    start = time.perf_counter()
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        T = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), T), stop, dtype=torch.long)
        mask = torch.zeros((len(idx), T), dtype=torch.long)
        for row, i in enumerate(idx):  # left padding: every prompt ends at column T-1
            ids[row, T - len(encoded[i]):] = encoded[i]
            mask[row, T - len(encoded[i]):] = 1
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=stop, pad_token_id=stop)
        for row, i in enumerate(idx):
            new = out[row, T:].tolist()
            answers[i] = new[:new.index(stop) + 1] if stop in new else new
        done = b + len(idx)
        print(f"  {done}/{len(prompts)} answers, {time.perf_counter() - start:.0f} s", flush=True)
    return answers


def make_data(args) -> None:
    """Step 1: prompts -> the target's greedy answers -> data/draft/distill.safetensors."""
    from safetensors.torch import save_file

    from course_lib.generation import chat_input_ids
    from course_lib.models import load_model

    torch.manual_seed(args.seed)
    model, tokenizer, info = load_model("smollm2-135m", "cpu", torch.float32)
    rows = first_stage_prompts(args.seed)
    print(f"{info.label}: answering {len(rows)} chat/explanation/code prompts, {args.max_new_tokens} tokens max")
    answers = generate(model, tokenizer, [r["prompt"] for r in rows], args.max_new_tokens, args.batch_size)
    stop = tokenizer.convert_tokens_to_ids("<|im_end|>")
    passages = [_whole_sentences(tokenizer.decode([t for t in a if t != stop])) for r, a in zip(rows, answers)
                if r["category"] == "explanation"]
    passages = [p for p in passages if len(p) >= 200]
    grounded = grounded_prompts(passages[:args.grounded], args.seed)
    print(f"answering {len(grounded)} grounded prompts built on the target's own paragraphs")
    answers += generate(model, tokenizer, [r["prompt"] for r in grounded], args.max_new_tokens, args.batch_size)
    rows += grounded
    # One flat token stream: [prompt ids, answer ids] per example; offsets mark where each starts and
    # where its answer starts (the loss is taken on answer tokens only).
    tokens, starts, answer_starts = [], [], []
    for r, a in zip(rows, answers):
        p = chat_input_ids(tokenizer, r["prompt"])[0].tolist()
        starts.append(len(tokens))
        answer_starts.append(len(tokens) + len(p))
        tokens += p + a
        r["answer_tokens"] = len(a)
    starts.append(len(tokens))
    DRAFT_DIR.mkdir(parents=True, exist_ok=True)
    save_file({"tokens": torch.tensor(tokens, dtype=torch.int32), "starts": torch.tensor(starts, dtype=torch.int64),
               "answer_starts": torch.tensor(answer_starts, dtype=torch.int64)}, str(DATA_FILE),
              metadata={"seed": str(args.seed), "model": info.label, "max_new_tokens": str(args.max_new_tokens),
                        "decoding": "greedy"})
    PROMPTS_FILE.write_text("".join(json.dumps(r) + "\n" for r in rows))
    n_answer = sum(len(a) for a in answers)
    print(f"wrote {DATA_FILE} ({len(rows)} examples, {len(tokens)} tokens, {n_answer} answer tokens)")


# ---- step 2: train the draft ----------------------------------------------------------------------

def load_data(path: Path = DATA_FILE) -> list[tuple[torch.Tensor, int]]:
    """(token ids of prompt + answer, index where the answer starts) per example."""
    from safetensors.torch import load_file

    d = load_file(str(path))
    tokens, starts, answer_starts = d["tokens"].long(), d["starts"].tolist(), d["answer_starts"].tolist()
    return [(tokens[s:e], a - s) for s, e, a in zip(starts, starts[1:], answer_starts)]


def choose_head_ids(examples: list[tuple[torch.Tensor, int]], size: int, always: list[int]) -> torch.Tensor:
    """The `size` most frequent answer tokens (ties: lower id), plus `always` (the stop tokens);
    if the answers hold fewer distinct tokens, the lowest ids fill up (BPE ids rise as merges get rarer)."""
    counts = torch.zeros(max(int(t.max()) for t, _ in examples) + 1, dtype=torch.long)
    for t, a in examples:
        counts += torch.bincount(t[a:], minlength=len(counts))
    ranked = [i for i in sorted(range(len(counts)), key=lambda i: (-int(counts[i]), i)) if counts[i] > 0]
    chosen = list(dict.fromkeys(always + ranked))[:size]
    filler = (i for i in range(10**6) if i not in set(chosen))
    chosen += [next(filler) for _ in range(size - len(chosen))]
    return torch.tensor(sorted(chosen))


def batch(examples, idx: list[int], head_index: torch.Tensor, max_len: int):
    """Right-padded tokens (B, T) and, at each position whose next token is an answer token in the
    head, that token's head index (else -1)."""
    rows = [examples[i] for i in idx]
    T = min(max_len, max(len(t) for t, _ in rows))
    tokens = torch.zeros(len(rows), T, dtype=torch.long)
    labels = torch.full((len(rows), T), -1, dtype=torch.long)
    for r, (t, a) in enumerate(rows):
        t = t[:T]
        tokens[r, :len(t)] = t
        nxt = head_index[t[1:]]  # (len-1,): label of position j is token j+1
        nxt[:max(a - 1, 0)] = -1  # positions before the answer predict prompt tokens: no loss
        labels[r, :len(t) - 1] = nxt
    return tokens, labels


def draft_loss(draft, tokens: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy over the head vocabulary at labelled positions, and top-1 accuracy there."""
    h = draft.hidden(tokens)  # (B, T, C)
    keep = labels >= 0
    logits = draft.head_logits(h[keep])  # (N, K): the head only where there is a label
    loss = torch.nn.functional.cross_entropy(logits, labels[keep])
    return loss, (logits.argmax(-1) == labels[keep]).float().mean()


def loss_start(tokens: torch.Tensor, im_start: int) -> int:
    """First position to learn from: the user's turn (the fixed system prompt teaches nothing new)."""
    starts = (tokens == im_start).nonzero().flatten().tolist()
    return starts[1] if len(starts) > 1 else 0


def teacher_targets(target, examples, head_ids: torch.Tensor, im_start: int, topk: int, batch_size: int = 4):
    """The target's next-token distribution at every position from the user's turn on, restricted to
    the head vocabulary and renormalized, kept as its top-k (head indices (N, k), probabilities (N, k))
    per example. One forward pass of the target over the data (no generation)."""
    W = target.embed_tokens.weight[head_ids]  # (K, C): the tied head's rows for the head vocabulary
    out = [None] * len(examples)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))
    with torch.inference_mode():
        for b in range(0, len(order), batch_size):
            idx = order[b:b + batch_size]
            T = max(len(examples[i][0]) for i in idx)
            tokens = torch.zeros(len(idx), T, dtype=torch.long)
            for r, i in enumerate(idx):
                tokens[r, :len(examples[i][0])] = examples[i][0]  # right padding: earlier positions unaffected
            pos = torch.arange(T)
            cos, sin = target.rope(pos)
            x = target.embed_tokens(tokens)
            for layer in target.layers:
                x = layer(x, cos, sin, pos)
            logp = torch.log_softmax(target.norm(x) @ W.T, dim=-1)  # (B, T, K): no 49,152-wide matmul
            for r, i in enumerate(idx):
                t = examples[i][0]
                s = loss_start(t, im_start)
                top = logp[r, s:len(t) - 1].topk(topk, dim=-1)  # position j predicts token j+1
                probs = top.values.exp()
                out[i] = (top.indices.to(torch.int16 if len(head_ids) < 2**15 else torch.int32),
                          (probs / probs.sum(-1, keepdim=True)).half())
    return out


def distill_batch(examples, teacher, idx: list[int], im_start: int):
    """Right-padded tokens (B, T), the mask of positions with a teacher target, and the targets
    (N, k) indices and probabilities in the same row-major order as hidden[mask]."""
    T = max(len(examples[i][0]) for i in idx)
    tokens = torch.zeros(len(idx), T, dtype=torch.long)
    mask = torch.zeros(len(idx), T, dtype=torch.bool)
    for r, i in enumerate(idx):
        t = examples[i][0]
        tokens[r, :len(t)] = t
        mask[r, loss_start(t, im_start):len(t) - 1] = True
    top_idx = torch.cat([teacher[i][0] for i in idx]).long()
    top_p = torch.cat([teacher[i][1] for i in idx]).float()
    return tokens, mask, top_idx, top_p


def distill_loss(draft, tokens, mask, top_idx, top_p) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy from the target's (top-k) distribution to the draft's, and top-1 agreement."""
    logq = torch.log_softmax(draft.head_logits(draft.hidden(tokens)[mask]), dim=-1)  # (N, K)
    loss = -(top_p * logq.gather(1, top_idx)).sum(-1).mean()
    return loss, (logq.argmax(-1) == top_idx[:, 0]).float().mean()


def train(args) -> None:
    """Step 2: fixed number of AdamW steps on the distillation data -> data/draft/draft.safetensors."""
    from course_lib.draft import DRAFT_FILE, DraftConfig, init_from_target, save_draft
    from course_lib.env import hardware_stamp
    from course_lib.models import load_model
    from course_lib.transformer import Transformer

    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    hf_model, tokenizer, info = load_model("smollm2-135m", "cpu", torch.float32)
    target = Transformer.from_hf(hf_model)
    del hf_model
    examples = load_data(args.data)
    rng.shuffle(examples)
    n_val = max(8, len(examples) // 20)
    val, examples = examples[:n_val], examples[n_val:]
    from course_lib.generation import stop_token_ids

    config = DraftConfig(num_layers=len(args.init_layers), head_vocab=args.head_vocab,
                         init_layers=tuple(args.init_layers))
    head_ids = choose_head_ids(examples, config.head_vocab, stop_token_ids(tokenizer))
    head_index = torch.full((target.config.vocab_size,), -1, dtype=torch.long)
    head_index[head_ids] = torch.arange(len(head_ids))
    answer_tokens = torch.cat([t[a:] for t, a in examples])
    coverage = float((head_index[answer_tokens] >= 0).float().mean())
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    t0 = time.perf_counter()
    # The teacher pass is the slow part on a CPU (~13 TFLOP); keep its result outside the repository.
    from course_lib.models import cache_dir

    key = f"draft_teacher_s{args.seed}_k{args.topk}_v{config.head_vocab}_{DATA_FILE.stat().st_size if args.data == DATA_FILE else args.data.stat().st_size}.pt"
    cached = cache_dir() / key
    if cached.is_file():
        teacher = torch.load(cached)
    else:
        teacher = teacher_targets(target, examples, head_ids, im_start, args.topk)
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.save(teacher, cached)
    teacher_seconds = time.perf_counter() - t0
    print(f"teacher pass: top-{args.topk} targets at {sum(len(t[0]) for t in teacher)} positions, {teacher_seconds:.0f} s")
    draft = init_from_target(target, config, head_ids)
    del target
    with torch.no_grad():  # the target's final norm is tuned for layer 30's output; from layer 2 its
        draft.norm.weight.mul_(args.norm_scale)  # logits come out too large (initial loss 17 vs 7 at 0.25)
    draft.train()
    params = [p for p in draft.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    print(f"draft: {config}, {draft.num_parameters() / 1e6:.2f} M own parameters; {len(examples)} train / "
          f"{len(val)} validation examples; head covers {coverage:.1%} of answer tokens")

    def evaluate() -> tuple[float, float]:
        draft.eval()
        with torch.no_grad():
            out = [draft_loss(draft, *batch(val, [i], head_index, args.max_len)) for i in range(len(val))]
        draft.train()
        return sum(float(l) for l, _ in out) / len(out), sum(float(a) for _, a in out) / len(out)

    log = {"settings": {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "step"},
                        "draft_config": str(config),
                        "train_examples": len(examples), "val_examples": len(val), "head_coverage": coverage,
                        "own_parameters": draft.num_parameters(), "hardware": hardware_stamp().short(),
                        "teacher_seconds": round(teacher_seconds, 1),
                        "torch_threads": torch.get_num_threads()},
           "steps": [], "val": []}
    loss0, acc0 = evaluate()
    log["val"].append({"step": 0, "loss": loss0, "top1_agreement": acc0})
    print(f"step 0: validation loss {loss0:.3f}, top-1 agreement with the target {acc0:.1%}")
    start = time.perf_counter()
    order: list[int] = []
    seen_tokens = 0
    for step in range(1, args.steps + 1):
        lr = args.lr * min(1.0, step / args.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
        for group in opt.param_groups:
            group["lr"] = lr
        if len(order) < args.batch:  # epochs: a fresh seeded shuffle each time
            order += rng.sample(range(len(examples)), len(examples))
        idx, order = order[:args.batch], order[args.batch:]
        loss, acc = distill_loss(draft, *distill_batch(examples, teacher, idx, im_start))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        seen_tokens += sum(len(examples[i][0]) for i in idx)
        log["steps"].append({"step": step, "loss": round(loss.item(), 4), "top1": round(acc.item(), 4),
                             "lr": lr, "seconds": round(time.perf_counter() - start, 1)})
        if step % args.eval_every == 0 or step == args.steps:
            vl, va = evaluate()
            log["val"].append({"step": step, "loss": vl, "top1_agreement": va})
            elapsed = time.perf_counter() - start
            print(f"step {step}: train loss {loss.item():.3f}, validation loss {vl:.3f}, agreement {va:.1%}, "
                  f"{elapsed:.0f} s, {seen_tokens / elapsed:.0f} tokens/s", flush=True)
    log["train_seconds"] = round(time.perf_counter() - start, 1)
    draft.eval()
    meta = {"seed": str(args.seed), "steps": str(args.steps), "val_top1_agreement": f"{log['val'][-1]['top1_agreement']:.4f}",
            "distilled_from": info.label}
    path = save_draft(draft, args.out or DRAFT_DIR / DRAFT_FILE, meta)
    log_path = path.with_name("train_log.json")
    log_path.write_text(json.dumps(log, indent=1) + "\n")
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB) and {log_path}")


# ---- step 3: how often would the target accept the draft's guesses? --------------------------------

REFS_FILE = DRAFT_DIR / "eval_refs.json"


def greedy_refs(target, tokenizer) -> dict:
    """The target's greedy answers to data/prompts.jsonl (48 new tokens, 96 for grounded prompts),
    computed once and kept in data/draft/eval_refs.json."""
    from course_lib.generation import chat_input_ids, stop_token_ids
    from course_lib.kv_cache import generate_cached

    if REFS_FILE.is_file():
        return json.loads(REFS_FILE.read_text())
    refs = {}
    for line in (ROOT / "data" / "prompts.jsonl").read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            ids = chat_input_ids(tokenizer, r["prompt"])
            n = 96 if r["category"] == "grounded" else 48
            refs[r["id"]] = {"category": r["category"], "prompt": ids[0].tolist(),
                             "answer": generate_cached(target, ids, n, stop_ids=stop_token_ids(tokenizer))}
    REFS_FILE.write_text(json.dumps(refs) + "\n")
    return refs


def simulated_calls(hits: list[bool], gamma: int) -> int:
    """Target calls greedy speculation needs for an answer, from whether the draft's guess for each
    answer token (given the true prefix) is right: accepted guesses are always right, so the draft
    then sees exactly the true prefix, and teacher-forced predictions give the exact run."""
    i, calls = 1, 0  # answer token 0 comes from the prefill
    while i < len(hits):
        n = 0
        while n < gamma and i + n < len(hits) and hits[i + n]:
            n += 1
        i, calls = i + n + 1, calls + 1
    return calls


def evaluate(args) -> None:
    """Step 3: greedy agreement and simulated tokens per target call on the held-out course prompts."""
    from course_lib.draft import load_draft
    from course_lib.models import load_model
    from course_lib.transformer import Transformer

    hf_model, tokenizer, _ = load_model("smollm2-135m", "cpu", torch.float32)
    target = Transformer.from_hf(hf_model)
    refs = greedy_refs(target, tokenizer)
    draft = load_draft(target, args.out)
    by_cat: dict[str, list] = {}
    for r in refs.values():
        seq = torch.tensor([r["prompt"] + r["answer"]])
        with torch.inference_mode():
            guess = draft(seq[:, :-1])[0].argmax(-1)[len(r["prompt"]) - 1:]  # guess for each answer token
        hits = (guess == torch.tensor(r["answer"])).tolist()
        by_cat.setdefault(r["category"], []).append((hits, simulated_calls(hits, args.gamma)))
    print(f"draft {args.out or 'data/draft/draft.safetensors'}, gamma {args.gamma}, greedy, held-out prompts:")
    for cat, rows in sorted(by_cat.items()) + [("all", [x for rows in by_cat.values() for x in rows])]:
        hits = [h for hs, _ in rows for h in hs[1:]]
        tokens, calls = sum(len(hs) - 1 for hs, _ in rows), sum(c for _, c in rows)
        print(f"  {cat:12} agreement {sum(hits) / len(hits):.1%}, tokens per target call {tokens / calls:.2f} "
              f"({len(rows)} prompts)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=["data", "train", "eval"])
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--max-new-tokens", type=int, default=128, help="data: answer length cap")
    parser.add_argument("--batch-size", type=int, default=16, help="data: prompts answered together")
    parser.add_argument("--grounded", type=int, default=100, help="data: grounded prompts")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--init-layers", type=int, nargs="+", default=[0, 1],
                        help="train: target layers copied into the draft (one draft layer each)")
    parser.add_argument("--head-vocab", type=int, default=8192, help="train: output head size")
    parser.add_argument("--steps", type=int, default=200, help="train: optimizer steps")
    parser.add_argument("--batch", type=int, default=8, help="train: examples per step")
    parser.add_argument("--lr", type=float, default=3e-3, help="train: peak learning rate")
    parser.add_argument("--warmup", type=int, default=20, help="train: linear warm-up steps")
    parser.add_argument("--max-len", type=int, default=1024, help="train/validation: tokens per example at most")
    parser.add_argument("--topk", type=int, default=16, help="train: teacher probabilities kept per position")
    parser.add_argument("--norm-scale", type=float, default=0.25, help="train: initial scale of the final norm")
    parser.add_argument("--eval-every", type=int, default=50, help="train: validation interval (steps)")
    parser.add_argument("--data", type=Path, default=DATA_FILE, help="train: distillation data file")
    parser.add_argument("--out", type=Path, default=None, help="train/eval: the draft file")
    parser.add_argument("--gamma", type=int, default=4, help="eval: guesses per target call")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    {"data": make_data, "train": train, "eval": evaluate}[args.step](args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
