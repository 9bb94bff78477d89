"""`specserve train-drafter`: train an EAGLE head or Medusa heads by self-distillation on this CPU.

1. Prompts are synthesized from task templates and topics written here (no dataset is
   downloaded, and none of them is a Spec-Bench question): writing, explanation,
   questions, roleplay, advice, reasoning, arithmetic, code, lists, rewriting,
   translation, and summarizing, extracting from, translating and answering questions
   about passages the target wrote itself. With `--self-instruct N`, N more requests are
   written by the target itself: shown four examples of a kind of request (a few-shot
   list written here), it samples a fifth (self-instruct), which widens the prompts far
   beyond the templates.
2. The target answers them greedily (batched, plain decoding) through its chat template.
3. One target forward per sample gives its features (final hidden states).
4. An EAGLE head learns to predict the next feature (smooth L1) and the target's next
   token (cross-entropy over the draft vocabulary: the tokens the target emitted most),
   with noise on its input features, for a few epochs. Medusa head k learns the token
   k + 1 positions after each feature (cross-entropy over the same draft vocabulary).

Everything after step 1 is cached in OUT: the generated samples and features
(`data.pt`) and a checkpoint per epoch (`checkpoint.pt`), so a stopped run resumes
where it was. The head is written to OUT (`config.json`, `head.safetensors`).
"""

from __future__ import annotations

import math
import os
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from specserve.model import native
from specserve.model.layers import UnrolledBatch
from specserve.spec.eagle import EagleHead, save_head
from specserve.spec.heads import lm_head_weight, read_head_dir

TOPICS = (
    "volcanoes", "honeybees", "the printing press", "solar panels", "coral reefs", "the Roman roads", "jazz",
    "bread baking", "black holes", "the immune system", "glaciers", "chess openings", "public libraries",
    "electric bicycles", "the water cycle", "origami", "ancient Egypt", "vaccines", "wind turbines", "octopuses",
    "the stock market", "recycling plastics", "the Silk Road", "earthquakes", "photosynthesis", "urban gardens",
    "the first airplanes", "tea ceremonies", "sleep", "the Moon landing", "rainforests", "3D printing",
    "lighthouses", "bird migration", "inflation", "the human heart", "cryptography", "the Olympic Games",
    "deserts", "composting", "submarines", "the violin", "pandas", "typhoons", "the internet", "mushrooms",
    "the Renaissance", "batteries", "marathon training", "penguins", "the periodic table", "trains",
    "time zones", "cheese making", "the Great Wall", "rainbows", "nuclear fusion", "ants", "board games",
    "remote work", "climate change", "the printing of money", "dinosaurs", "mountain climbing", "robots",
    "the Amazon river", "museums", "vitamins", "satellites", "coffee", "the French Revolution", "whales",
    "bridges", "handwriting", "electric cars", "the ocean tides", "pottery", "antibiotics", "space stations",
    "the metric system", "film photography", "desert plants", "lightning", "the Vikings", "wool",
    "the microscope", "city parks", "hurricanes", "sourdough", "the compass", "language learning",
    "rivers", "the bicycle", "meditation", "wolves", "the telephone", "snowflakes", "castles", "spices",
)
NAMES = ("Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ivo", "Jade", "Kofi", "Lena", "Mateo")
TASKS = (
    "Write a short story about {topic}.",
    "Explain {topic} to a ten-year-old.",
    "Give me five interesting facts about {topic}.",
    "Write a poem about {topic}.",
    "What are the pros and cons of {topic}?",
    "Describe the history of {topic} in a few paragraphs.",
    "Write a blog post introduction about {topic}.",
    "How would you teach a class about {topic}? Give a lesson plan.",
    "Write an email to a friend recommending a book about {topic}.",
    "List common misconceptions about {topic} and correct them.",
    "Compare {topic} and {other}.",
    "What would happen if {topic} disappeared tomorrow?",
    "Write a dialogue between {name} and {name2} about {topic}.",
    "Give step-by-step advice for someone who wants to learn about {topic}.",
    "Write a product description for a book titled 'All About {Topic}'.",
    "Summarize what scientists know about {topic} in three sentences.",
    "Write a haiku about {topic}, then explain it.",
    "Create a quiz with three questions about {topic}, with answers.",
    "Write a persuasive essay arguing that every school should teach {topic}.",
    "Write a travel blog post about a trip that was all about {topic}.",
    "Write a short speech for a graduation ceremony that mentions {topic}.",
    "Write a limerick about {topic}.",
    "Write a news report about a surprising discovery involving {topic}.",
)
QUESTIONS = (
    "What is the difference between {topic} and {other}?",
    "Why is {topic} important for society?",
    "How does {topic} work? Explain the main principles.",
    "Who were the key people in the history of {topic}, and what did they do?",
    "What questions about {topic} do researchers still argue about?",
    "Discuss the cultural impact of {topic} in different countries.",
    "What ethical issues does {topic} raise?",
    "How did {topic} change everyday life in the twentieth century?",
    "What should a beginner read first to understand {topic}?",
    "What is {topic}? Answer in one paragraph.",
)
ROLEPLAY = (
    "Pretend you are a {job} and describe your typical working day to {name}.",
    "You are a tour guide in a museum about {topic}. Greet the visitors and describe the first room.",
    "Act as a customer support agent. {name} is upset that a book about {topic} arrived late. Reply politely.",
    "Imagine you are {name}, a scientist who has just learned something new about {topic}. Give a short press statement.",
    "Role-play a job interview: you are hiring a {job}. Ask five questions and explain why you ask each.",
    "You are a friendly robot teaching children about {topic}. Introduce yourself and the subject.",
    "Stay in character as a pirate captain and tell your crew about {topic}.",
    "You are a {job} giving advice to {name}, who wants to start a hobby related to {topic}. What do you say?",
)
JOBS = ("chef", "firefighter", "librarian", "pilot", "nurse", "farmer", "software engineer", "teacher", "architect",
        "marine biologist", "journalist", "carpenter", "lawyer", "photographer")
