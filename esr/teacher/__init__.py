"""Teacher scoring of student rollouts (same tokenizer); cross-tokenizer alignment lives beside it."""

from esr.teacher.score import TeacherScorer

__all__ = ["TeacherScorer"]
