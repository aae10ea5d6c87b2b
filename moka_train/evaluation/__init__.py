"""Evaluation: greedy answers for a benchmark's questions (``generate``) and their exact-match accuracy
per question type (``accuracy``)."""
