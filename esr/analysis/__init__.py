"""Diagnostics of a student-teacher pair and of a run: where the teacher disagrees, how far its judgement
reaches (KL profile, decay probe), and what training changed."""