MATH = (
    ("{name} reads {a} pages on Monday and twice as many on Tuesday. The book has {e} pages. How many pages are "
    "left? Think step by step."),
    "A bakery sells {a} loaves a day at {b} dollars each. How much does it earn in {c} days? Show the steps.",
    "{name} saves {b} dollars every week. How many weeks until {name} has {e} dollars? Explain.",
    "Solve for x: {a}x + {b} = {e}. Explain each step.",
    "What is {c} percent of {e}? Explain how to compute it.",
    "A class has {a} students and {c} of them are absent. What fraction of the class is present? Simplify it.",
    "{name} buys {c} notebooks at {b} dollars each and pays with {e} dollars. How much change is there?",
)
LANGUAGES = ("French", "Spanish", "German", "Italian", "Portuguese")
SENTENCES = (
    "The museum about {topic} opens at nine in the morning.",
    "My friend {name} wrote a long book about {topic}.",
    "Could you tell me where I can learn about {topic}?",
    "Yesterday we talked about {topic} for two hours.",
    "Many people think that {topic} is difficult, but it is not.",
)
TRANSLATE = tuple(f'Translate into {{lang}}: "{sentence}"' for sentence in SENTENCES) + (
    "How do you say \"I love {topic}\" in {lang}? Give two ways.",
)
REASONING = (
    ("{name} has {a} apples and buys {b} more, then gives {c} to {name2}. How many apples does {name} have? "
     "Explain your reasoning."),
    "A train travels {a} kilometers in {b} hours. What is its average speed? Show the steps.",
    "What is {a} times {b}, plus {c}? Show your work.",
    "If a shirt costs {a} dollars and is discounted by {c} percent, what is the new price?",
    "{name} is older than {name2}, and {name2} is older than {name3}. Who is the youngest? Explain.",
    "A rectangle is {a} cm wide and {b} cm long. What are its area and perimeter?",
    "Is {a} a prime number? Explain how you check.",
)
CODE = (
    "Write a Python function that returns the {n}th Fibonacci number, with a docstring.",
    "Write a Python function that checks whether a string is a palindrome, and explain it.",
    "Write a Python function that counts the words in a text and returns the {n} most common ones.",
    "Write a Python class for a bank account with deposit and withdraw methods.",
    "Write a SQL query that finds the {n} customers with the highest total orders.",
    "Explain what this Python code does: `print(sum(x * x for x in range({n})))`",
    "Write a JavaScript function that removes duplicates from an array.",
    "Write a Python function that sorts a list of dictionaries by the key '{key}'.",
    "Write a bash command that counts the lines of every .txt file in a folder.",
    "Fix the bug in this Python code: `def add(a, b): return a - b`",
)
REWRITE = (
    "Rewrite this sentence in a formal tone: \"{name} can't come to the meeting about {topic} because she's sick.\"",
    "Translate into French: \"I would like to learn more about {topic}.\"",
    "Correct the grammar: \"{name} have went to the museum about {topic} yesterday and they was happy.\"",
    "Make this sentence shorter: \"In my personal opinion, I think that {topic} is a very interesting subject.\"",
)
PASSAGE_TASKS = (
    "Summarize the following text in two sentences.\n\n{passage}",
    "Read the text and answer: what is the main idea?\n\n{passage}",
    "Extract the key facts from this text as a bulleted list.\n\n{passage}",
    "Based on the following article, write three questions a student might ask, with answers.\n\n{passage}",
    "{passage}\n\nWhat does the text above say about {topic}? Quote the relevant sentence.",
    "Rewrite the following text for a young reader.\n\n{passage}",
    "Translate the following text into {lang}.\n\n{passage}",
    "List every number in the text below and say what it refers to.\n\n{passage}",
    ("Extract the people, places and things the text mentions, as JSON with the keys \"people\", \"places\" and "
    "\"things\".\n\n{passage}"),
    ("Answer using only the documents below.\n\nDocument 1:\n{passage}\n\nDocument 2:\n{passage2}\n\n"
    "Question: what do the documents say about {topic}?"),
    "Write a title and a one-sentence abstract for this text.\n\n{passage}",
)


# Few-shot pools for self-instruct prompts: the target, shown four of these, writes a fifth request
# of its own (sampled). Written for this project; none is a Spec-Bench question.
SELF_INSTRUCT_POOLS = {
    "Questions and requests that people sent to an AI assistant": (
        "How can I improve my time management skills?",
        "Write a letter to my landlord asking to fix the heating.",
        "What causes the seasons on Earth?",
        "Give me a recipe for a vegetarian lasagna.",
        "Explain the difference between a virus and a bacterium.",
        "Tell me a story about a lost dog who finds its way home.",
        "What should I pack for a week of hiking in the mountains?",
        "Why do cats purr?",
        "Help me plan a birthday party for a seven-year-old.",
        "What are some good habits for learning a new language?",
    ),
    "Writing tasks that users gave a writing assistant": (
        "Write a short poem about the first snow of winter.",
        "Draft a thank-you note to a teacher who helped me pass chemistry.",
        "Write the opening paragraph of a mystery novel set on a train.",
        "Write a product description for a waterproof backpack.",
        "Compose a cover letter for a job as a barista.",
        "Write a funny toast for my brother's wedding.",
        "Write a review of an imaginary restaurant that serves only soup.",
        "Write a motivational message for a team before a big deadline.",
        "Write a fairy tale about a clockmaker and a talking owl.",
        "Write an announcement that the office will close early on Friday.",
    ),
    "Knowledge questions from students": (
        "How do vaccines train the immune system?",
        "What was the main cause of the fall of the Western Roman Empire?",
        "Why is the sky blue?",
        "What is the role of mitochondria in a cell?",
        "How does a bill become a law in a parliament?",
        "What is the difference between weather and climate?",
        "Who invented the telescope, and how did it change astronomy?",
        "What does GDP measure, and what does it leave out?",
        "How do tides depend on the Moon?",
        "What is supply and demand?",
    ),
    "Math and logic problems from a homework help forum": (
        "A recipe needs 3 eggs for 12 cookies. How many eggs are needed for 30 cookies?",
        "If a car uses 6 liters of fuel per 100 km, how much fuel does it need for 250 km?",
        "Tom is twice as old as his sister. In 5 years the sum of their ages will be 40. How old are they now?",
        "What is the probability of rolling two sixes with two dice?",
        "A shop sells pens at 3 for 2 dollars. How much do 18 pens cost?",
        "Find the area of a circle with a radius of 7 cm.",
        "Three friends share a bill of 84 dollars and a tip of 15 percent. How much does each pay?",
        "A tank fills in 6 hours with one pipe and 3 hours with another. How long with both?",
        "What is the next number in the sequence 2, 6, 12, 20, 30?",
        "Simplify the fraction 84/126.",
    ),
    "Programming questions from developers": (
        "How do I read a CSV file in Python and compute the average of one column?",
        "Write a function in JavaScript that debounces another function.",
        "What is the difference between a list and a tuple in Python?",
        "Write a SQL query that returns the second highest salary.",
        "How do I reverse a linked list in C?",
        "Explain what a race condition is, with an example.",
        "Write a Python function that merges two sorted lists.",
        "How can I make an HTTP request in Go?",
        "What does the 'static' keyword mean in Java?",
        "Write a regular expression that matches an email address.",
    ),
    "Role-play requests that users sent to a chatbot": (
        "Pretend you are a medieval knight and describe your armor.",
        "Act as my personal trainer and give me a workout for today.",
        "You are a detective. Interrogate me about the missing necklace.",
        "Be a travel agent and sell me a trip to Iceland.",
        "Pretend to be a grumpy cat explaining why you knocked the vase over.",
        "Act as a job interviewer for a marketing position and ask me the first question.",
        "You are an astronaut on Mars. Describe your morning.",
        "Play the role of a wise old librarian recommending a book.",
        "Act like a sports commentator describing a chess game.",
        "Pretend you are a chef on a cooking show making pancakes.",
    ),
    "Requests to rewrite, extract or classify text": (
        "Rewrite this sentence to sound more polite: 'Send me the report now.'",
        "Extract all the dates from this text: 'We met on May 3 and again on June 10, 2021.'",
        "Classify the sentiment of this review: 'The battery died after two days.'",
        "Turn these notes into a paragraph: meeting moved, budget approved, hire two people.",
        "Correct the spelling: 'Their going too the libary tomorow.'",
        "Summarize in one sentence: 'The city council voted to build a new park next to the river.'",
        "Convert this list into a table with columns name and age: Ana 31, Ben 25, Chen 40.",
        "Translate to Spanish: 'Where is the train station?'",
        "Give three synonyms for 'happy'.",
        "Make this paragraph shorter without losing its meaning: 'Due to the fact that it was raining, we decided that we would stay inside.'",
    ),
}
SELF_INSTRUCT_EXAMPLES = 4  # examples shown per request


