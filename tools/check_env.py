#!/usr/bin/env python
"""Check that the installed stack can run the project (run by set-up; make check).

    .venv/bin/python tools/check_env.py
"""
import sys

from workflows.environment import main

if __name__ == "__main__":
    sys.exit(main())
