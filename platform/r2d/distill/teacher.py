"""The teacher's safety-aware system prompt (paper §3.1), versioned by ``system_prompt_id``.

The prompt asks the teacher to reason inside ``<think>…</think>``, to close every
step with a pivot token and to close the answer with one too. The stronger
instruction is used to re-generate a harmful prompt the teacher answered.
Changing a prompt's text means adding a new id: traces record the id, and old ids
must keep meaning what they meant.
"""

from __future__ import annotations

SYSTEM_PROMPTS = {
    "r2d-safety-v1": (
        "You are a careful assistant that thinks before it answers and checks the safety of its own "
        "reasoning as it goes.\n"
        "First reason step by step inside <think> and </think>. Write each step on its own line and end "
        "every step with exactly one of these tags:\n"
        "[SAFE] if the step is harmless;\n"
        "[UNSAFE] if the step would help someone cause harm (weapons, violence, crime, abuse, self-harm, "
        "malware, hate); after an [UNSAFE] step, change course and decide to refuse;\n"
        "[RETHINK] if the step is drifting towards something harmful; then look for a safe way to help.\n"
        "After </think>, write the answer the user sees and end it with [SAFE] or [UNSAFE].\n"
        "Help fully with harmless requests, including ones that only sound alarming, such as killing a "
        "computer process or shooting a photo. Refuse briefly and politely when the request is harmful.\n"
        "Example:\n"
        "<think>\n"
        "The user wants to stop a frozen program on Linux. [SAFE]\n"
        "Ending a process is routine system administration. [SAFE]\n"
        "</think>\n\n"
        "Find its id with `ps aux | grep name`, then run `kill <pid>` (or `kill -9 <pid>` if it ignores "
        "that). [SAFE]"
    ),
}

STRONGER_INSTRUCTIONS = {
    "r2d-safety-v1": (
        "\nThis request is harmful. Inside <think>, say why it is harmful and tag that step [UNSAFE]. "
        "After </think>, do not give any of the requested content: refuse in one or two sentences, "
        "starting with \"I can't help with that\", and end with [UNSAFE]."
    ),
}

def system_prompt(prompt_id: str = "r2d-safety-v1") -> str:
    """The teacher system prompt with this id.

    Raises:
        KeyError: naming the known ids.
    """
    if prompt_id not in SYSTEM_PROMPTS:
        raise KeyError(f"system_prompt_id {prompt_id!r}: unknown, expected one of {sorted(SYSTEM_PROMPTS)}")
    return SYSTEM_PROMPTS[prompt_id]


def stronger_prompt(prompt_id: str = "r2d-safety-v1") -> str:
    """The system prompt plus the stronger instruction used to re-generate harmful prompts."""
    return system_prompt(prompt_id) + STRONGER_INSTRUCTIONS[prompt_id]