def synth_prompts(n: int, seed: int = 0) -> list[str]:
    """`n` distinct single-turn prompts from the templates above (passage tasks are added later)."""
    rng = random.Random(seed)
    groups = (TASKS, TASKS, QUESTIONS, ROLEPLAY, REASONING, MATH, CODE, REWRITE, TRANSLATE)
    out: dict[str, None] = {}
    for _ in range(100 * n):
        if len(out) == n:
            break
        template = rng.choice(rng.choice(groups))
        topic, other = rng.sample(TOPICS, 2)
        name, name2, name3 = rng.sample(NAMES, 3)
        out[template.format(
            topic=topic, Topic=topic.title(), other=other, name=name, name2=name2, name3=name3,
            a=rng.randint(2, 90), b=rng.randint(2, 30), c=rng.randint(1, 20), n=rng.randint(3, 12),
            e=rng.randint(100, 900), job=rng.choice(JOBS), lang=rng.choice(LANGUAGES),
            key=rng.choice(("name", "age", "price", "date")),
        )] = None
    return list(out)


@dataclass
class TrainConfig:
    prompts: int = 640
    self_instruct: int = 0  # more prompts written by the target itself (`self_instruct_prompts`)
    passage_fraction: float = 0.3  # share of extra prompts built on the target's own passages
    max_tokens: int = 256
    epochs: int = 6
    batch_size: int = 8
    lr: float = 1e-3
    draft_vocab: int = 8192
    noise: float = 0.1  # std of the noise on input features, relative to their std
    cls_weight: float = 0.1
    unroll: int = 3  # training-time test: depths 2.. read the head's own guesses, attend as drafting does
    feature_layers: tuple[int, ...] = ()  # EAGLE: target layers read beside the final hidden state (EAGLE-3)
    init: str | None = None  # EAGLE: start from this head directory (its draft vocabulary), not from scratch
    seed: int = 0
    batch_generate: int = 32  # requests in flight while generating the data
    kind: str = "eagle"  # eagle | medusa
    medusa_heads: int = 4  # Medusa: heads (head k guesses the k-th token after the next)
    medusa_layers: int = 1  # Medusa: residual blocks per head


def _progress(iterable=None, **kw):
    from tqdm.auto import tqdm

    return tqdm(iterable, file=sys.stderr, **kw)


def _generate(llm, prompts: list[str], max_tokens: int, batch: int, desc: str) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, greedy output ids) per prompt, through the chat template."""
    from specserve.sampling.params import SamplingParams

    ids = [llm.chat_prompt([{"role": "user", "content": p}]) for p in prompts]
    return _run_requests(llm, ids, [SamplingParams(max_tokens=max_tokens)] * len(ids), batch, desc)


def _run_requests(llm, ids: list[list[int]], params: list, batch: int, desc: str) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, output ids) per request, with `batch` requests in flight (continuous
    batching: a finished request's slot takes the next one)."""
    engine = llm.engine
    seqs: list = [None] * len(ids)
    bar = _progress(total=len(ids), desc=desc, unit="prompt")
    nxt, live = 0, []
    try:
        while nxt < len(ids) or live:
            while nxt < len(ids) and len(live) < batch:
                seqs[nxt] = engine.add_request(ids[nxt], params[nxt])
                live.append(seqs[nxt])
                nxt += 1
            engine.step()
            done = [s for s in live if s.finished]
            for s in done:
                live.remove(s)
                engine.requests.pop(s.request_id, None)
            bar.update(len(done))
    finally:
        for s in live:
            engine.abort(s.request_id)
            engine.requests.pop(s.request_id, None)
        bar.close()
    return [(p, list(s.output_ids)) for p, s in zip(ids, seqs)]


def _self_instruct_request(text: str, examples: set[str]) -> str | None:
    """The request in a sampled list item, or None when it is not a usable one."""
    line = text.split("\n", 1)[0].strip().strip('"').strip()
    words = line.split()
    if not 16 <= len(line) <= 400 or len(words) < 4 or line.lower() in examples:
        return None
    if not line[0].isalpha() or line[-1] not in ".?!'\")" or "http" in line:
        return None
    return line


