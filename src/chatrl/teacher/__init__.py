"""A strong hosted model as teacher: it writes SFT demonstrations (``demos``) and ranks sampled
responses (``rank``) through any OpenAI-compatible chat completions API (``client``), in the
same formats as the human path. ``batch`` holds what both share (resumable output, workers,
progress); ``commands`` the ``chatrl teacher`` sub-commands. See docs/teacher.md.
"""
