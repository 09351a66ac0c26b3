# SPDX-License-Identifier: Apache-2.0
# Copyright 2026 The vcompile authors
"""README's examples as tests: python -m pytest --markdown-docs README.md.

pytest-markdown-docs finds every ```python block (a `continuation` block
runs after the blocks before it); this runner gives each one what a reader
who pastes it into a new file has: a fresh Python process, an empty cache
root, an empty working folder. Run in the pytest process, a block would
find the models, ops and compiled code of the blocks before it, and pass
where a reader's copy fails.
"""

import os
import subprocess
import sys
import tempfile

from pytest_markdown_docs._runners import DefaultRunner, register_runner


@register_runner(default=True)
class FreshProcess(DefaultRunner):
    def runtest(self, test, args, **kwargs):
        with tempfile.TemporaryDirectory(prefix="vcompile-readme-") as folder:
            # A file, as a reader saves it: a graph pass's source must be readable
            # (its identity), and tracebacks give README's own line numbers.
            with open(os.path.join(folder, "example.py"), "w") as f:
                f.write(test.source)
            env = {**os.environ, "VCOMPILE_CACHE_ROOT": os.path.join(folder, "cache")}
            proc = subprocess.run([sys.executable, "example.py"], cwd=folder, env=env, capture_output=True,
                                  text=True, timeout=600)
        if proc.returncode != 0:
            raise AssertionError(f"README block at line {test.start_line} exited with {proc.returncode}:\n"
                                 f"{proc.stderr[-4000:]}")