def self_instruct_prompts(llm, n: int, seed: int = 0, batch: int = 32, exclude: Sequence[str] = ()) -> list[str]:
    """`n` distinct requests written by the target itself (self-instruct).

    Each request shows the target, as raw text without the chat template, a heading and four
    numbered examples from one of `SELF_INSTRUCT_POOLS`, and samples the fifth item
    (temperature 1, top-p 0.95, a seed per request). Items that are too short or long, do not
    read as a sentence, repeat an example, an earlier request or one of `exclude` are dropped,
    and rounds go on until there are `n` (at most 40 rounds: fewer may come back)."""
    from specserve.sampling.params import SamplingParams

    if n <= 0:
        return []
    rng = random.Random(seed)
    examples = {q.lower() for pool in SELF_INSTRUCT_POOLS.values() for q in pool}
    headings = list(SELF_INSTRUCT_POOLS)
    out: dict[str, None] = {}
    seen: set[str] = {q.lower() for q in exclude}
    for round_ in range(40):
        missing = n - len(out)
        if missing <= 0:
            break
        texts, params = [], []
        for i in range(min(2 * missing + 8, 1024)):
            heading = rng.choice(headings)
            shown = rng.sample(SELF_INSTRUCT_POOLS[heading], SELF_INSTRUCT_EXAMPLES)
            texts.append(f"{heading}:\n" + "".join(f"{j + 1}. {q}\n" for j, q in enumerate(shown))
                         + f"{len(shown) + 1}.")
            params.append(SamplingParams(max_tokens=64, temperature=1.0, top_p=0.95, stop=["\n"],
                                         seed=((seed * 1_000_003 + round_) * 4096 + i) % 2**64))
        done = _run_requests(llm, [llm.encode(t) for t in texts], params, batch, f"self-instruct {round_ + 1}")
        for _, out_ids in done:
            request = _self_instruct_request(llm.tokenizer.decode(out_ids), examples)
            if request is not None and request.lower() not in seen:
                seen.add(request.lower())
                out[request] = None
    return list(out)[:n]


FEATURE_TOKENS = 4096  # most tokens per forward while computing the features
KV_BLOCK_SIZE = 16


