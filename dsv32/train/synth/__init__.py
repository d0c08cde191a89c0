"""Agentic task synthesis in miniature: seeded tasks for the three tools and plain chat with
reference trajectories and verifiers (`tasks`, drawn by `drafts`), the skill drills (`drills`), and
the generator's language: what users write (`phrasings`) and what the assistant writes (`replies`)."""
from .drills import SKILL_FRAMES, conversion_conversations, number_conversations, skill_conversations
from .tasks import (
    CATEGORIES, MODES, Task, answer_stage, completion_text, generate_tasks, make_task, reference_completions,
    sft_conversations,
)

__all__ = [
    "CATEGORIES", "MODES", "SKILL_FRAMES", "Task", "answer_stage", "completion_text",
    "conversion_conversations", "generate_tasks", "make_task", "number_conversations",
    "reference_completions", "sft_conversations", "skill_conversations",
]
