"""BFCL test cases for evaluation: the data reading lives in ``esr.data.bfcl`` (training reads the same prompts)."""

from esr.data.bfcl import CATEGORIES, INSTALL_HINT, PYTHON_HINT, SYSTEM_PROMPT, BfclItem, load_bfcl, render_tools_prompt

__all__ = ["CATEGORIES", "INSTALL_HINT", "PYTHON_HINT", "SYSTEM_PROMPT", "BfclItem", "load_bfcl", "render_tools_prompt"]