def target_features(
    model, samples: list[list[int]], max_tokens: int = FEATURE_TOKENS, feature_layers: Sequence[int] = (),
    layers_only: bool = False,
) -> list[torch.Tensor]:
    """The target's final hidden rows `[len(ids), hidden]` (bf16, on the CPU) of every token of
    each sample, several samples per forward (up to `max_tokens` tokens); with `feature_layers`,
    each row is followed by those layers' outputs (`[len(ids), hidden * (1 + n)]`). With
    `layers_only`, just those layers' outputs `[len(ids), hidden * n]`, from forwards that stop
    at the last of them (for final features already at hand). The native layers are
    row-invariant, so a sample's features are exactly those of a forward over it alone."""
    from specserve.cache.kv_cache import KVCache, KVCacheFull
    from specserve.engine.runner import ForwardItem, ModelRunner

    if layers_only and not feature_layers:
        raise ValueError("layers_only needs feature layers")
    if not samples:
        return []
    mcfg = model.config
    groups: list[list[int]] = [[]]  # sample indices per forward
    for i, ids in enumerate(samples):
        if groups[-1] and sum(len(samples[j]) for j in groups[-1]) + len(ids) > max_tokens:
            groups.append([])
        groups[-1].append(i)
    longest = max(len(ids) for ids in samples)
    width = max(len(g) for g in groups)
    block = KV_BLOCK_SIZE
    scratch = KVCache(mcfg.num_layers, width, longest, mcfg.num_kv_heads, mcfg.head_dim, native.kv_dtype(model),
                      model.device, block_size=block, num_blocks=-(-max(max_tokens, longest) // block) + width)
    runner = ModelRunner(model, scratch)
    run_layers = [i <= max(feature_layers) for i in range(mcfg.num_layers)] if layers_only else None
    drop = mcfg.hidden_size if layers_only else 0  # the first block then holds no final feature
    feats: list[torch.Tensor] = [None] * len(samples)  # type: ignore[list-item]
    bar = _progress(total=len(samples), desc="features", unit="sample")
    for group in groups:
        slots = [scratch.allocate() for _ in group]
        for slot, i in zip(slots, group):
            if not scratch.ensure(slot, len(samples[i])):  # the pool is sized for a whole group
                raise KVCacheFull(f"no KV blocks for a {len(samples[i])}-token sample")
        items = [ForwardItem(slot, 0, samples[i], logits_from=None) for slot, i in zip(slots, group)]
        _, hidden = runner.forward(items, run_layers, all_hidden=True, feature_layers=feature_layers)
        hidden = hidden[:, drop:].to(torch.bfloat16).cpu()
        row = 0
        for i in group:
            feats[i] = hidden[row : row + len(samples[i])].clone()
            row += len(samples[i])
        for slot in slots:
            scratch.free(slot)
        bar.update(len(group))
    bar.close()
    return feats


def build_data(llm, cfg: TrainConfig) -> dict[str, Any]:
    """Generate the samples and their target features (the slow part, cached by the caller)."""
    started = time.time()
    base = synth_prompts(cfg.prompts, cfg.seed)
    samples = _generate(llm, base, cfg.max_tokens, cfg.batch_generate, "answering")
    # passage tasks over the target's own longer answers (copying and summarizing)
    rng = random.Random(cfg.seed + 1)
    long = [(p, o) for (p, o), prompt in zip(samples, base) if len(o) >= 120]
    rng.shuffle(long)
    extra = []
    passages = [llm.tokenizer.decode(out_ids).strip() for _, out_ids in long]
    for i, passage in enumerate(passages[: int(cfg.prompts * cfg.passage_fraction)]):
        other = passages[(i + 1) % len(passages)][:600]  # a second, shorter document for the two-document task
        extra.append(rng.choice(PASSAGE_TASKS).format(
            passage=passage, passage2=other, topic=rng.choice(TOPICS), lang=rng.choice(LANGUAGES)
        ))
    samples += _generate(llm, extra, cfg.max_tokens, cfg.batch_generate, "passages")
    return _samples_data(llm, samples, started, cfg.feature_layers)


def _samples_data(
    llm, samples: list[tuple[list[int], list[int]]], started: float, feature_layers: Sequence[int] = ()
) -> dict[str, Any]:
    feats = target_features(llm.engine.runner.model, [p + o for p, o in samples], feature_layers=feature_layers)
    return {
        "feature_layers": list(feature_layers),
        "tokens": [torch.tensor(p + o, dtype=torch.int32) for p, o in samples], "feats": feats,
        "response_start": [len(p) for p, _ in samples], "num_prompts": len(samples),
        "seconds": time.time() - started, "self_instruct": 0, "self_instruct_prompts": [],
    }


def _self_instruct_asked(data: dict[str, Any]) -> int:
    """How many self-instruct prompts `data` was extended for (it may hold fewer)."""
    return max(data.get("self_instruct_asked", 0), data.get("self_instruct", 0))


def extend_self_instruct(llm, data: dict[str, Any], cfg: TrainConfig) -> dict[str, Any]:
    """Append samples for `cfg.self_instruct` target-written prompts (fewer when `data` already
    holds some): the target writes the requests, then answers them greedily."""
    have = data.get("self_instruct", 0)
    want = cfg.self_instruct - _self_instruct_asked(data)
    if want <= 0:
        return data
    started = time.time()
    earlier = data.get("self_instruct_prompts", [])
    prompts = self_instruct_prompts(llm, want, seed=cfg.seed + 101 * (have + 1), batch=cfg.batch_generate,
                                    exclude=earlier)
    part = _samples_data(llm, _generate(llm, prompts, cfg.max_tokens, cfg.batch_generate, "self-instruct answers"),
                         started, data.get("feature_layers", ()))
    return {
        **data, "tokens": data["tokens"] + part["tokens"], "feats": data["feats"] + part["feats"],
        "response_start": data["response_start"] + part["response_start"],
        "num_prompts": data["num_prompts"] + part["num_prompts"], "seconds": data["seconds"] + part["seconds"],
        "self_instruct": have + len(prompts), "self_instruct_asked": cfg.self_instruct,
        "self_instruct_prompts": [*earlier, *prompts],
    }


def _save_atomic(obj: Any, path: Path) -> None:
    """torch.save through a temporary file, so a stopped write never leaves a broken file."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def response_counts(data: dict[str, Any], vocab_size: int) -> torch.Tensor:
    """How often the target emitted each token id in its answers `[vocab_size]`."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for ids, start in zip(data["tokens"], data["response_start"]):
        counts += torch.bincount(ids[start:].long(), minlength=vocab_size)
    return counts


def draft_vocabulary(counts: torch.Tensor, size: int, eos_ids: list[int]) -> torch.Tensor:
    """The `size` tokens the target emitted most by `response_counts` (its EOS ids always in),
    ascending ids."""
    counts = counts.clone()
    for e in eos_ids:
        counts[e] = counts.max() + 1
    size = min(size, counts.numel())
    return torch.topk(counts, size).indices.sort().values


def _frozen_target(model) -> SimpleNamespace:
    """The target's embeddings, rotary table and LM head in fp32 for training."""
    embed = nn.Embedding.from_pretrained(model.embed_tokens.weight.detach().float().cpu(), freeze=True)
    head = SimpleNamespace(weight=lm_head_weight(model).detach().float().cpu())
    return SimpleNamespace(embed_tokens=embed, rope=model.rope, lm_head=head, config=model.config)


def _bf16_matmuls(device: torch.device) -> bool:
    """Whether the head trains with bf16 matmuls (weights, gradients and losses stay fp32):
    where the hardware multiplies bf16 natively, a CUDA device with bf16 or a CPU with
    AMX-BF16 (1.8x faster than fp32 here, the same losses)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and set(native.REQUIRED_CPU_FLAGS) <= native._cpu_flags()


def _batches(data: dict[str, Any], batch_size: int, rng: random.Random) -> list[list[int]]:
    order = sorted(range(len(data["tokens"])), key=lambda i: len(data["tokens"][i]))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    return batches


def _batch_tensors(data, idx: list[int], to_draft: torch.Tensor, feat_std: float, hidden: int):
    """(next tokens, final features / feat_std, the feature layers' outputs or None, next final
    features / feat_std, labels, loss weights) of the samples `idx`, padded to one length."""
    L = max(len(data["tokens"][i]) for i in idx) - 1  # inputs i = 0..L-1 predict position i + 1
    B = len(idx)
    H = hidden
    wide = data["feats"][0].shape[1]
    tok_in = torch.zeros(B, L, dtype=torch.long)
    feat_in = torch.zeros(B, L, H)
    taps_in = torch.zeros(B, L, wide - H) if wide > H else None
    feat_next = torch.zeros(B, L, H)
    label = torch.full((B, L), -100, dtype=torch.long)
    weight = torch.zeros(B, L)
    for b, i in enumerate(idx):
        ids, rows, start = data["tokens"][i].long(), data["feats"][i], data["response_start"][i]
        f = rows[:, :H].float() / feat_std
        n = len(ids) - 1
        tok_in[b, :n] = ids[1:]
        feat_in[b, :n] = f[:-1]
        feat_next[b, :n] = f[1:]
        if taps_in is not None:
            taps_in[b, :n] = rows[:-1, H:].float()
        # the head at input i predicts the token at i + 2; train where that token is a response token
        lab = to_draft[ids[2:]]
        keep = torch.arange(2, len(ids)) >= start
        label[b, : n - 1] = torch.where(keep, lab, torch.full_like(lab, -100))
        weight[b, : n - 1] = keep.float()
    return tok_in, feat_in, taps_in, feat_next, label, weight


@dataclass
class Prepared:
    """The samples, the draft vocabulary and what the saved head's config says of the data."""

    data: dict[str, Any]
    draft_ids: torch.Tensor  # [draft vocab] target ids, ascending
    to_draft: torch.Tensor  # [vocab] target id -> draft index, -100 outside the draft vocabulary
    feat_std: float
    stats: dict[str, Any]


def _prepare(llm, out: Path, cfg: TrainConfig, log) -> Prepared:
    """Load the cached samples in OUT or generate them; pick the draft vocabulary."""
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    mcfg = llm.engine.runner.model.config
    data_path = out / "data.pt"
    if data_path.is_file():
        data = torch.load(data_path, weights_only=False)
        log(f"data: {data_path} ({data['num_prompts']} samples, reused)")
    else:
        data = build_data(llm, cfg)
        _save_atomic(data, data_path)  # kept even if the self-instruct part below fails
        log(f"data: {data['num_prompts']} samples generated in {data['seconds'] / 60:.1f} min")
    if _self_instruct_asked(data) < cfg.self_instruct:
        stale = out / "checkpoint.pt"
        if stale.is_file():  # trained on the data before it grows: start over
            stale.unlink()
            log(f"checkpoint: {stale} removed (it was trained on the smaller data)")
        have, want = data.get("self_instruct", 0), cfg.self_instruct - _self_instruct_asked(data)
        data = extend_self_instruct(llm, data, cfg)
        _save_atomic(data, data_path)
        got = data["self_instruct"] - have
        short = f"; only {got} of {want} asked passed the filter" if got < want else ""
        log(f"data: extended to {data['num_prompts']} samples ({data['self_instruct']} self-instruct prompts{short})")
    if list(data.get("feature_layers", ())) != list(cfg.feature_layers):
        t0 = time.time()
        model, hidden = llm.engine.runner.model, mcfg.hidden_size
        tokens = [t.tolist() for t in data["tokens"]]
        if cfg.feature_layers:  # the final features are kept: only the layers up to the last one asked run
            taps = target_features(model, tokens, feature_layers=cfg.feature_layers, layers_only=True)
            feats = [torch.cat([f[:, :hidden], t], dim=-1) for f, t in zip(data["feats"], taps)]
        else:
            feats = [f[:, :hidden].clone() for f in data["feats"]]
        data = {**data, "feats": feats, "feature_layers": list(cfg.feature_layers),
                "features_minutes": round((time.time() - t0) / 60, 1)}
        _save_atomic(data, data_path)
        log(f"data: features recomputed with layers {list(cfg.feature_layers)} in {(time.time() - t0) / 60:.1f} min")
    counts = response_counts(data, mcfg.vocab_size)
    draft_ids = draft_vocabulary(counts, cfg.draft_vocab, sorted(llm.engine.eos_ids))
    to_draft = torch.full((mcfg.vocab_size,), -100, dtype=torch.long)
    to_draft[draft_ids] = torch.arange(len(draft_ids))
    coverage = float(counts[draft_ids].sum()) / max(int(counts.sum()), 1)
    stats = {
        "data": f"{data['num_prompts']} prompts synthesized by specserve.spec.train (templates and topics, "
                "passage tasks over the target's own answers, "
                f"{data.get('self_instruct', 0)} requests written by the target itself; no Spec-Bench question), "
                f"answered greedily by the target, at most {cfg.max_tokens} new tokens",
        "tokens": sum(len(t) for t in data["tokens"]),
        "response_tokens": sum(len(t) - s for t, s in zip(data["tokens"], data["response_start"])),
        "draft_vocab_coverage": round(coverage, 4),
        "data_minutes": round(data["seconds"] / 60, 1),
    }
    hidden = mcfg.hidden_size  # the final hidden state comes first in each feature row
    feat_std = float(torch.cat([f[:64, :hidden].float() for f in data["feats"]]).std())
    return Prepared(data, draft_ids, to_draft, feat_std, stats)


class _Checkpoints:
    """One checkpoint per epoch in OUT (head, optimizer, schedule, RNG): a stopped run resumes."""

    def __init__(self, out: Path, head: nn.Module, opt, sched, log, recipe: dict[str, Any] | None = None) -> None:
        self.path, self.head, self.opt, self.sched = out / "checkpoint.pt", head, opt, sched
        self.recipe = recipe or {}  # what the run trains with; a checkpoint trained otherwise is refused
        self.first_epoch, self.seconds, self.rng_state = 0, 0.0, None
        if self.path.is_file():
            ckpt = torch.load(self.path, weights_only=False)
            kind = ckpt.get("kind", "eagle")
            try:
                if kind != head.kind:
                    raise ValueError(f"it holds a {kind} head")
                for key, value in self.recipe.items():
                    if ckpt.get("recipe", {}).get(key) != value:
                        was = ckpt.get("recipe", {}).get(key, "an earlier training")
                        raise ValueError(f"it was trained with {key} {was}, this run trains with {key} {value}")
                head.load_state_dict(ckpt["head"])
            except (ValueError, RuntimeError) as exc:
                raise ValueError(
                    f"{self.path} is not a checkpoint of this {head.kind} head ({str(exc).splitlines()[0]}); "
                    "train in another directory or delete it"
                ) from exc
            opt.load_state_dict(ckpt["opt"])
            sched.load_state_dict(ckpt["sched"])
            self.first_epoch, self.seconds, self.rng_state = ckpt["epoch"], ckpt["seconds"], ckpt["rng"]
            log(f"resuming after epoch {self.first_epoch}")

    def save(self, epoch: int, seconds: float, rng_state) -> None:
        self.seconds = seconds
        torch.save({"kind": self.head.kind, "head": self.head.state_dict(), "opt": self.opt.state_dict(), "sched": self.sched.state_dict(),
                    "epoch": epoch, "seconds": seconds, "rng": rng_state, "recipe": self.recipe}, self.path)


def _optimizer(params, cfg: TrainConfig, total_steps: int):
    """AdamW with a 50-step warm-up and a cosine decay over the run."""
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(s / max(total_steps, 1), 1.0)))
    )
    return opt, sched


