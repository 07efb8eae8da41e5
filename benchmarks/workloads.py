"""The engine benchmarks' workloads: chat prompts as token ids, grouped into the generate calls each measured
quantity makes (benchmarks/engine.py, quantized.py and structured.py run them; the systems and tables are theirs)."""

import os
from dataclasses import dataclass, field

TOPICS = [
    "photosynthesis", "compound interest", "the water cycle", "black holes", "vaccines", "the French Revolution",
    "machine learning", "plate tectonics", "inflation", "the immune system", "DNA replication", "supply and demand",
    "climate change", "the stock market", "quantum computing", "the Roman Empire", "electric cars", "sleep",
    "the internet", "recycling", "volcanoes", "the Renaissance", "antibiotics", "solar energy", "blockchains",
    "the human heart", "gravity", "democracy", "coffee brewing", "ocean tides", "honey bees", "the printing press",
]
QUESTION_FORMS = [
    "Explain {} to a ten-year-old in a few short paragraphs.",
    "What are three common misconceptions about {}, and what is actually true?",
]
SINGLE_QUESTION = "Write a short story about a lighthouse keeper who finds a message in a bottle."
SHARED_SYSTEM_PROMPT = """You are Ada, the customer support assistant of Northwind Outfitters, an online shop that \
sells outdoor clothing, camping gear, bicycles and accessories in Europe and North America. Follow these rules in \
every answer.

1. Greet the customer once, briefly, and then answer the question directly. Do not repeat the question back.
2. Be friendly, calm and concise. Prefer short paragraphs and, for procedures, numbered steps.
3. Never invent order numbers, tracking codes, prices, stock levels or delivery dates. If you do not know, say so and \
explain how the customer can find out in their account under "My orders".
4. Returns: unused items in their original packaging can be returned within 30 days of delivery for a full refund. \
Bicycles can be returned within 14 days if they have been ridden less than 20 kilometres. Personalised items, \
opened hygiene products and gift cards cannot be returned.
5. Refunds are issued to the original payment method within 5 to 10 business days after the returned item arrives \
at our warehouse. Store credit is issued within 24 hours if the customer prefers it.
6. Shipping: standard delivery takes 3 to 5 business days and is free above 50 euros or 60 dollars. Express delivery \
takes 1 to 2 business days and costs 12 euros or 15 dollars. We do not ship to post office boxes.
7. Warranty: clothing and accessories have a 2-year warranty against manufacturing defects; tents and sleeping bags \
have 3 years; bicycle frames have 5 years. Normal wear and tear, accidents and misuse are not covered.
8. Sizes: recommend the size chart on each product page. If the customer is between two sizes, suggest the larger \
size for jackets and the smaller size for base layers.
9. Safety: for questions about climbing, avalanche equipment or bicycle brakes, give general guidance only and \
recommend that the customer asks a certified professional or visits one of our partner workshops.
10. Privacy: never ask for full card numbers, passwords or security codes. If a customer shares them, tell them not \
to and do not repeat the numbers.
11. Complaints: apologise once, sincerely, and offer the most helpful concrete next step. If the customer asks for a \
human, explain that they can reach the support team by email at any time or by phone on weekdays from 8 am to 6 pm.
12. If a question is not about Northwind Outfitters, its products or outdoor activities, answer politely in one or \
two sentences and steer the conversation back to how you can help.

Always end your answer by asking whether there is anything else you can help with."""


@dataclass
class Task:
    """One measured quantity: `prompt_sets` holds the prompts of each generate call, warm-up first."""

    name: str
    prefix_caching: bool
    max_tokens: int
    prompt_sets: list[list[list[int]]]


@dataclass
class Run:
    seconds: float
    tokens: int
    token_ids: list[list[int]] | None = None


@dataclass
class SystemResult:
    runs: dict[str, list[Run]] = field(default_factory=dict)
    note: str = ""  # version, or why the system did not run
    ok: bool = True



def chat_prompt(tokenizer, question: str, system: str | None = None) -> list[int]:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)


def questions(n: int) -> list[str]:
    base = [form.format(topic) for form in QUESTION_FORMS for topic in TOPICS]
    return [base[i % len(base)] + ("" if i < len(base) else f" (Take {i // len(base) + 1}.)") for i in range(n)]


def build_tasks(args, tokenizer) -> tuple[list[Task], dict]:
    calls = args.repeats + 1  # one warm-up call, then the timed ones
    tasks, info = [], {}
    if args.workload in ("throughput", "all"):
        prompts = [chat_prompt(tokenizer, q) for q in questions(args.num_prompts)]
        tasks.append(Task("throughput", False, args.max_tokens, [prompts] * calls))
        info["throughput"] = f"{len(prompts)} prompts of {min(map(len, prompts))}-{max(map(len, prompts))} tokens"
    if args.workload in ("single", "all"):
        prompt = chat_prompt(tokenizer, SINGLE_QUESTION)
        tasks.append(Task("ttft", False, 1, [[prompt]] * calls))
        tasks.append(Task("decode", False, args.single_tokens, [[prompt]] * calls))
        info["single"] = f"1 prompt of {len(prompt)} tokens"
    if args.workload in ("prefix", "all"):
        qs = questions(args.prefix_prompts)
        sets = [[chat_prompt(tokenizer, q, f"Session {1000 + call}. {SHARED_SYSTEM_PROMPT}") for q in qs]
                for call in range(calls)]
        shared = len(os.path.commonprefix(sets[0]))
        tasks.append(Task("prefix_off", False, args.prefix_tokens, sets))
        tasks.append(Task("prefix_on", True, args.prefix_tokens, sets))
        lengths = [len(p) for p in sets[0]]
        info["prefix"] = f"{len(qs)} prompts of {min(lengths)}-{max(lengths)} tokens, ~{shared} of them shared"
    return tasks, info
