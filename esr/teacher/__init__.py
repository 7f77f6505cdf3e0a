"""The teacher's side: engines behind the ``TeacherScorer`` seam, their per-micro-batch targets, and the
cross-tokenizer alignment."""

from esr.teacher.cross_score import CrossScorer
from esr.teacher.score import LocalScorer
from esr.teacher.scorer import Capabilities, TeacherBatch, TeacherScorer, check_supported
from esr.teacher.targets import ExactTargets, SpanTargets, TeacherTargets, TokenLogprobTargets

__all__ = ["Capabilities", "CrossScorer", "ExactTargets", "LocalScorer", "SpanTargets", "TeacherBatch",
           "TeacherScorer", "TeacherTargets", "TokenLogprobTargets", "check_supported"]