def _target_name(llm) -> str:
    return os.path.basename(str(llm.info().get("model", "")))


def train_drafter(llm, out_dir: str | Path, cfg: TrainConfig, log=print) -> Path:
    """Train (or resume) the head of `cfg.kind` for `llm`'s model; returns the output directory."""
    if cfg.kind == "medusa":
        return train_medusa(llm, out_dir, cfg, log)
    if cfg.kind == "eagle":
        return train_eagle(llm, out_dir, cfg, log)
    raise ValueError(f"unknown head kind {cfg.kind!r}; choose eagle or medusa")


def unrolled(
    head: EagleHead, tok_in: torch.Tensor, feats: torch.Tensor, steps: int, bf16: bool = False,
    taps: torch.Tensor | None = None,
):
    """Yield (predicted features [B, L, H] fp32, draft logits [B * L, V] fp32) for steps
    0..steps-1 of the head unrolled over `tok_in` [B, L] and the real features `feats`
    [B, L, H] (with `taps` [B, L, n * H], the feature layers' outputs, for a head that reads
    them): step 0 reads the real features; step s reads, at row i, the feature its step
    s - 1 predicted at row i - 1, and attends as drafting's depth s + 1 does: to the real
    context up to the root, row i - s, then to its own draft ancestors (`UnrolledBatch`).
    Row i of step s is the guess of the token after `tok_in[i]`, drafted s tokens after the
    root."""
    B, L, H = feats.shape
    pos = torch.arange(L).repeat(B)
    meta = UnrolledBatch(B, L)
    fed = feats if taps is None else torch.cat([feats, taps], dim=-1)
    for _ in range(steps):
        with torch.autocast(feats.device.type, dtype=torch.bfloat16, enabled=bf16):
            pred = head(tok_in.reshape(-1), fed.reshape(B * L, -1), pos, meta).reshape(B, L, H)
            logits = head.logits(pred.reshape(-1, H))
        pred = pred.float()
        yield pred, logits.float()
        fed = torch.cat([fed[:, :1, :H], pred[:, :-1]], dim=1)


