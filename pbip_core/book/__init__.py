"""The book's helpers: set-up of a chapter (``chapter``), runs behind the chapters (``results``), tables beside the
paper (``tables``), figures and widgets (``figures``, ``widgets``), and executing / building the book (``build``,
``vendor``). Chapters compute the method itself with :mod:`pbip_core.method`; these modules only orchestrate.
"""

from .chapter import Chapter, chapter_setup, ensure_dataset, repo_root

__all__ = ["Chapter", "chapter_setup", "ensure_dataset", "repo_root"]
