"""Built-in prompt tasks with checkable answers, for online RL without a download (`lmforge data task`).

arithmetic: "What is 37 + 18?"-style problems over + - x with operands drawn from a seeded generator; each row is a
`format: prompt` row {"prompt": [{"role": "user", "content": ...}], "answer": "55"} that the built-in exact_answer
reward checks.
"""

import random

OPERATIONS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "x": lambda a, b: a * b}
INSTRUCTION = "Give only the final number."


def arithmetic(count: int, seed: int = 0, max_operand: int = 20, operations: str = "+-x") -> list[dict]:
    """`count` distinct problems a OP b with 0 <= a, b <= max_operand (a >= b for -, so answers are >= 0)."""
    if not operations or set(operations) - set(OPERATIONS):
        raise ValueError(f"operations must be a string of {''.join(OPERATIONS)}, got {operations!r}")
    space = (max_operand + 1) ** 2 * len(operations)
    if count > space // 2:
        raise ValueError(f"{count} distinct problems asked of a space of {space}: raise max_operand")
    rng = random.Random(seed)
    seen, rows = set(), []
    while len(rows) < count:
        op = rng.choice(operations)
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        if op == "-" and a < b:
            a, b = b, a
        if (a, op, b) in seen:
            continue
        seen.add((a, op, b))
        question = f"What is {a} {op} {b}? {INSTRUCTION}"
        rows.append({"prompt": [{"role": "user", "content": question}], "answer": str(OPERATIONS[op](a, b))})
    return rows


TASKS = {"arithmetic": arithmetic}
