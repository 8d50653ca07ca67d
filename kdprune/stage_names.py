"""The pipeline's stages by name, in order: light to import (`kdprune --help` lists them without loading torch).
kdprune/runner.py maps each name to its function; a test checks the two agree."""

STAGE_NAMES = ("prepare", "search-teacher", "teacher", "search-student", "student", "distill", "compare", "prune",
               "export", "evaluate", "register")