def train_eagle(llm, out_dir: str | Path, cfg: TrainConfig, log=print) -> Path:
    """Train (or resume) an EAGLE head for `llm`'s model; returns the output directory."""
    out = Path(out_dir)
    prep = _prepare(llm, out, cfg, log)
    data, draft_ids, to_draft, feat_std = prep.data, prep.draft_ids, prep.to_draft, prep.feat_std
    model = llm.engine.runner.model
    mcfg = model.config

    hidden = mcfg.hidden_size
    if cfg.init is not None:  # go on from a trained head: its weights and its draft vocabulary
        info, state = read_head_dir(cfg.init, model, "eagle")
        start = EagleHead(mcfg, int(info["draft_vocab_size"]), info.get("feature_layers", ()))
        start.load_state_dict(state)
        draft_ids = start.draft_ids.long()
        to_draft = torch.full((mcfg.vocab_size,), -100, dtype=torch.long)
        to_draft[draft_ids] = torch.arange(len(draft_ids))
        coverage = float(response_counts(data, mcfg.vocab_size)[draft_ids].sum()) / max(
            sum(len(t) - s for t, s in zip(data["tokens"], data["response_start"])), 1)
        prep.stats = {**prep.stats, "draft_vocab_coverage": round(coverage, 4), "init": str(cfg.init)}
    head = EagleHead(mcfg, len(draft_ids), cfg.feature_layers)
    head.draft_ids.copy_(draft_ids)
    if cfg.init is not None:
        kept = {k: v for k, v in state.items() if not k.startswith(("fuse.", "tap_norms."))
                or start.feature_layers == head.feature_layers}
        head.load_state_dict(kept, strict=False)
    else:
        # start the layer from the target's last one where its weights are plain tensors
        own = head.layer.state_dict()
        last = {k: v.float() for k, v in model.layers[-1].state_dict().items() if k in own and own[k].shape == v.shape}
        head.layer.load_state_dict(last, strict=False)
        with torch.no_grad():
            head.fc.weight.zero_()
            head.fc.weight[:, hidden:] = torch.eye(hidden) / feat_std  # start from the feature itself
            head.fc.weight[:, :hidden] = torch.randn(hidden, hidden) * 0.01
            head.fc.bias.zero_()
    if head.feature_layers and (cfg.init is None or start.feature_layers != head.feature_layers):
        with torch.no_grad():
            head.fuse.weight.zero_()  # the layers' part starts silent: the head starts as one without it
    head = head.float()
    head.bind(_frozen_target(model))
    params = [p for p in head.parameters() if p.requires_grad]
    device = params[0].device  # the head (and each batch, built beside it) on the CPU
    bf16 = _bf16_matmuls(device)  # read once: the CPU check reads /proc/cpuinfo
    rng = random.Random(cfg.seed)
    per_epoch = len(_batches(data, cfg.batch_size, random.Random(0)))
    opt, sched = _optimizer(params, cfg, cfg.epochs * per_epoch)
    # unrolled steps that attend as drafting does (a checkpoint without this recipe predates them)
    recipe = {"unroll": cfg.unroll, "attention": "drafting"}
    if cfg.feature_layers:
        recipe["feature_layers"] = list(cfg.feature_layers)
    if cfg.init is not None:
        recipe["init"] = str(cfg.init)
    ckpt = _Checkpoints(out, head, opt, sched, log, recipe)
    if ckpt.rng_state is not None:
        rng.setstate(ckpt.rng_state)
    spent = ckpt.seconds
    for epoch in range(ckpt.first_epoch, cfg.epochs):
        t0 = time.time()
        head.train()
        stats = [0.0, 0.0, 0.0, 0]  # feature loss, token loss, top-1 hits, tokens
        bar = _progress(_batches(data, cfg.batch_size, rng), desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch")
        for idx in bar:
            tok_in, feat_in, taps_in, feat_next, label, weight = _batch_tensors(data, idx, to_draft, feat_std, hidden)
            _, L, H = feat_in.shape
            noisy = feat_in + torch.randn_like(feat_in) * cfg.noise  # the layers' part is exact when drafting
            w = weight.unsqueeze(-1)
            n = weight.sum().clamp(min=1)
            loss = torch.zeros(())
            steps = unrolled(head, tok_in, noisy * feat_std, cfg.unroll, bf16, taps_in)
            for step, (pred, step_logits) in enumerate(steps):
                rooted = (torch.arange(L) >= step).view(1, L)  # rows with a root `step` rows back
                keep = w * rooted.unsqueeze(-1)
                step_f = (F.smooth_l1_loss(pred / feat_std, feat_next, reduction="none") * keep).sum() / (
                    keep.sum().clamp(min=1) * H
                )
                step_label = label.masked_fill(~rooted, -100).reshape(-1)
                step_t = F.cross_entropy(step_logits, step_label, ignore_index=-100)
                loss = loss + step_f + cfg.cls_weight * step_t
                if step == 0:
                    f_loss, t_loss, logits = step_f, step_t, step_logits
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 0.5)
            opt.step()
            sched.step()
            valid = label.reshape(-1) != -100
            stats[0] += float(f_loss.detach()) * float(n)
            stats[1] += float(t_loss.detach()) * int(valid.sum())
            stats[2] += int((logits.argmax(-1) == label.reshape(-1))[valid].sum())
            stats[3] += int(valid.sum())
            bar.set_postfix(feat=f"{float(f_loss.detach()):.3f}", tok=f"{float(t_loss.detach()):.2f}")
        bar.close()
        spent += time.time() - t0
        n = max(stats[3], 1)
        log(f"epoch {epoch + 1}: feature loss {stats[0] / n:.4f}, token loss {stats[1] / n:.3f}, "
            f"top-1 {stats[2] / n:.1%} ({(time.time() - t0) / 60:.1f} min)")
        ckpt.save(epoch + 1, spent, rng.getstate())
    training = {**prep.stats, "epochs": cfg.epochs, "batch_size": cfg.batch_size, "lr": cfg.lr, "noise": cfg.noise,
                "unroll": cfg.unroll, "train_minutes": round(spent / 60, 1)}
    if head.feature_layers:
        training["features_minutes"] = prep.data.get("features_minutes")
    save_head(head, out, {"target": _target_name(llm), "training": training})
    log(f"head: {out} (draft vocabulary {len(draft_ids)} tokens covering {prep.stats['draft_vocab_coverage']:.1%} "
        "of the answers)")
    return out


def _medusa_rows(
    data: dict[str, Any], to_draft: torch.Tensor, num_heads: int, samples: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every position p of the given samples whose first Medusa label t_{p+2} is a response
    token: (features `[N, hidden]` bf16, labels `[N, K]` in draft indices, -100 where a head
    has none)."""
    feats, labels = [], []
    for i in samples:
        ids, start = data["tokens"][i], data["response_start"][i]
        f = data["feats"][i][:, : data["feats"][i].shape[1] // (1 + len(data.get("feature_layers", ())))]
        ids = ids.long()
        n = len(ids)
        first = max(start - 2, 0)  # p + 2 >= start
        if n - 2 <= first:
            continue
        pos = torch.arange(first, n - 2)
        lab = torch.full((len(pos), num_heads), -100, dtype=torch.long)
        for k in range(num_heads):
            target = pos + 2 + k
            ok = target < n
            lab[ok, k] = to_draft[ids[target[ok]]]
        feats.append(f[first : n - 2])
        labels.append(lab)
    if not feats:
        width = data["feats"][0].shape[1] // (1 + len(data.get("feature_layers", ())))
        return torch.zeros(0, width, dtype=torch.bfloat16), torch.zeros(0, num_heads, dtype=torch.long)
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def _medusa_hits(logits: torch.Tensor, lab: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per head: (top-1 hits, labelled rows) of logits `[K, B, Vd]` against labels `[K, B]`."""
    valid = lab != -100
    return ((logits.argmax(-1) == lab) & valid).sum(1).float(), valid.sum(1).float()


@torch.no_grad()
def _medusa_top1(head, feats: torch.Tensor, labels: torch.Tensor, rows: int = 4096) -> list[float]:
    """Top-1 accuracy of each head on held-out rows."""
    hits, seen = torch.zeros(labels.shape[1]), torch.zeros(labels.shape[1])
    for i in range(0, len(feats), rows):
        h, s = _medusa_hits(head.logits(head(feats[i : i + rows].float())), labels[i : i + rows].T)
        hits, seen = hits + h, seen + s
    return (hits / seen.clamp(min=1)).tolist()


def train_medusa(llm, out_dir: str | Path, cfg: TrainConfig, log=print) -> Path:
    """Train (or resume) Medusa heads for `llm`'s model; returns the output directory.

    Head k learns the target's token t_{p+1+k} from its feature f_p (cross-entropy over
    the draft vocabulary, head k weighted 0.8^(k-1) as in Medusa); the LM head rows are
    the target's, frozen. The samples are position-wise, so batches are shuffled rows.
    """
    from specserve.spec.medusa import MedusaHead
    from specserve.spec.medusa import save_head as save_medusa

    out = Path(out_dir)
    prep = _prepare(llm, out, cfg, log)
    model = llm.engine.runner.model
    K = cfg.medusa_heads
    # every 20th sample is held out: its top-1 per head says how well the heads generalize
    num = len(prep.data["tokens"])
    held = [i for i in range(num) if i % 20 == 19]
    feats, labels = _medusa_rows(prep.data, prep.to_draft, K, [i for i in range(num) if i % 20 != 19])
    held_feats, held_labels = _medusa_rows(prep.data, prep.to_draft, K, held)
    if not len(held_feats):
        held_feats = held_labels = None
    head = MedusaHead(model.config, K, len(prep.draft_ids), cfg.medusa_layers)
    head.draft_ids.copy_(prep.draft_ids)
    head.bind(_frozen_target(model))
    params = list(head.parameters())
    rows_per_batch = cfg.batch_size * 64
    per_epoch = math.ceil(len(feats) / rows_per_batch)
    opt, sched = _optimizer(params, cfg, cfg.epochs * per_epoch)
    ckpt = _Checkpoints(out, head, opt, sched, log)
    gen = torch.Generator()  # seeded per epoch, so a resumed run shuffles as an unbroken one
    weights = torch.tensor([0.8**k for k in range(K)])
    spent = ckpt.seconds
    for epoch in range(ckpt.first_epoch, cfg.epochs):
        t0 = time.time()
        gen.manual_seed(cfg.seed + epoch)
        order = torch.randperm(len(feats), generator=gen)
        hits, seen, total_loss = torch.zeros(K), torch.zeros(K), 0.0
        bar = _progress(range(per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch")
        for b in bar:
            idx = order[b * rows_per_batch : (b + 1) * rows_per_batch]
            lab = labels[idx].T  # [K, B]
            logits = head.logits(head(feats[idx].float()))  # [K, B, Vd]
            losses = torch.stack([F.cross_entropy(logits[k], lab[k], ignore_index=-100) for k in range(K)])
            losses = torch.nan_to_num(losses)  # a head without labels in the batch
            loss = (losses * weights).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            h, n = _medusa_hits(logits, lab)
            hits, seen = hits + h, seen + n
            total_loss += float(loss.detach())
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        bar.close()
        spent += time.time() - t0
        top1 = ", ".join(f"{h / max(s, 1):.1%}" for h, s in zip(hits.tolist(), seen.tolist()))
        held_out = ""
        if held_feats is not None:
            held_out = ", held-out " + ", ".join(f"{x:.1%}" for x in _medusa_top1(head, held_feats, held_labels))
        log(f"epoch {epoch + 1}: loss {total_loss / per_epoch:.3f}, top-1 per head {top1}{held_out} "
            f"({(time.time() - t0) / 60:.1f} min)")
        ckpt.save(epoch + 1, spent, None)
    training = {**prep.stats, "rows": len(feats), "held_out_rows": 0 if held_feats is None else len(held_feats),
                "epochs": cfg.epochs, "batch_rows": rows_per_batch, "lr": cfg.lr,
                "train_minutes": round(spent / 60, 1)}
    save_medusa(head, out, {"target": _target_name(llm), "training": training})
    log(f"heads: {out} ({K} Medusa heads; draft vocabulary {len(prep.draft_ids)} tokens covering "
        f"{prep.stats['draft_vocab_coverage']:.1%} of the answers)")
    return out
